"""The dry-run planner: a per-GPU memory estimate of a parallel layout on a named GPU (PLAN_GPU:
h100, h200 or b200; the local GPU when there is one), a verdict with headroom kept, and, when the
layout does not fit, the smallest changes of launcher variables that do. Megatron's own output
during a dry run goes to a log file so that the plan is printed on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import itertools
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from models.spec import ModelShape

# What each --expert-gemm choice runs, for the plan.
EXPERT_GEMMS = {
    "te": "TE grouped linear layers (one GEMM per expert on Hopper with cuBLASLt < 13.4)",
    "torch": "one torch grouped GEMM over all experts, their weights stacked in one parameter "
    "per layer (grouped_gemm_experts.py)",
}
GIB = 1024**3
# Kept free of the estimate: the CUDA context, NCCL buffers, allocator fragmentation, and the
# parts of the model the estimate leaves out (vision activations, MoE dispatch buffers).
HEADROOM = 0.10
PLAN_GPU = "PLAN_GPU"
DRY_RUN_LOG = "dry_run_megatron.log"


@dataclass(frozen=True)
class PlannedGpu:
    """The GPU a plan is for; megatron's device queries read name, capability and memory."""

    name: str
    total_memory: int  # bytes
    major: int
    minor: int


GPUS = {
    "h100": PlannedGpu("NVIDIA H100 80GB HBM3", 80 * GIB, 9, 0),
    "h200": PlannedGpu("NVIDIA H200", 141 * GIB, 9, 0),
    "b200": PlannedGpu("NVIDIA B200", 180 * GIB, 10, 0),
}
DEFAULT_GPU = "h100"


def planned_gpu(environ: Mapping[str, str] = os.environ) -> PlannedGpu:
    """PLAN_GPU's GPU when set; else the local GPU; else an H100."""
    choice = environ.get(PLAN_GPU, "")
    if choice:
        if choice.lower() not in GPUS:
            raise ValueError(f"{PLAN_GPU}={choice}: use one of {', '.join(GPUS)}")
        return GPUS[choice.lower()]
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return PlannedGpu(props.name, props.total_memory, props.major, props.minor)
    return GPUS[DEFAULT_GPU]


@contextlib.contextmanager
def planning_device(dry_run: bool) -> Iterator[None]:
    """For a CPU dry run, answer megatron's device queries during argument validation (compute
    capability gates grouped GEMM and CUDA_DEVICE_MAX_CONNECTIONS checks) as the planned GPU
    would; a real run, or a dry run on a GPU, asks the real device."""
    import torch

    if not dry_run or torch.cuda.is_available():
        yield
        return
    gpu = planned_gpu()
    real = torch.cuda.get_device_capability, torch.cuda.get_device_properties
    torch.cuda.get_device_capability = lambda device=None: (gpu.major, gpu.minor)
    torch.cuda.get_device_properties = lambda device=None: gpu
    try:
        yield
    finally:
        torch.cuda.get_device_capability, torch.cuda.get_device_properties = real


# ---- megatron's output during a dry run ----------------------------------------------------


def dry_run_log_path(argv: list[str], environ: Mapping[str, str] = os.environ) -> str:
    """Where a dry run puts megatron's output: RUN_DIR, else the directory above
    --tensorboard-dir (the launcher's default layout), else the temporary directory."""
    run_dir = environ.get("RUN_DIR")
    if not run_dir:
        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        parser.add_argument("--tensorboard-dir", default=None)
        tensorboard = parser.parse_known_args(argv)[0].tensorboard_dir
        run_dir = os.path.dirname(os.path.abspath(tensorboard)) if tensorboard else None
    run_dir = run_dir or tempfile.gettempdir()
    os.makedirs(run_dir, exist_ok=True)
    return os.path.join(run_dir, DRY_RUN_LOG)


@contextlib.contextmanager
def output_to(path: str, mode: str = "a") -> Iterator[None]:
    """Send this process's stdout and stderr to `path` for the duration: file descriptors 1 and
    2 (C++ logs, streams opened on them) and sys.stdout / sys.stderr (Python prints and
    warnings, wherever those objects write); restored on the way out, errors included."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with (
            open(path, mode, buffering=1) as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


# ---- layouts and their memory ----------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A parallel layout and batch shape in the launcher's terms (world = NNODES x
    GPUS_PER_NODE). megatron lays dense weights out over TP x CP x DP x PP and experts over
    ETP x EP x expert-DP x PP; `etp` None means ETP = TP, megatron's default."""

    nnodes: int = 1
    gpus_per_node: int = 1
    tp: int = 1
    cp: int = 1
    ep: int = 1
    pp: int = 1
    etp: int | None = None
    mbs: int = 1
    seq_length: int = 4096
    packed: bool = False
    fsdp: bool = False
    fsdp_strategy: str = "optim_grads_params"
    recompute: bool = False
    distributed_optimizer: bool = True
    # Sequence parallelism whenever TP > 1 (what the launcher passes); False keeps it off.
    sequence_parallel: bool = True

    @property
    def world(self) -> int:
        return self.nnodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def expert_dp(self) -> int:
        return self.world // (self.expert_tp * self.ep * self.pp)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Layout:
        """The layout of megatron's parsed arguments; the node split of the world comes from
        the launcher's NNODES / GPUS_PER_NODE when they multiply to it, else one node."""
        world = args.world_size
        nnodes, per_node = _env_int(environ, "NNODES"), _env_int(environ, "GPUS_PER_NODE")
        if not (nnodes and per_node and nnodes * per_node == world):
            nnodes, per_node = 1, world
        tp = args.tensor_model_parallel_size
        etp = args.expert_tensor_parallel_size
        return cls(
            nnodes=nnodes,
            gpus_per_node=per_node,
            tp=tp,
            cp=args.context_parallel_size,
            ep=args.expert_model_parallel_size,
            pp=args.pipeline_model_parallel_size,
            etp=None if etp in (None, tp) else etp,
            mbs=args.micro_batch_size,
            seq_length=args.total_seq_length,
            packed=args.packed_sequence,
            fsdp=args.use_megatron_fsdp,
            fsdp_strategy=args.data_parallel_sharding_strategy,
            recompute=args.recompute_granularity == "full",
            distributed_optimizer=args.use_distributed_optimizer,
            sequence_parallel=args.sequence_parallel or tp == 1,
        )


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, ""))
    except ValueError:
        return 0


def memory_plan(layout: Layout, model: ModelShape) -> dict[str, float]:
    """Rough per-GPU memory in GiB: bf16 weights, fp32 gradients, Adam state (fp32 master, m,
    v) sharded by the distributed optimizer or megatron-fsdp, and activations.

    Dense weights split over TP, routed experts over EP x ETP. The optimizer shards dense state
    over DP x CP and expert state over the expert data-parallel ranks (world / (ETP x EP x PP)).
    """
    local_dense = model.dense / layout.tp
    local_experts = model.experts / (layout.ep * layout.expert_tp)
    params = local_dense + local_experts
    if layout.distributed_optimizer or layout.fsdp:
        shard = local_dense / (layout.dp * layout.cp) + local_experts / layout.expert_dp
    else:
        shard = params
    fsdp_params = layout.fsdp and layout.fsdp_strategy == "optim_grads_params"
    fsdp_grads = layout.fsdp and layout.fsdp_strategy in ("optim_grads", "optim_grads_params")
    tokens = layout.mbs * layout.seq_length / layout.cp
    split = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    # Bytes per token and hidden unit: ~18 per sub-layer kept for backward; with full
    # recomputation only each sub-layer's bf16 input (2), plus one sub-layer recomputed at a time.
    per_unit = 2 * model.layers + 18 if layout.recompute else 18 * model.layers
    # fp32 logits of the whole sequence (the output layer gathers it), vocabulary split over TP.
    logits = tokens * model.vocab / layout.tp * 4
    return {
        "weights (bf16)": 2 * (shard if fsdp_params else params) / GIB,
        "gradients (fp32)": 4 * (shard if fsdp_grads else params) / GIB,
        "optimizer (fp32 master + Adam m, v)": 12 * shard / GIB,
        "activations (rough)": (tokens / split * model.hidden * per_unit + logits) / GIB,
    }


def layout_problem(layout: Layout, model: ModelShape, global_batch: int | None = None) -> str:
    """Why megatron or the model refuses `layout` ('' when it is accepted)."""
    from arguments import model_layout_problem, sequence_multiple

    tp, cp, ep, pp, world = layout.tp, layout.cp, layout.ep, layout.pp, layout.world
    if world % (tp * cp * pp):
        return f"world {world} is not divisible by TP x CP x PP"
    if world % (layout.expert_tp * ep * pp):
        return f"world {world} is not divisible by ETP x EP x PP"
    if model.attention_heads % tp or model.query_groups % tp:
        return f"TP {tp} does not divide the attention heads and query groups"
    problem = model_layout_problem(model, "the model", tp, cp, ep, layout.recompute)
    if problem:
        return problem
    if cp > 1 and layout.seq_length % (2 * cp):
        return f"sequence length {layout.seq_length} is not a multiple of 2 x CP"
    multiple = sequence_multiple(tp, cp, layout.sequence_parallel)
    if not layout.packed and layout.seq_length % multiple:
        return f"sequence length {layout.seq_length} is not a multiple of {multiple}"
    if global_batch and global_batch % (layout.mbs * layout.dp):
        return f"GBS {global_batch} is not a multiple of MBS x DP"
    return ""


def total_bytes(layout: Layout, model: ModelShape) -> float:
    return sum(memory_plan(layout, model).values()) * GIB


def usable_bytes(gpu: PlannedGpu) -> float:
    return gpu.total_memory * (1 - HEADROOM)


# Launcher variable -> Layout field, in the order suggestions print them.
KNOBS = {
    "NNODES": "nnodes",
    "GPUS_PER_NODE": "gpus_per_node",
    "TP": "tp",
    "CP": "cp",
    "EP": "ep",
    "FSDP": "fsdp",
    "RECOMPUTE": "recompute",
    "MBS": "mbs",
}
MAX_GPUS = 4096
NODE_GPUS = 8  # GPUs per node assumed when a suggestion adds nodes


@dataclass(frozen=True)
class Suggestion:
    """Launcher variables to change (name -> new value) and the estimate they give, GiB."""

    changes: dict[str, int]
    layout: Layout
    gib: float

    def assignments(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.changes.items())


def _gpu_counts(layout: Layout) -> list[tuple[int, int]]:
    """(NNODES, GPUS_PER_NODE) to try: the current ones, a fuller node, then twice, four
    times, ... as many full nodes."""
    nodes, per_node = layout.nnodes, layout.gpus_per_node
    counts = [(nodes, per_node)] + [(nodes, g) for g in (2, 4, NODE_GPUS) if g > per_node]
    full = max(per_node, NODE_GPUS)
    more = 2 * nodes
    while more * full <= MAX_GPUS:
        counts.append((more, full))
        more *= 2
    return counts


def _powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(limit)) + 1)] if limit >= 1 else [1]


def suggest_layouts(
    layout: Layout,
    model: ModelShape,
    budget: float,
    *,
    fixed: frozenset[str] = frozenset(),
    global_batch: int | None = None,
    limit: int = 3,
) -> list[Suggestion]:
    """The smallest changes of launcher variables (KNOBS, less the `fixed` ones) after which
    `layout` is accepted and its estimate fits in `budget` bytes: fewest changed variables
    first, then fewest GPUs, then the smallest change. A suggestion that changes the variables
    of one already listed (and maybe more) on as many GPUs or more is left out: the listed one
    is the smaller change."""

    def options(knob: str, values: list[Any]) -> list[Any]:
        current = getattr(layout, KNOBS[knob])
        return [current] if knob in fixed else sorted({current, *values})

    grid = {
        "TP": options("TP", _powers_of_two(8)),
        "CP": options("CP", _powers_of_two(16)),
        "EP": options("EP", _powers_of_two(model.num_experts) if model.num_experts else [1]),
        "FSDP": options("FSDP", [False, True]),
        "RECOMPUTE": options("RECOMPUTE", [False, True]),
        "MBS": options("MBS", _powers_of_two(layout.mbs)),
    }
    found: list[tuple[tuple[float, ...], Suggestion]] = []
    for nnodes, per_node in _gpu_counts(layout):
        for values in itertools.product(*grid.values()):
            fields = {KNOBS[knob]: value for knob, value in zip(grid, values, strict=True)}
            candidate = dataclasses.replace(layout, nnodes=nnodes, gpus_per_node=per_node, **fields)
            changes = {
                knob: int(getattr(candidate, field))
                for knob, field in KNOBS.items()
                if getattr(candidate, field) != getattr(layout, field)
            }
            if not changes or layout_problem(candidate, model, global_batch):
                continue
            needed = total_bytes(candidate, model)
            if needed > budget:
                continue
            # A switched boolean counts as one doubling.
            distance = sum(
                abs(math.log2(max(1, value) / max(1, int(getattr(layout, KNOBS[knob])))))
                if knob not in ("FSDP", "RECOMPUTE")
                else 1.0
                for knob, value in changes.items()
            )
            rank = (len(changes), candidate.world, distance, needed)
            found.append((rank, Suggestion(changes, candidate, needed / GIB)))
    found.sort(key=lambda item: item[0])
    chosen: list[Suggestion] = []
    for _, suggestion in found:
        if any(
            kept.changes.keys() <= suggestion.changes.keys()
            and kept.layout.world <= suggestion.layout.world
            for kept in chosen
        ):
            continue
        chosen.append(suggestion)
        if len(chosen) == limit:
            break
    return chosen


def fixed_knobs(args: argparse.Namespace) -> frozenset[str]:
    """Launcher variables a suggestion may not change: a checkpoint to load fixes FSDP (its
    format), and an fsdp_dtensor checkpoint TP too (megatron-core 0.19 stores it at TP=1)."""
    fixed = {"FSDP"} if args.load else set()
    if args.load and args.use_megatron_fsdp:
        fixed.add("TP")
    return frozenset(fixed)


def user_global_batch(environ: Mapping[str, str] = os.environ) -> int | None:
    """GBS when the user set it (the launcher's default follows MBS and DP by itself)."""
    return _env_int(environ, "GBS") or None


# ---- the printed plan ------------------------------------------------------------------------


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def validate_model_configs(args: argparse.Namespace, config: Any) -> list[str]:
    """Build the language and vision TransformerConfigs on the CPU (their validation runs);
    returns the flags that could not be checked without Transformer Engine."""
    from megatron.training.arguments import core_transformer_config_from_args

    from models import get_model_spec

    config_args, skipped = args, []
    if not have_transformer_engine():
        # TransformerConfig refuses TE-kernel fusions without TE; they are checked on the GPU.
        config_args = copy.copy(args)
        for flag in ("moe_permute_fusion", "moe_router_fusion"):
            if getattr(args, flag, False):
                setattr(config_args, flag, False)
                skipped.append("--" + flag.replace("_", "-"))
    get_model_spec(args.model_name).transformer_configs(
        config,
        core_transformer_config_from_args(config_args),
        args.recompute_vision,
        args.vision_cuda_graph_patches > 0,
    )
    return skipped


def print_dry_run_plan(args: argparse.Namespace, config: Any, log_path: str) -> str:
    """Validate the model configs (megatron's output to `log_path`) and print the plan; returns
    '' when the layout fits the planned GPU, else a one-line reason to exit with."""
    from arguments import model_config_from_args, pad_multiple
    from models import get_model_spec

    spec = get_model_spec(args.model_name)
    with output_to(log_path):
        skipped = validate_model_configs(args, config)
        provider = spec.dataset_provider(args.dataset_provider)
        data = provider.describe(args, model_config_from_args(args))
    layout, model, gpu = Layout.from_args(args), spec.shape(config), planned_gpu()
    if args.use_megatron_fsdp:
        sharding = f"megatron-fsdp ({args.data_parallel_sharding_strategy})"
    else:
        sharding = "distributed optimizer" if args.use_distributed_optimizer else "DDP"
    mode = "THD packed" if args.packed_sequence else "BSHD padded"
    lines = [
        f"DRY RUN {args.model_name} / {config.name} ({config.source})",
        f"  parallel layout: world {layout.world} = TP {layout.tp} x CP {layout.cp} x PP "
        f"{layout.pp} x DP {layout.dp}; EP {layout.ep} x ETP {layout.expert_tp} x expert-DP "
        f"{layout.expert_dp}; sequence parallel {'on' if args.sequence_parallel else 'off'}; "
        f"{sharding}",
        f"  batch: micro {args.micro_batch_size}, global {args.global_batch_size}, "
        f"{args.total_seq_length} tokens per sample, {mode}, pad multiple {pad_multiple(args)}",
        *(f"  {line}" for line in spec.describe(config)),
        *(
            [f"  routed experts' GEMMs: {EXPERT_GEMMS[args.expert_gemm]} (EXPERT_GEMM)"]
            if model.num_experts
            else []
        ),
        *(f"  data: {line}" for line in data),
        "  memory per GPU (estimate, GiB):",
    ]
    plan = memory_plan(layout, model)
    lines += [f"    {name:38s} {value:9.2f}" for name, value in plan.items()]
    needed, usable = sum(plan.values()), usable_bytes(gpu) / GIB
    lines.append(f"    {'total':38s} {needed:9.2f}")
    fits = needed <= usable
    lines.append(
        f"    {'fits' if fits else 'does NOT fit'} in {gpu.name}: {usable:.1f} of its "
        f"{gpu.total_memory / GIB:.0f} GiB usable ({HEADROOM:.0%} kept as headroom); "
        f"{PLAN_GPU}={'|'.join(GPUS)} plans for another GPU"
    )
    suggestions: list[Suggestion] = []
    if not fits:
        suggestions = suggest_layouts(
            layout,
            model,
            usable_bytes(gpu),
            fixed=fixed_knobs(args),
            global_batch=user_global_batch(),
        )
        if suggestions:
            lines.append("  smallest changes that fit (launcher variables; estimate, GiB per GPU):")
            lines += [f"    {s.assignments():38s} {s.gib:9.2f}" for s in suggestions]
        else:
            lines.append(
                f"  no layout of up to {MAX_GPUS} GPUs fits (TP, CP, EP, FSDP, RECOMPUTE, MBS, "
                "NNODES searched)"
            )
    if skipped:
        lines.append(f"  not checked without Transformer Engine: {', '.join(skipped)}")
    lines.append(f"  megatron's argument dump and warnings: {log_path}; no TensorBoard files")
    lines.append("  megatron arguments and model configs validated on the CPU; exiting (DRY_RUN)")
    print("\n".join(lines), flush=True)
    if fits:
        return ""
    advice = (
        f"one of: {'; '.join(s.assignments() for s in suggestions)}"
        if suggestions
        else "a larger GPU (PLAN_GPU) or a shorter SEQ_LEN"
    )
    return (
        f"the layout needs {needed:.1f} GiB per GPU, more than the {usable:.1f} GiB usable on "
        f"{gpu.name}; set {advice}"
    )

"""Training throughput of our megatron Qwen3.5-VL against HF transformers, in one process on one
GPU: the same config (9B widths, or with --model moe the 35B-A3B widths: 256 experts, top-8,
shared expert; 3:1 Gated DeltaNet:attention, fewer layers), the same THD pack of mixed-length
samples with images, bf16. Reports tokens/s/GPU, model TFLOP/s/GPU and MFU for
each side and the ratio, as one JSON line (plus a markdown row for docs/results.md); with
--profile DIR also a torch-profiler trace of our steps and its time split (profile_summary.py).
Under `torchrun --nproc-per-node N` ours runs with context parallelism N (HF, which has none,
still gets one GPU for the whole row, and may run out of memory: that is reported as such), or
with `--expert-parallel N` the MoE with expert parallelism N: every GPU trains on its own copy of
the pack (data parallel for the dense weights, the experts split between the GPUs).

    python scripts/bench/bench_vs_hf.py --layers 8 --pack-tokens 8192 --iters 10 [--profile DIR]
    python scripts/bench/bench_vs_hf.py --layers 8 --layout row   # ours on HF's exact row
    python scripts/bench/bench_vs_hf.py --model moe --layers 4      # a 35B-A3B slice
    torchrun --nproc-per-node 2 scripts/bench/bench_vs_hf.py --layers 4 --pack-tokens 32768
    python scripts/bench/bench_vs_hf.py --model moe --layers 4 --expert-gemm te
    torchrun --nproc-per-node 2 scripts/bench/bench_vs_hf.py --model moe --layers 4 \
        --expert-parallel 2
    python scripts/bench/bench_vs_hf.py --model moe --layers 4 --skip-hf --sync-sites \
        --config moe_router_dtype=fp32   # a megatron setting; where the host waits per step
    python scripts/bench/bench_vs_hf.py --layers 8 \
        --optimizer-config use_precision_aware_optimizer=True   # a megatron optimizer setting
    python scripts/bench/bench_vs_hf.py --layers 8 --vision-cuda-graph  # VISION_CUDA_GRAPH=1
    python scripts/bench/bench_vs_hf.py --model moe --layers 4 --micro-batches 4  # 4 packs a step

Ours, set up as training is: megatron DDP with the distributed optimizer (fp32 master weights and
grads, bf16 compute), every linear layer (the output layer too) accumulating its weight gradient
into the fp32 grads in TE's GEMM and the word embedding adding its looked-up rows' gradients there
(`--wgrad-fusion off`: megatron DDP adds them), TE's fused cross
entropy, fla kernels, the launcher's MoE fusions (fused router and permutation, the stacked
experts' grouped GEMM of EXPERT_GEMM=auto), packed THD (or, with --layout row, HF's single BSHD
row). HF: `Qwen3_5ForConditionalGeneration` (`Qwen3_5MoeForConditionalGeneration` with its
grouped_mm experts) in pure bf16 with fused AdamW and sdpa attention (fla kernels when installed);
the pack is one 8192-token row there, as HF has no packed-sequence path for Qwen3.5. FLOPs come
from models/qwen35_vl/flops.py (3 x forward; the MoE counts active experts only). A step is one
optimizer step; with --micro-batches N both sides accumulate the gradients of N forward and
backward passes over the pack before it, as training with a global batch of N packs does.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import json
import math
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from data.collate import BSHD, THD, CollateConfig, pack_or_pad_batch  # noqa: E402
from data.mock import interleaved_sample  # noqa: E402
from data.throughput import mfu, peak_tflops_of  # noqa: E402
from models.qwen35_vl.configuration import get_variant, interleaved_layer_types  # noqa: E402
from models.qwen35_vl.flops import training_flops  # noqa: E402
from models.qwen35_vl.vision_inputs import SampleInputs  # noqa: E402
from scripts.bench.sync_sites import sites_markdown, synchronising_call_sites  # noqa: E402

# (text segment lengths, image sizes (h, w)): mixed lengths, 1-2 images each.
PACK_SAMPLES = [
    ((900, 1500), ((448, 448),)),
    ((300, 600, 400), ((224, 320), (320, 224))),
    ((1200, 700), ((256, 384),)),
    ((500, 300), ((384, 256),)),
]


BENCH_VARIANTS = {"dense": "9b", "moe": "35b_a3b"}


def bench_config(layers: int, model: str = "dense"):
    """The released widths of the 9B (dense) or 35B-A3B (moe) with `layers` decoder layers in the
    released 3:1 pattern, no MTP."""
    released = get_variant(BENCH_VARIANTS[model])
    text = dataclasses.replace(
        released.text,
        num_hidden_layers=layers,
        layer_types=interleaved_layer_types(layers),
        mtp_num_hidden_layers=0,
    )
    name = f"{released.name}-widths-{layers}-layers"
    return dataclasses.replace(released, name=name, text=text)


def make_pack(config, pack_tokens: int, cp: int = 1) -> tuple[list[dict], dict]:
    """Samples filling `pack_tokens` (the last one is trimmed/extended with text), packed with
    every sequence padded to a multiple of 8 (and of 2 x CP, for the load-balanced CP split)."""
    samples = [
        interleaved_sample(config, seed, lengths, images)
        for seed, (lengths, images) in enumerate(PACK_SAMPLES)
    ]
    used = sum(s["input_ids"].numel() for s in samples[:-1])
    last_text = pack_tokens - used - (samples[-1]["input_ids"].numel() - sum(PACK_SAMPLES[-1][0]))
    lengths, images = PACK_SAMPLES[-1]
    samples[-1] = interleaved_sample(config, 99, (lengths[0], last_text - lengths[0]), images)
    return samples, pack_or_pad_batch(samples, bench_collate(config, THD, pack_tokens, cp))


def joined_sample(samples: list[dict]) -> dict:
    """The samples as one sequence: what HF trains on, as it has no packed-sequence path."""
    return {
        key: torch.cat([s[key] for s in samples])
        for key in ("input_ids", "supervised", "image_grid_thw", "pixel_values")
    }


def make_row(config, samples: list[dict], cp: int = 1) -> dict:
    """The samples joined into one BSHD row, exactly what HF trains on (attention and MRoPE
    positions run across the former sample boundaries)."""
    joined = joined_sample(samples)
    multiple = math.lcm(8, 2 * cp)
    row_length = -(-joined["input_ids"].numel() // multiple) * multiple
    return pack_or_pad_batch([joined], bench_collate(config, BSHD, row_length, cp))


def bench_collate(config, mode: str, seq_length: int, cp: int) -> CollateConfig:
    """Sequences padded to a multiple of 8 and of 2 x CP (the load-balanced CP split)."""
    return CollateConfig(
        mode=mode,
        seq_length=seq_length,
        pad_token_id=0,
        model_inputs=SampleInputs.of(config),
        pad_multiple=math.lcm(8, 2 * cp),
    )


def time_steps(step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def megatron_side(
    config,
    batch,
    warmup: int,
    iters: int,
    cp: int = 1,
    profile_dir: str = "",
    wgrad_fusion: bool = True,
    config_overrides: dict[str, dict] | None = None,
    sync_sites: bool = False,
    expert_gemm: str = "torch",
    profile_python: bool = False,
    ep: int = 1,
    vision_cuda_graph: bool = False,
    fold_token_scaling: bool = True,
    micro_batches: int = 1,
) -> dict:
    """Our training step; under CP each rank takes its share of the pack (forward_step's
    partition), under EP each rank its own copy of it; the step is timed on every rank."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from forward_step import loss_func, partition_for_context_parallel, run_model, to_device
    from megatron_compat import (
        PATCHES,
        apply_patches,
        fold_token_scaling_into_gradient_clipping,
        fuse_wgrad_accumulation_into_main_grad,
    )
    from models.qwen35_vl.factory import build_model

    config_overrides = config_overrides or {}
    skipped = () if fold_token_scaling else (fold_token_scaling_into_gradient_clipping,)
    apply_patches(tuple(p for p in PATCHES if p.apply not in skipped))
    parallel_state.initialize_model_parallel(
        context_parallel_size=cp, expert_model_parallel_size=ep
    )
    # TE's attention refuses CUDA graph capture under any RNG tracker but TE's (--te-rng-tracker).
    model_parallel_cuda_manual_seed(1234, te_rng_tracker=vision_cuda_graph)
    vision = batch["vision"]
    # The pack's patches rounded up to a multiple of 256, as a launcher budget would round.
    graph_budget = {}
    if vision_cuda_graph:
        graph_budget = dict(
            vision_graph_patches=-(-vision.pixel_values.shape[0] // 256) * 256,
            vision_graph_images=vision.grid_thw.shape[0],
        )
    settings = dict(
        num_layers=2,
        hidden_size=config.text.hidden_size,
        num_attention_heads=config.text.num_attention_heads,
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        calculate_per_token_loss=True,
        cross_entropy_loss_fusion=True,
        cross_entropy_fusion_impl="te",
        bias_dropout_fusion=True,
        # megatron's --bias-swiglu-fusion default, which training keeps (unset, the config's
        # default runs SwiGLU as separate kernels).
        bias_activation_fusion=True,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        # megatron validates expert parallelism against the expert count in this base already.
        num_moe_experts=config.text.num_experts if config.text.is_moe else None,
        # The launcher's MoE settings (run_qwen35_vl.sh); unused by a dense model.
        moe_router_fusion=True,
        moe_permute_fusion=True,
        moe_router_dtype="fp32",
    )
    base = TransformerConfig(**{**settings, **config_overrides.get("model", {})})
    model = build_model(
        config, base, ProcessGroupCollection.use_mpu_process_groups(), **graph_budget
    ).cuda()
    if wgrad_fusion:
        ddp = argparse.Namespace(
            gradient_accumulation_fusion=False, use_megatron_fsdp=False, use_torch_fsdp2=False
        )
        fuse_wgrad_accumulation_into_main_grad(model, ddp)
    if expert_gemm == "torch" and config.text.is_moe:
        from grouped_gemm_experts import use_torch_grouped_gemm

        use_torch_grouped_gemm(model)
    model.model_type = ModelType.encoder_or_decoder  # read by the schedule, set as get_model does
    language = model.language_model.config
    model = Float16Module(language, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True
    )
    model = DistributedDataParallel(language, ddp_config, model)
    optimizer_settings = dict(
        optimizer="adam", lr=1e-5, bf16=True, use_distributed_optimizer=True, clip_grad=1.0
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(**{**optimizer_settings, **config_overrides.get("optimizer", {})}),
        [model],
    )
    language.finalize_model_grads_func = finalize_model_grads
    language.no_sync_func = model.no_sync
    gpu_batch = partition_for_context_parallel(
        to_device(batch, torch.device("cuda")), parallel_state.get_context_parallel_group()
    )
    forward_backward = get_forward_backward_func()

    def forward(data_iterator, model):
        output = run_model(model, gpu_batch)
        return output, lambda output_tensor: loss_func(gpu_batch["loss_mask"], output_tensor)

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(
            forward_step_func=forward,
            data_iterator=iter(()),
            model=[model],
            num_microbatches=micro_batches,
            seq_length=gpu_batch["input_ids"].shape[1],
            micro_batch_size=1,
        )
        optimizer.step()

    seconds = time_steps(step, warmup, iters)
    memory = torch.cuda.max_memory_allocated() / 2**30
    # Whether the timed steps ran the fold (megatron_compat refuses it where it cannot hold).
    folded = all(getattr(buffer, "folds_token_scaling", False) for buffer in model.buffers)
    vision = model.module.module.vision
    vision_inputs = gpu_batch["vision"]

    def vision_step():
        with model.no_sync():  # gradients only accumulate; no data-parallel reduction
            vision(vision_inputs).float().sum().backward()

    # The vision tower's share of a step, timed alone on the same images (forward + backward).
    vision_seconds = time_steps(vision_step, 1, iters)
    model.zero_grad_buffer()
    if profile_dir:
        profile_steps(step, profile_dir, with_stack=profile_python)
    if sync_sites:
        sites = synchronising_call_sites(step)
        if torch.distributed.get_rank() == 0:
            print(sites_markdown(sites), flush=True)
    parallel_state.destroy_model_parallel()
    return {
        "step_seconds": seconds,
        "max_memory_gib": memory,
        "vision_seconds": vision_seconds,
        "vision_graph_budget": graph_budget,
        "token_scaling_folded": folded,
    }


def profile_steps(step, profile_dir: str, steps: int = 3, with_stack: bool = False) -> None:
    """Profile `steps` training steps, write the Chrome trace and print where the time goes;
    `with_stack` records Python functions too (slower steps, but idle time then names them)."""
    from scripts.bench.profile_summary import summary_markdown

    os.makedirs(profile_dir, exist_ok=True)
    path = os.path.join(profile_dir, "megatron.pt.trace.json")
    rank0 = torch.distributed.get_rank() == 0
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps)
    # Exported by on_trace_ready when the active steps end, as megatron's profiler does (its
    # PROFILE=torch traces hold the kernels); the export after the context closed held none.
    with torch.profiler.profile(
        activities=activities,
        schedule=schedule,
        on_trace_ready=(lambda profiler: profiler.export_chrome_trace(path)) if rank0 else None,
        with_stack=with_stack,
    ) as profiler:
        for _ in range(steps + 1):
            step()
            torch.cuda.synchronize()
            profiler.step()
    if not rank0:
        return
    with open(path) as handle:
        summary = summary_markdown(json.load(handle))
    print(f"profile of {steps} megatron steps on rank 0 ({path}):\n{summary}", flush=True)


def hf_side(
    config, samples, warmup: int, iters: int, checkpointing: bool = False, micro_batches: int = 1
) -> dict:
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    hf_config = config.to_hf_config(attn_implementation="sdpa")
    hf_class, options = Qwen3_5ForConditionalGeneration, {}
    if config.text.is_moe:  # HF's fastest expert path: one grouped GEMM over all experts
        hf_class = Qwen3_5MoeForConditionalGeneration
        options = {"experts_implementation": "grouped_mm"}
    with torch.device("cuda"):
        model = hf_class._from_config(hf_config, dtype=torch.bfloat16, **options)
    model.train()
    if checkpointing:  # HF's own way to fit long rows on one GPU: recompute each layer
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    joined = joined_sample(samples)
    ids = joined["input_ids"].unsqueeze(0).cuda()
    # The pack's supervised tokens as HF's targets (HF shifts them itself): the loss our side
    # takes. HF still projects every position onto the vocabulary.
    labels = ids.masked_fill(~joined["supervised"].unsqueeze(0).cuda(), -100)
    inputs = dict(
        input_ids=ids,
        labels=labels,
        mm_token_type_ids=(ids == config.image_token_id).int(),
        pixel_values=joined["pixel_values"].cuda(),
        image_grid_thw=joined["image_grid_thw"].cuda(),
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            (model(**inputs).loss / micro_batches).backward()
        optimizer.step()

    seconds = time_steps(step, warmup, iters)
    return {"step_seconds": seconds, "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--model", choices=tuple(BENCH_VARIANTS), default="dense")
    parser.add_argument(
        "--wgrad-fusion",
        choices=("te", "off"),
        default="te",
        help="the linear layers accumulate weight gradients in TE's GEMM and the embedding its "
        "rows' gradients into the fp32 grads (te, as training does) or megatron adds them (off)",
    )
    parser.add_argument(
        "--token-scaling",
        choices=("fold", "megatron"),
        default="fold",
        help="the 1 / tokens gradient scaling folded into the clipping (fold, as training "
        "does) or applied by megatron's finalize_model_grads before it (megatron)",
    )
    parser.add_argument("--pack-tokens", type=int, default=8192)
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        metavar="N",
        help="forward and backward passes over the pack per optimizer step, gradients "
        "accumulated (training's GBS / MBS); tokens and FLOPs count all N",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--hf-activation-checkpointing",
        action="store_true",
        help="HF recomputes each layer in backward (its setting for rows too long for one GPU)",
    )
    parser.add_argument("--profile", default="", help="directory for a profile of our steps")
    parser.add_argument(
        "--profile-python",
        action="store_true",
        help="with --profile: record Python stacks, so that idle GPU time is charged to the "
        "Python function under way (the profiled steps run slower, and the trace of four MoE "
        "layers is 600 MB: read it with profile_summary.py --min-python-us 20)",
    )
    parser.add_argument(
        "--sync-sites",
        action="store_true",
        help="after timing, count where one of our steps makes the host wait for the GPU",
    )
    parser.add_argument(
        "--expert-gemm",
        choices=("torch", "te"),
        default="torch",
        help="routed experts as stacked weights through torch's grouped GEMM "
        "(grouped_gemm_experts.py; training's EXPERT_GEMM=auto for this setup) or through TE's "
        "grouped linear layers, one GEMM per expert (EXPERT_GEMM=te)",
    )
    parser.add_argument(
        "--expert-parallel",
        type=int,
        default=1,
        metavar="N",
        help="with --model moe under `torchrun --nproc-per-node N`: expert parallelism N instead "
        "of context parallelism, each GPU training on its own copy of the pack",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a megatron TransformerConfig field for our side, e.g. "
        "use_transformer_engine_op_fuser=True (repeatable; recorded in the JSON)",
    )
    parser.add_argument(
        "--optimizer-config",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a megatron OptimizerConfig field for our side, e.g. "
        "use_precision_aware_optimizer=True (repeatable; recorded in the JSON)",
    )
    parser.add_argument(
        "--vision-cuda-graph",
        action="store_true",
        help="run the vision tower's layers as CUDA graphs (training's VISION_CUDA_GRAPH=1) on "
        "the pack's patches padded to a multiple of 256",
    )
    parser.add_argument(
        "--layout",
        choices=("pack", "row"),
        default="pack",
        help="ours on the THD pack (attention within each sample), or on HF's single BSHD row",
    )
    args = parser.parse_args()
    if args.profile_python and not args.profile:
        parser.error("--profile-python records stacks in a profile: add --profile DIR")
    if args.micro_batches < 1:
        parser.error(f"--micro-batches {args.micro_batches}: give 1 or more packs per step")
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    config_overrides = {
        "model": dict(parse_config_override(c, TransformerConfig, "--config") for c in args.config),
        "optimizer": dict(
            parse_config_override(c, OptimizerConfig, "--optimizer-config")
            for c in args.optimizer_config
        ),
    }

    # One GPU by default; under `torchrun --nproc-per-node N` ours runs with CP = N, or EP = N.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ep = args.expert_parallel
    if ep > 1 and (args.model != "moe" or world != ep):
        parser.error(
            f"--expert-parallel {ep} splits the experts of --model moe over the GPUs of "
            f"`torchrun --nproc-per-node {ep}` (this run: --model {args.model}, {world} processes)"
        )
    cp = 1 if ep > 1 else world
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Alone (no torchrun) the process group lives in memory: no port, so benchmarks can share
    # a machine.
    store = torch.distributed.HashStore() if "MASTER_PORT" not in os.environ else None
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world, store=store)
    config = bench_config(args.layers, args.model)
    samples, batch = make_pack(config, args.pack_tokens, cp=cp)
    lengths = [s["input_ids"].numel() for s in samples]
    if args.layout == "row":
        batch, lengths = make_row(config, samples, cp=cp), [sum(lengths)]
    grids = [tuple(g) for s in samples for g in s["image_grid_thw"].tolist()]
    tokens = sum(lengths)
    device = torch.cuda.get_device_name()
    peak = peak_tflops_of(device)
    if peak is None:
        raise SystemExit(
            f"no bf16 peak listed for {device!r} in data/throughput.py (PEAK_BF16_TFLOPS)"
        )

    # Our output layer projects only these (models/qwen35_vl/model.py); HF projects all.
    loss_tokens = int(batch["loss_mask"].sum())
    results = {
        "device": device,
        "config": config.name,
        "tokens_per_step": tokens * args.micro_batches,
        "micro_batches": args.micro_batches,
        "loss_tokens_per_step": loss_tokens * args.micro_batches,
        "peak": peak,
        "megatron_gpus": world,
        "megatron_cp": cp,
        "megatron_ep": ep,
        "megatron_layout": args.layout,
        "megatron_wgrad_fusion": args.wgrad_fusion,
        "megatron_token_scaling": args.token_scaling,
        "megatron_config": {k: repr(v) for k, v in config_overrides["model"].items()},
        "megatron_optimizer_config": {k: repr(v) for k, v in config_overrides["optimizer"].items()},
        "megatron_expert_gemm": args.expert_gemm if config.text.is_moe else None,
        "megatron_vision_cuda_graph": args.vision_cuda_graph,
        "hf_activation_checkpointing": args.hf_activation_checkpointing,
        "cublaslt_version": cublaslt_version(),
        "nvte_environment": {k: v for k, v in os.environ.items() if k.startswith("NVTE_")},
    }
    torch.cuda.reset_peak_memory_stats()
    measured = megatron_side(
        config,
        batch,
        args.warmup,
        args.iters,
        cp,
        args.profile,
        args.wgrad_fusion == "te",
        config_overrides,
        args.sync_sites,
        args.expert_gemm,
        profile_python=args.profile_python,
        ep=ep,
        vision_cuda_graph=args.vision_cuda_graph,
        fold_token_scaling=args.token_scaling == "fold",
        micro_batches=args.micro_batches,
    )
    # HF attends over the whole row; ours over each packed sample (`pack`) or the same row. The
    # pack's tokens are shared by the CP ranks; under EP each rank trains on a whole pack.
    results["megatron"] = rates(
        measured, config, lengths, grids, tokens, cp, peak, loss_tokens, args.micro_batches
    )
    gc.collect()
    torch.cuda.empty_cache()
    if not args.skip_hf and rank == 0:
        # HF has no context parallelism: one GPU holds the whole row, whatever `world` is.
        torch.cuda.reset_peak_memory_stats()
        try:
            measured = hf_side(
                config,
                samples,
                args.warmup,
                args.iters,
                args.hf_activation_checkpointing,
                args.micro_batches,
            )
            results["hf"] = rates(
                measured, config, [tokens], grids, tokens, 1, peak, None, args.micro_batches
            )
            results["speedup_tokens_per_s"] = (
                results["megatron"]["tokens_per_s_per_gpu"] / results["hf"]["tokens_per_s_per_gpu"]
            )
        except torch.cuda.OutOfMemoryError:
            results["hf"] = {"error": f"out of memory on a {sum(lengths)}-token row on one GPU"}
    torch.distributed.barrier()
    if rank == 0:
        print(json.dumps(results), flush=True)
        for name, gpus, label in (
            ("megatron", world, f"megatron, {args.layout}" + (f", EP={ep}" if ep > 1 else "")),
            ("hf", 1, "hf, row"),
        ):
            r = results.get(name, {})
            if "mfu" in r:
                print(
                    f"| {device} | {label} | {gpus} | {config.name} | {tokens} | "
                    f"{r['tokens_per_s_per_gpu']:,.0f} | {r['model_tflops_per_gpu']:.0f} | "
                    f"{100 * r['mfu']:.1f}% | {r['max_memory_gib']:.1f} |"
                )
            elif r:
                print(f"| {device} | {label} | {gpus} | {config.name} | {tokens} | {r['error']} |")
    torch.distributed.destroy_process_group()


def parse_config_override(item: str, config_class: type, option: str) -> tuple[str, object]:
    """'FIELD=VALUE' -> (field, value) for a field of the dataclass `config_class` (given on the
    command line as `option`): VALUE as a Python literal (True, 4, 'fp32'), else as text."""
    field, separator, text = item.partition("=")
    if not separator or field not in {f.name for f in dataclasses.fields(config_class)}:
        raise SystemExit(
            f"{option} {item!r}: expected FIELD=VALUE with a {config_class.__name__} field"
        )
    try:
        return field, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return field, text


def cublaslt_version() -> int:
    """The cuBLASLt version Transformer Engine runs (TE's native grouped GEMM needs >= 13.4)."""
    import transformer_engine.pytorch  # noqa: F401  (loads the extension module below)
    import transformer_engine_torch

    return int(transformer_engine_torch.get_cublasLt_version())


def rates(
    measured: dict,
    config,
    seqs,
    grids,
    tokens: int,
    gpus: int,
    peak: float,
    loss_tokens: int | None = None,
    micro_batches: int = 1,
) -> dict:
    """tokens/s/GPU, model TFLOP/s/GPU and MFU of a measured step on `gpus` GPUs, the step
    being `micro_batches` passes over one pack of `seqs`, `grids`, `tokens` (and `loss_tokens`).
    The model FLOPs count the output layer on every token (megatron's and HF's convention); with
    `loss_tokens`, also the MFU of the FLOPs run when the output layer projects only those."""
    breakdown = training_flops(config, seqs, grids, include_mtp=False)
    flops = breakdown.total * micro_batches
    seconds = measured["step_seconds"]
    result = {
        **measured,
        "tokens_per_s_per_gpu": tokens * micro_batches / seconds / gpus,
        "model_tflops_per_gpu": flops / seconds / gpus / 1e12,
        "mfu": mfu(flops, seconds, gpus, peak),
    }
    if loss_tokens is not None:
        skipped = breakdown.lm_head * (tokens - loss_tokens) / tokens * micro_batches
        result["mfu_of_flops_run"] = mfu(flops - skipped, seconds, gpus, peak)
    return result


if __name__ == "__main__":
    main()

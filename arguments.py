"""Command-line flags of the playground, added to Megatron's parser, plus the checks that fail
early (before any GPU work) with a message naming the flag to change and the launcher's
environment variable behind it. `python -m arguments FLAGS...` is the launcher's model lookup.

`add_multimodal_args` is the `extra_args_provider` for megatron's `parse_and_validate_args`;
`architecture_argv` turns the chosen model into Megatron's architecture flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from models import get_model_spec

# The variable of scripts/run_qwen35_vl.sh behind each flag it sets, named in errors so that a
# launcher user knows what to change.
LAUNCHER_VARIABLES = {
    "--model-name": "MODEL",
    "--model-variant": "MODEL_VARIANT",
    "--dataset-provider": "DATASET",
    "--dataset-path": "DATA_PATH",
    "--hf-tokenizer-path": "HF_TOKENIZER_PATH",
    "--load": "CKPT_LOAD",
    "--mtp-num-layers": "MTP_NUM_LAYERS",
    "--tensor-model-parallel-size": "TP",
    "--context-parallel-size": "CP",
    "--expert-model-parallel-size": "EP",
    "--seq-length": "SEQ_LEN",
    "--expert-gemm": "EXPERT_GEMM",
    "--vision-cuda-graph-patches": "VISION_GRAPH_PATCHES",
    "--vision-cuda-graph-images": "VISION_GRAPH_IMAGES",
}
# A tokenizer directory holds at least one of these (AutoTokenizer reads them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TRACKER_FILE = "latest_checkpointed_iteration.txt"

DEFAULT_MIN_PIXELS = 4 * 32 * 32  # 4 merged tokens
DEFAULT_MAX_PIXELS = 1280 * 32 * 32  # 1280 merged tokens


def add_multimodal_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our flags; megatron's parser calls this with its own parser."""
    group = parser.add_argument_group("multimodal playground")
    group.add_argument("--model-name", default="qwen35_vl", help="registry entry to train")
    group.add_argument(
        "--model-variant", default="proxy", help="variant of --model-name (e.g. proxy, 9b, 397b)"
    )
    group.add_argument(
        "--hf-config-path",
        default=None,
        help="directory (or config.json) of a Hugging Face model of --model-name; overrides "
        "--model-variant so any released size can be trained",
    )
    group.add_argument("--dataset-provider", default="mock", help="dataset provider, e.g. mock")
    group.add_argument("--dataset-path", default=None, help="local dataset directory")
    group.add_argument(
        "--hf-tokenizer-path",
        default=None,
        help="local directory with the HF tokenizer and processor (chat template, special "
        "tokens, image processor)",
    )
    group.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    group.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    group.add_argument(
        "--total-seq-length",
        type=int,
        default=None,
        help="longest sample in tokens (BSHD pads to it); defaults to --seq-length",
    )
    group.add_argument(
        "--packed-sequence",
        action="store_true",
        help="pack each micro-batch into one THD row (cu_seqlens) instead of padding (BSHD)",
    )
    group.add_argument("--mock-max-images", type=int, default=3, help="images per mock sample")
    group.add_argument(
        "--skip-bad-samples",
        action="store_true",
        help="skip (and count) samples with a corrupt image or malformed annotation instead of "
        "stopping with an error",
    )
    group.add_argument(
        "--recompute-vision", action="store_true", help="recompute the vision tower in backward"
    )
    group.add_argument(
        "--vision-cuda-graph-patches",
        type=int,
        default=0,
        help="run the vision tower's layers as CUDA graphs (megatron-core's per-layer graphs) on "
        "every micro-batch's patches padded to this many rows; at least the most patches one "
        "micro-batch holds (0: eager)",
    )
    group.add_argument(
        "--vision-cuda-graph-images",
        type=int,
        default=16,
        help="with --vision-cuda-graph-patches: the most images (attention segments) one "
        "micro-batch holds",
    )
    group.add_argument(
        "--expert-gemm",
        choices=("auto", "te", "torch"),
        default="auto",
        help="routed experts' GEMMs: TE's grouped linear layers (te), or one torch grouped GEMM "
        "over all experts (torch; grouped_gemm_experts.py), for Hopper with cuBLASLt < 13.4 "
        "where TE issues one GEMM per expert; auto: torch for a MoE model where it serves the "
        "run (no megatron-fsdp, FP8, delayed weight gradients or expert TP), te otherwise",
    )
    group.add_argument(
        "--mask-im-end",
        action="store_true",
        help="keep the <|im_end|> closing each assistant answer out of the loss (by default it "
        "is trained, so that a fine-tuned model learns to stop)",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the configuration on the CPU, print the plan and exit",
    )
    return parser


def preparse(argv: list[str]) -> argparse.Namespace:
    """Our flags (and --mtp-num-layers) read before Megatron's parser, which needs the
    architecture flags derived from them."""
    parser = add_multimodal_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    parser.add_argument("--mtp-num-layers", type=int, default=None)
    parser.add_argument("--load", default=None)
    for size in ("--tensor-model-parallel-size", "--context-parallel-size"):
        parser.add_argument(size, type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=None)
    args, _ = parser.parse_known_args(argv)
    return args


def setting(flag: str, value: Any) -> str:
    """`VARIABLE=value (--flag)` for a flag the launcher sets, else `--flag value`."""
    variable = LAUNCHER_VARIABLES.get(flag)
    return f"{variable}={value} ({flag})" if variable else f"{flag} {value}"


def flag_value(flag: str, value: Any) -> str:
    """`--flag value (VARIABLE)`: a flag as given and the launcher variable that sets it."""
    variable = LAUNCHER_VARIABLES.get(flag)
    return f"{flag} {value}" + (f" ({variable})" if variable else "")


def model_config_from_args(args: argparse.Namespace) -> Any:
    """The model config selected by --model-name / --model-variant / --hf-config-path, with the
    MTP depth of --mtp-num-layers (variant default when unset)."""
    entry = get_model_spec(args.model_name)
    if args.hf_config_path:
        from transformers import AutoConfig

        path = args.hf_config_path
        if os.path.isfile(path):
            path = os.path.dirname(path) or "."
        if not os.path.isdir(path):
            raise ValueError(f"--hf-config-path {args.hf_config_path} does not exist")
        config = entry.from_hf_config(AutoConfig.from_pretrained(path), name=path)
    else:
        config = entry.get_variant(args.model_variant)
    if args.mtp_num_layers is not None:
        config = config.with_mtp_layers(args.mtp_num_layers)
    return config


# Architecture arguments our own flags choose (--mtp-num-layers sets the MTP depth of the model
# config itself), so a user's value is the model's by construction.
CHOSEN_BY_OUR_FLAGS = ("mtp_num_layers",)
# TransformerConfig fields that megatron's arguments hold under another name (its
# `core_transformer_config_from_args` maps them back).
ARGUMENT_OF_FIELD = {"num_moe_experts": "num_experts"}


def architecture_dests(spec: Any, config: Any) -> dict[str, Any]:
    """The architecture as megatron argument values by dest, from the spec's one source: the
    language `TransformerConfig` fields the factory builds from and the other model arguments."""
    import torch.nn.functional as F

    fields = dict(spec.language_fields(config))
    gated, activation = fields.pop("gated_linear_unit", False), fields.pop("activation_func", None)
    dests: dict[str, Any] = {}
    if gated and activation is F.silu:
        dests["swiglu"] = True
    elif gated or activation not in (None, F.gelu):
        raise ValueError(
            f"{spec.name}: megatron has no argument for the activation {activation} "
            f"(gated {gated}); use SwiGLU or GELU"
        )
    if fields.get("num_query_groups") is not None:
        dests["group_query_attention"] = True
    for name, value in fields.items():
        dests[ARGUMENT_OF_FIELD.get(name, name)] = value
    return dests | spec.model_args(config)


@functools.cache
def megatron_actions() -> dict[str, argparse.Action]:
    """megatron's command-line arguments by dest (its parser is built once per process)."""
    from megatron.training.arguments import add_megatron_arguments

    return {
        action.dest: action for action in add_megatron_arguments(argparse.ArgumentParser())._actions
    }


def megatron_flags(dests: dict[str, Any]) -> list[str]:
    """Command-line flags that make megatron's parser produce `dests` (None: leave unset)."""
    actions = megatron_actions()
    flags: list[str] = []
    for dest, value in dests.items():
        if value is None:
            continue
        if dest not in actions:
            raise ValueError(f"megatron has no argument for {dest}={value!r}")
        action = actions[dest]
        option = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if bool(value) != action.default:
                flags.append(option)
        elif isinstance(value, list | tuple):
            flags += [option, *map(str, value)]
        else:
            flags.append(f"{option}={value}")
    return flags


def architecture_argv(args: argparse.Namespace) -> list[str]:
    """Megatron flags for the selected architecture (put before the user's flags)."""
    return megatron_flags(
        architecture_dests(get_model_spec(args.model_name), model_config_from_args(args))
    )


def check_early(args: argparse.Namespace) -> None:
    """Checks that need only our own flags and local files (tokenizer, dataset shards, the
    checkpoint to load); run before Megatron's parser and by the launcher."""
    try:
        entry = get_model_spec(args.model_name)
    except ValueError as error:
        raise ValueError(f"{flag_value('--model-name', args.model_name)}: {error}") from error
    if not args.hf_config_path:
        try:
            entry.get_variant(args.model_variant)
        except ValueError as error:
            raise ValueError(
                f"{flag_value('--model-variant', args.model_variant)}: {error}"
            ) from error
    try:
        provider = entry.dataset_provider(args.dataset_provider)
    except ValueError as error:
        raise ValueError(
            f"{flag_value('--dataset-provider', args.dataset_provider)}: {error}"
        ) from error
    vision = model_config_from_args(args).vision
    side = vision.patch_size * vision.spatial_merge_size  # pixels of one image token, per side
    if args.min_pixels < side * side:
        raise ValueError(
            f"--min-pixels {args.min_pixels} is below one {side}x{side} merged patch "
            f"({side * side} pixels, one image token)"
        )
    if args.max_pixels < args.min_pixels:
        raise ValueError(
            f"--max-pixels {args.max_pixels} is smaller than --min-pixels {args.min_pixels}"
        )
    provider.check(args)
    if args.hf_tokenizer_path:
        check_tokenizer_directory(args.hf_tokenizer_path)
    if args.load:
        check_checkpoint_model(args, model_config_from_args(args))


def check_tokenizer_directory(path: str) -> None:
    """--hf-tokenizer-path must be a local directory with the model's tokenizer files."""
    where = flag_value("--hf-tokenizer-path", path)
    download = (
        "download them with `hf download Qwen/Qwen3.5-9B --include '*.json' --include "
        "'*.jinja' --include '*.txt' --local-dir DIR` and set HF_TOKENIZER_PATH=DIR"
    )
    if not os.path.isdir(path):
        raise ValueError(
            f"{where}: no such directory; give the local directory of the model's tokenizer and "
            f"processor files ({download})"
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"{where}: no {' or '.join(TOKENIZER_FILES)} in it; {download}")


def checkpoint_directory(load: str) -> str | None:
    """The directory megatron reads under --load (release/ or iter_NNNNNNN/, as the tracker file
    says); None without a tracker file (megatron then starts from scratch)."""
    tracker = os.path.join(load, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        step = f.read().strip()
    if step == "release":
        return os.path.join(load, "release")
    if not step.isdigit():
        raise ValueError(
            f"{flag_value('--load', load)}: {tracker} holds {step!r}, neither 'release' nor an "
            "iteration number; point CKPT_LOAD at a save directory or an import"
        )
    return os.path.join(load, f"iter_{int(step):07d}")


def check_checkpoint_model(args: argparse.Namespace, config: Any) -> None:
    """The checkpoint under --load must hold the model trained: an import keeps the HF
    config.json it came from (compared field by field), and a model with MTP layers needs the
    checkpoint's MTP tensors (listed in the torch.distributed.checkpoint `.metadata`)."""
    where = flag_value("--load", args.load)
    model = (
        flag_value("--hf-config-path", args.hf_config_path)
        if args.hf_config_path
        else flag_value("--model-variant", args.model_variant)
    )
    if os.path.isfile(os.path.join(args.load, "config.json")):
        from transformers import AutoConfig

        entry = get_model_spec(args.model_name)
        try:
            stored = entry.from_hf_config(AutoConfig.from_pretrained(args.load), name=args.load)
        except (ValueError, OSError) as error:
            raise ValueError(f"{where}: its config.json does not load ({error})") from error
        differences = architecture_differences(stored, config)
        if differences:
            matching = [
                name
                for name, variant in entry.variants.items()
                if not architecture_differences(stored, variant)
            ]
            fix = (
                f"set MODEL_VARIANT={matching[0]}"
                if matching
                else f"train its architecture with --hf-config-path {args.load}"
            )
            raise ValueError(
                f"{where} holds another model than {model}: its config.json has "
                f"{', '.join(differences[:4])}; {fix}"
            )
    spec = get_model_spec(args.model_name)
    mtp_layers = spec.shape(config).mtp_layers
    directory = checkpoint_directory(args.load)
    if not mtp_layers or directory is None:
        return
    metadata = os.path.join(directory, ".metadata")
    if not os.path.isfile(metadata):
        return
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as error:  # a truncated or foreign file fails in unpickling, any type
        raise ValueError(
            f"{where}: {metadata} does not read as a distributed checkpoint ({error})"
        ) from error
    stored = spec.weights.config_with_tensors(config, set(keys), True)
    if not spec.shape(stored).mtp_layers:
        raise ValueError(
            f"{where} has no MTP tensors (imported from a checkpoint without them, such as "
            f"transformers' save_pretrained) but the model trained has {mtp_layers} MTP "
            "layer(s); set MTP_NUM_LAYERS=0 (--mtp-num-layers 0)"
        )


def architecture_differences(stored: Any, config: Any) -> list[str]:
    """`field stored (model: value)` for every text or vision field in which `stored` differs
    from `config`; the MTP depth aside (an import has MTP layers when it has their tensors)."""
    differences = []
    for part in ("text", "vision"):
        theirs = dataclasses.asdict(getattr(stored, part))
        ours = dataclasses.asdict(getattr(config, part))
        for name, value in theirs.items():
            if name != "mtp_num_hidden_layers" and ours[name] != value:
                differences.append(f"{name} {value} ({config.name}: {ours[name]})")
    return differences


def validate_multimodal_args(args: argparse.Namespace) -> None:
    """Checks on the full (Megatron-validated) arguments; each error names the flag to change."""
    if args.total_seq_length is None:
        args.total_seq_length = args.seq_length
    if args.total_seq_length > args.seq_length:
        raise ValueError(
            f"--total-seq-length {args.total_seq_length} exceeds --seq-length {args.seq_length}"
        )
    if args.pipeline_model_parallel_size > 1:
        raise ValueError(
            "pipeline parallelism is not supported yet: the vision tower and decoder are built "
            "whole on every rank; set --pipeline-model-parallel-size 1 (PP=1)"
        )
    if args.dataloader_type != "external":
        raise ValueError("VLM batches use our collate: pass --dataloader-type external")
    if not args.calculate_per_token_loss:
        raise ValueError(
            "the loss is normalised per token across micro-batches and CP ranks: pass "
            "--calculate-per-token-loss"
        )
    decay_iters = args.lr_decay_iters or args.train_iters
    if decay_iters is not None and args.lr_warmup_iters >= decay_iters:
        raise ValueError(
            f"--lr-warmup-iters {args.lr_warmup_iters} (WARMUP_ITERS) must be below the "
            f"{decay_iters} iterations of the schedule (--train-iters, TRAIN_ITERS); lower "
            "WARMUP_ITERS or raise TRAIN_ITERS"
        )
    balancing = args.moe_router_load_balancing_type
    if args.moe_router_fusion and "seq_aux_loss" in (
        [balancing] if isinstance(balancing, str) else balancing
    ):
        raise ValueError(
            "--moe-router-load-balancing-type seq_aux_loss with --moe-router-fusion: the fused "
            "aux loss takes an integer token count, and seq_aux_loss's mean count per padded "
            "sequence is not one (megatron_compat.count_moe_tokens_as_integers); use aux_loss or "
            "drop --moe-router-fusion"
        )
    check_vision_cuda_graph(args)
    config = model_config_from_args(args)
    check_architecture_flags(args, config)
    check_layout(args, config)
    if args.expert_gemm == "auto":
        moe = get_model_spec(args.model_name).shape(config).num_experts
        args.expert_gemm = "torch" if moe and not torch_expert_gemm_obstacle(args) else "te"
    if args.expert_gemm == "torch":
        check_torch_expert_gemm(args, config)
    multiple = pad_multiple(args)
    if not args.packed_sequence and args.total_seq_length % multiple:
        raise ValueError(
            f"--total-seq-length {args.total_seq_length} must be a multiple of {multiple} "
            f"({pad_multiple_reason(args)}) for BSHD batches; change --total-seq-length or CP/TP"
        )


def check_vision_cuda_graph(args: argparse.Namespace) -> None:
    """The vision tower's CUDA graphs (VISION_CUDA_GRAPH=1): a budget, TE's RNG tracker, and the
    layouts they were verified in (one GPU and data parallelism under megatron DDP:
    tests/test_vision_cuda_graph.py on one and two GPUs; expert parallelism leaves the vision
    tower data parallel). The model's vision config refuses them with RECOMPUTE_VISION=1
    (factory.vision_config)."""
    patches, images = args.vision_cuda_graph_patches, args.vision_cuda_graph_images
    if patches == 0:
        return
    if patches < 0 or images < 1:
        raise ValueError(
            f"--vision-cuda-graph-patches {patches} / --vision-cuda-graph-images {images} "
            "(VISION_GRAPH_PATCHES / VISION_GRAPH_IMAGES): use positive counts"
        )
    if not args.te_rng_tracker:
        raise ValueError(
            "--vision-cuda-graph-patches needs --te-rng-tracker: TE's attention refuses CUDA "
            "graph capture under megatron's own RNG tracker (the run script adds it)"
        )
    unverified = [
        f"{name}={size}"
        for name, size in (
            ("TP", args.tensor_model_parallel_size),
            ("CP", args.context_parallel_size),
            ("PP", args.pipeline_model_parallel_size),
        )
        if size > 1
    ]
    if getattr(args, "use_megatron_fsdp", False) or getattr(args, "use_torch_fsdp2", False):
        unverified.append("FSDP=1")
    if unverified:
        raise ValueError(
            "VISION_CUDA_GRAPH=1 is verified on one GPU and with data or expert parallelism "
            f"under megatron DDP only, and this run has {', '.join(unverified)}: set "
            "VISION_CUDA_GRAPH=0 for it"
        )


def torch_expert_gemm_obstacle(args: argparse.Namespace) -> str | None:
    """The setting that rules out grouped_gemm_experts.py for a MoE run (a clause naming it and
    why), or None."""
    expert_tp = getattr(args, "expert_tensor_parallel_size", None) or getattr(
        args, "tensor_model_parallel_size", 1
    )
    for enabled, what in (
        (getattr(args, "use_megatron_fsdp", False), "megatron-fsdp (FSDP=1), which shards the "
         "expert weights the torch grouped GEMM reads whole"),
        (getattr(args, "fp8", None), "FP8 (--fp8-format): the torch grouped GEMM runs in bf16"),
        (getattr(args, "delay_wgrad_compute", False), "--delay-wgrad-compute: the torch grouped "
         "GEMM computes weight gradients in backward"),
        (expert_tp > 1, f"expert tensor parallelism {expert_tp} (it follows TP unless set), "
         "which splits each expert the torch grouped GEMM holds whole; add "
         "--expert-tensor-parallel-size 1 (TP may stay)"),
    ):  # fmt: skip
        if enabled:
            return what
    return None


def check_torch_expert_gemm(args: argparse.Namespace, config: Any) -> None:
    """`--expert-gemm torch` switches the TE grouped expert layers of a MoE model to
    grouped_gemm_experts.py; refuse the settings it does not serve, naming the change."""
    chosen, fallback = setting("--expert-gemm", "torch"), setting("--expert-gemm", "te")
    if not get_model_spec(args.model_name).shape(config).num_experts:
        raise ValueError(
            f"{chosen} replaces the routed experts' GEMMs of a MoE model, and {config.name} is "
            f"dense; use {fallback}"
        )
    obstacle = torch_expert_gemm_obstacle(args)
    if obstacle:
        raise ValueError(f"{chosen} does not run with {obstacle}; drop it or use {fallback}")


def check_architecture_flags(args: argparse.Namespace, config: Any) -> None:
    """Megatron's architecture arguments must be the model's: the user's flags come after the
    model's (`architecture_argv`), so a different value would win in megatron's arguments (memory
    plan, FLOPs, checkpoint metadata) while the model is built from the config. Every argument that
    any variant sets is checked; those this model leaves unset keep megatron's default (a dense
    model's expert arguments, a tied model's untie flag)."""
    spec = get_model_spec(args.model_name)
    actions = megatron_actions()
    ours = architecture_dests(spec, config)
    expected = {
        dest: actions[dest].default
        for variant in spec.variants.values()
        for dest in architecture_dests(spec, variant)
    }
    expected.update({dest: value for dest, value in ours.items() if value is not None})
    for dest in CHOSEN_BY_OUR_FLAGS:
        expected.pop(dest, None)
    model = (
        flag_value("--hf-config-path", args.hf_config_path)
        if args.hf_config_path
        else f"MODEL_VARIANT={args.model_variant}"
    )
    for dest, value in expected.items():
        given, flag = getattr(args, dest), actions[dest].option_strings[0]
        # megatron's validation unwraps one-element lists (--moe-aux-loss-coeff takes several).
        if single(given) != single(value) and not same_sequence(given, value):
            raise ValueError(
                f"{flag} {single(given)} disagrees with the model trained ({model}), which has "
                f"{single(value)}: "
                f"architecture flags after the script name must match the model; drop {flag}, "
                "choose another MODEL_VARIANT, or give a custom architecture as "
                "--hf-config-path CONFIG_DIR"
            )


def same_sequence(given: Any, value: Any) -> bool:
    """A list argument equal to the model's tuple (--mrope-section 11 11 10)."""
    sequences = (list, tuple)
    return (
        isinstance(given, sequences) and isinstance(value, sequences) and list(given) == list(value)
    )


def single(value: Any) -> Any:
    """The element of a one-element list, else `value`."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def model_layout_problem(
    shape: Any,
    name: str,
    tp: int,
    cp: int,
    ep: int,
    recompute: bool = False,
    seq_length: int | None = None,
    moe_variants: Sequence[str] = (),
) -> str:
    """Why the model (its spec's `ModelShape`) refuses this layout, naming the setting to change,
    or '': experts for EP, heads that TP x CP split, full-layer recompute, the sequence length
    against the model's positions. The launcher's checks and the planner's suggestions both ask
    here."""
    if ep > 1 and not shape.num_experts:
        other = f" (or a MoE variant: {', '.join(moe_variants)})" if moe_variants else ""
        return (
            f"{setting('--expert-model-parallel-size', ep)} needs a mixture-of-experts model, but "
            f"{name} is dense; use EP=1{other}"
        )
    if shape.num_experts % ep:
        return (
            f"{setting('--expert-model-parallel-size', ep)}: the {shape.num_experts} experts of "
            f"{name} do not split over it; use an EP dividing {shape.num_experts}"
        )
    for kind, heads in shape.tp_cp_heads.items():
        if heads % (tp * cp):
            return (
                f"{kind} heads: {name} has {heads}, which megatron shards over TP and then over "
                f"CP in its all-to-all, and TP {tp} x CP {cp} does not divide them; choose TP x "
                f"CP dividing {math.gcd(*shape.tp_cp_heads.values())}"
            )
    if recompute and shape.full_recompute_problem:
        return (
            f"{setting('--recompute-granularity', 'full')} cannot train {name}: "
            f"{shape.full_recompute_problem}"
        )
    if seq_length is not None and seq_length > shape.max_positions:
        return (
            f"{setting('--seq-length', seq_length)}: above the {shape.max_positions} positions "
            f"of {name} (max_position_embeddings); use SEQ_LEN={shape.max_positions} or less"
        )
    return ""


def check_layout(args: argparse.Namespace, config: Any) -> None:
    """Raise the model's objection to the arguments' layout (`model_layout_problem`), if any."""
    spec = get_model_spec(args.model_name)
    problem = model_layout_problem(
        spec.shape(config),
        config.name,
        args.tensor_model_parallel_size,
        args.context_parallel_size,
        args.expert_model_parallel_size,
        recompute=getattr(args, "recompute_granularity", None) == "full",
        seq_length=args.seq_length,
        moe_variants=[v for v, c in spec.variants.items() if spec.shape(c).num_experts],
    )
    if problem:
        raise ValueError(problem)


def pad_multiple_reason(args: argparse.Namespace) -> str:
    parts = []
    if args.context_parallel_size > 1:
        parts.append(f"2 x CP {args.context_parallel_size}")
    if args.sequence_parallel:
        parts.append(f"TP {args.tensor_model_parallel_size} with sequence parallelism")
    return " x ".join(parts) or "no constraint"


def pad_multiple(args: argparse.Namespace) -> int:
    """Every sequence length must divide by this (see `sequence_multiple`)."""
    return sequence_multiple(
        args.tensor_model_parallel_size, args.context_parallel_size, args.sequence_parallel
    )


def sequence_multiple(tp: int, cp: int, sequence_parallel: bool) -> int:
    """2 x CP for the load-balanced CP split, x TP when sequence parallelism shards the
    sequence."""
    return (2 * cp if cp > 1 else 1) * (tp if sequence_parallel else 1)


def launcher_facts(argv: list[str]) -> dict[str, Any]:
    """What scripts/run_qwen35_vl.sh needs to know of the model that `argv` (the flags it passes
    to pretrain_multimodal.py, a --hf-config-path of the user's included) trains, after the
    early checks and the model's layout rules: its routed experts (0 when dense), the GPUs torch
    sees here (one interpreter answers both: torch is imported already) and its name."""
    import torch

    args = preparse(argv)
    check_early(args)
    config = model_config_from_args(args)
    check_layout(args, config)
    return {
        "num_experts": get_model_spec(args.model_name).shape(config).num_experts,
        "gpus": torch.cuda.device_count(),
        "name": config.name,
    }


if __name__ == "__main__":
    # The launcher's lookup: the facts' values on one line (the name last: a path may hold
    # spaces), or the bad flag's message on stdout (the launcher prints it as its own error line)
    # and exit status 1.
    try:
        facts = launcher_facts(sys.argv[1:])
    except ValueError as error:
        print(error)
        sys.exit(1)
    print(*facts.values())

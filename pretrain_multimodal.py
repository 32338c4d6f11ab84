"""Train a registered vision-language model with megatron-core's `pretrain()`.

The model comes from `models.MODEL_REGISTRY` (--model-name, --model-variant or --hf-config-path),
the data from the entry's dataset provider (--dataset-provider) through our collate
(--dataloader-type external). With --dry-run it validates everything on the CPU and prints the
plan (parallel layout, parameter counts, memory per GPU) instead of training.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import types
from typing import Any

from arguments import (
    add_multimodal_args,
    architecture_argv,
    check_early,
    model_config_from_args,
    pad_multiple,
    preparse,
    validate_multimodal_args,
)
from data.tokens import token_ids_from_args
from megatron_compat import SavedArgs
from models import get_model_entry

GIB = 1024**3
# A CPU dry run plans for this GPU.
PLANNED_GPU = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * GIB
)


def resolved_model_config(args: argparse.Namespace) -> Any:
    """The model config with the special token ids of --hf-tokenizer-path, if given."""
    config = model_config_from_args(args)
    token_ids = token_ids_from_args(args)
    too_large = {name: i for name, i in token_ids.items() if i >= config.text.vocab_size}
    if too_large:
        raise ValueError(
            f"tokenizer ids {too_large} do not fit the model vocabulary ({config.text.vocab_size})"
        )
    return config.with_token_ids(**token_ids)


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
):
    """megatron's model-provider signature; builds the registry entry's model on this rank."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    base = config if config is not None else core_transformer_config_from_args(args)
    return get_model_entry(args.model_name).build_model(
        resolved_model_config(args),
        base,
        pg_collection or ProcessGroupCollection.use_mpu_process_groups(),
        pre_process=pre_process,
        post_process=post_process,
        recompute_vision=args.recompute_vision,
        vp_stage=vp_stage,
    )


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """megatron's dataset-provider signature; returns endless iterators of collated batches."""
    from megatron.core import parallel_state
    from megatron.training import get_args, print_rank_0

    from data.loader import build_loader
    from data.throughput import counted

    args = get_args()
    config = resolved_model_config(args)
    provider = get_model_entry(args.model_name).dataset_provider(args.dataset_provider)
    splits = provider(args, config, train_val_test_num_samples)
    collate = collate_config(args, config, splits)
    print_rank_0(
        f"> {args.dataset_provider} data: train {len(splits.train)}, valid {len(splits.valid)}, "
        f"test {len(splits.test)} samples; {collate.mode.upper()} batches of "
        f"{args.micro_batch_size} x {args.total_seq_length} tokens"
    )
    consumed = (args.consumed_train_samples, args.consumed_valid_samples, 0)
    train, valid, test = (
        build_loader(
            dataset,
            collate,
            consumed_samples=used,
            micro_batch_size=args.micro_batch_size,
            data_parallel_rank=parallel_state.get_data_parallel_rank(),
            data_parallel_size=parallel_state.get_data_parallel_world_size(),
            num_workers=args.num_workers,
        )
        for dataset, used in zip((splits.train, splits.valid, splits.test), consumed, strict=True)
    )
    meter = token_throughput(args, config)
    return counted(train, meter.count_batch), counted(valid, lambda _: meter.interrupt()), test


def collate_config(args: argparse.Namespace, config: Any, splits: Any) -> Any:
    """How micro-batches are built from samples: THD packs or padded BSHD rows of
    --total-seq-length, lengths a multiple of what CP / sequence parallelism split."""
    from data.collate import BSHD, THD, CollateConfig

    return CollateConfig(
        mode=THD if args.packed_sequence else BSHD,
        seq_length=args.total_seq_length,
        pad_token_id=splits.pad_token_id,
        image_token_id=config.image_token_id,
        vision=config.vision,
        pad_multiple=pad_multiple(args),
        ignored_label_ids=splits.ignored_label_ids,
    )


def token_throughput(args: argparse.Namespace, config: Any) -> Any:
    """Tokens/s/GPU and model TFLOP/s/GPU (with MFU on GPUs whose peak is listed) every log
    interval, printed under megatron's iteration line and written to TensorBoard. The FLOPs come
    from `scripts/bench/flops.py` (megatron's own TFLOP/s counts the text decoder only)."""
    import torch
    from megatron.training import get_args, get_tensorboard_writer, print_rank_0

    from data.throughput import TokenThroughput
    from scripts.bench.flops import batch_training_flops, peak_tflops_of

    peak = peak_tflops_of(torch.cuda.get_device_name()) if torch.cuda.is_available() else None

    def report(iteration: int, tokens: float, flops: float, first: int, last: int) -> None:
        tflops = flops / 1e12
        utilisation = f", MFU {100 * tflops / peak:.1f}%" if peak else ""
        print_rank_0(
            f" per GPU: {tokens:,.0f} tokens/s, {tflops:.1f} model TFLOP/s{utilisation} "
            f"(iterations {first}-{last})"
        )
        writer = get_tensorboard_writer()
        if writer is not None:
            writer.add_scalar("tokens-per-sec-per-gpu", tokens, iteration)
            writer.add_scalar("model-tflops-per-gpu", tflops, iteration)
            if peak:
                writer.add_scalar("mfu", tflops / peak, iteration)

    model_parallel_gpus = (
        args.tensor_model_parallel_size
        * args.context_parallel_size
        * args.pipeline_model_parallel_size
    )
    return TokenThroughput(
        args.log_interval,
        model_parallel_gpus,
        lambda: getattr(get_args(), "curr_iteration", 0),
        report,
        lambda batch: batch_training_flops(config, batch),
    )


def memory_plan(args: argparse.Namespace, counts: Any) -> dict[str, float]:
    """Rough per-GPU memory in GiB: bf16 weights, fp32 gradients, Adam state (fp32 master,
    m, v) sharded by the distributed optimizer or megatron-fsdp, and activations."""
    tp, cp, ep = (
        args.tensor_model_parallel_size,
        args.context_parallel_size,
        args.expert_model_parallel_size,
    )
    dp = args.data_parallel_size
    expert_dp = max(1, args.world_size // (ep * args.expert_tensor_parallel_size))
    experts = counts.routed_experts
    dense = counts.total + counts.mtp - experts
    local_dense, local_experts = dense / tp, experts / ep
    params = local_dense + local_experts
    shard = (
        params
        if not args.use_distributed_optimizer and not args.use_megatron_fsdp
        else (local_dense / (dp * cp) + local_experts / expert_dp)
    )
    fsdp_params = (
        args.use_megatron_fsdp and args.data_parallel_sharding_strategy == "optim_grads_params"
    )
    fsdp_grads = args.use_megatron_fsdp and args.data_parallel_sharding_strategy in (
        "optim_grads",
        "optim_grads_params",
    )
    tokens = (
        args.micro_batch_size * args.total_seq_length / cp / (tp if args.sequence_parallel else 1)
    )
    layers = args.num_layers  # mixer and MLP sub-layers of the hybrid pattern
    per_token = 2 if args.recompute_granularity == "full" else 18
    activations = tokens * args.hidden_size * per_token * layers + tokens * args.vocab_size / tp * 4
    return {
        "weights (bf16)": 2 * (shard if fsdp_params else params) / GIB,
        "gradients (fp32)": 4 * (shard if fsdp_grads else params) / GIB,
        "optimizer (fp32 master + Adam m, v)": 12 * shard / GIB,
        "activations (rough)": activations / GIB,
    }


def have_transformer_engine() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def print_dry_run_plan(args: argparse.Namespace) -> None:
    """Build the model configs on the CPU (their validation runs) and print the plan."""
    from megatron.training.arguments import core_transformer_config_from_args

    from models.qwen35_vl.configuration import human_count

    config = resolved_model_config(args)
    config_args, skipped = args, []
    if not have_transformer_engine():
        # TransformerConfig refuses TE-kernel fusions without TE; they are checked on the GPU.
        config_args = copy.copy(args)
        for flag in ("moe_permute_fusion", "moe_router_fusion"):
            if getattr(args, flag, False):
                setattr(config_args, flag, False)
                skipped.append("--" + flag.replace("_", "-"))
    get_model_entry(args.model_name).transformer_configs(
        config, core_transformer_config_from_args(config_args), args.recompute_vision
    )

    counts = config.parameter_counts()
    text = config.text
    if args.use_megatron_fsdp:
        sharding = f"megatron-fsdp ({args.data_parallel_sharding_strategy})"
    else:
        sharding = "distributed optimizer" if args.use_distributed_optimizer else "DDP"
    layout = (
        f"world {args.world_size} = TP {args.tensor_model_parallel_size} x CP "
        f"{args.context_parallel_size} x PP {args.pipeline_model_parallel_size} x DP "
        f"{args.data_parallel_size}; EP {args.expert_model_parallel_size}; sequence parallel "
        f"{'on' if args.sequence_parallel else 'off'}; {sharding}"
    )
    mode = "THD packed" if args.packed_sequence else "BSHD padded"
    lines = [
        f"DRY RUN {args.model_name} / {config.name} ({config.source})",
        f"  parallel layout: {layout}",
        f"  batch: micro {args.micro_batch_size}, global {args.global_batch_size}, "
        f"{args.total_seq_length} tokens per sample, {mode}, pad multiple {pad_multiple(args)}",
        f"  decoder: {text.num_hidden_layers} layers "
        f"({text.layer_types.count('linear_attention')} Gated DeltaNet, "
        f"{text.layer_types.count('full_attention')} attention), hidden {text.hidden_size}, "
        + (
            f"MoE {text.num_experts} experts top-{text.num_experts_per_tok}"
            if text.is_moe
            else f"dense MLP {text.intermediate_size}"
        )
        + f", MTP layers {text.mtp_num_hidden_layers}",
        f"  vision: {config.vision.depth} layers, hidden {config.vision.hidden_size}",
        f"  parameters (HF-equivalent): total {counts.total:,} ({human_count(counts.total)}), "
        f"active {counts.active:,} ({human_count(counts.active)}); vision "
        f"{human_count(counts.vision)}; MTP +{counts.mtp:,} ({human_count(counts.mtp)})",
        "  memory per GPU (estimate, GiB):",
    ]
    plan = memory_plan(args, counts)
    lines += [f"    {name:38s} {value:9.2f}" for name, value in plan.items()]
    lines.append(f"    {'total':38s} {sum(plan.values()):9.2f}")
    import torch

    device = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else PLANNED_GPU
    verdict = "fits" if sum(plan.values()) * GIB < device.total_memory else "does NOT fit"
    lines.append(f"    {verdict} in {device.name} ({device.total_memory / GIB:.0f} GiB)")
    if skipped:
        lines.append(f"  not checked without Transformer Engine: {', '.join(skipped)}")
    lines.append("  megatron arguments and model configs validated on the CPU; exiting (DRY_RUN)")
    print("\n".join(lines), flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Our checks, then megatron's parsing and validation with the architecture flags of the
    chosen model placed before the user's (so explicit flags win)."""
    from megatron.training.arguments import parse_and_validate_args

    early = preparse(argv)
    check_early(early)
    sys.argv = [sys.argv[0], *architecture_argv(early), *argv]
    with planning_device(early.dry_run):
        args = parse_and_validate_args(extra_args_provider=add_multimodal_args)
    validate_multimodal_args(args)
    args.__class__ = SavedArgs
    return args


@contextlib.contextmanager
def planning_device(dry_run: bool):
    """For a CPU dry run, answer megatron's device queries during argument validation (compute
    capability gates grouped GEMM and CUDA_DEVICE_MAX_CONNECTIONS checks) as the planned GPU
    would; a real run, or a dry run on a GPU, asks the real device."""
    import torch

    if not dry_run or torch.cuda.is_available():
        yield
        return
    real = torch.cuda.get_device_capability, torch.cuda.get_device_properties
    torch.cuda.get_device_capability = lambda device=None: (PLANNED_GPU.major, PLANNED_GPU.minor)
    torch.cuda.get_device_properties = lambda device=None: PLANNED_GPU
    try:
        yield
    finally:
        torch.cuda.get_device_capability, torch.cuda.get_device_properties = real


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.dry_run:
        print_dry_run_plan(args)
        return
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from forward_step import forward_step
    from megatron_compat import apply_patches

    apply_patches()
    datasets_provider.is_distributed = True
    pretrain(
        pretrain_cfg_container_from_args(args),
        datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )


if __name__ == "__main__":
    main()

"""Command-line flags of the playground, added to Megatron's parser, plus the checks that fail
early (before any GPU work) with a message naming the flag to change.

`add_multimodal_args` is the `extra_args_provider` for megatron's `parse_and_validate_args`;
`architecture_argv` turns the chosen model into Megatron's architecture flags.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from models import get_model_entry

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
        help="directory (or config.json) of a Hugging Face Qwen3.5 model; overrides "
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
    args, _ = parser.parse_known_args(argv)
    return args


def model_config_from_args(args: argparse.Namespace) -> Any:
    """The model config selected by --model-name / --model-variant / --hf-config-path, with the
    MTP depth of --mtp-num-layers (variant default when unset)."""
    entry = get_model_entry(args.model_name)
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


def architecture_argv(args: argparse.Namespace) -> list[str]:
    """Megatron flags for the selected architecture (put before the user's flags)."""
    return model_config_from_args(args).megatron_args()


def check_early(args: argparse.Namespace) -> None:
    """Checks that need only our own flags; run before Megatron's parser."""
    entry = get_model_entry(args.model_name)
    if not args.hf_config_path:
        entry.get_variant(args.model_variant)
    entry.dataset_provider(args.dataset_provider)
    unit = 32 * 32
    if args.min_pixels < unit:
        raise ValueError(f"--min-pixels {args.min_pixels} is below one 32x32 merged patch ({unit})")
    if args.max_pixels < args.min_pixels:
        raise ValueError(
            f"--max-pixels {args.max_pixels} is smaller than --min-pixels {args.min_pixels}"
        )
    if args.dataset_provider == "cord_v2":
        for flag, value in (
            ("--dataset-path", args.dataset_path),
            ("--hf-tokenizer-path", args.hf_tokenizer_path),
        ):
            if not value or not os.path.isdir(value):
                raise ValueError(
                    f"the cord_v2 dataset needs {flag} (a local directory), got {value}"
                )


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
    config = model_config_from_args(args)
    if args.expert_model_parallel_size > 1 and not config.text.num_experts:
        raise ValueError(
            f"--expert-model-parallel-size {args.expert_model_parallel_size} needs a MoE model; "
            f"variant {config.name!r} is dense, use EP=1"
        )
    check_gated_deltanet_heads(config, args.tensor_model_parallel_size, args.context_parallel_size)
    multiple = pad_multiple(args)
    if not args.packed_sequence and args.total_seq_length % multiple:
        raise ValueError(
            f"--total-seq-length {args.total_seq_length} must be a multiple of {multiple} "
            f"({pad_multiple_reason(args)}) for BSHD batches; change --total-seq-length or CP/TP"
        )


def check_gated_deltanet_heads(config: Any, tp: int, cp: int) -> None:
    """megatron's Gated DeltaNet shards its heads over TP, and under CP trades sequence for heads
    in an all-to-all: each TP rank's key and value heads must split evenly over CP."""
    text = config.text
    if "linear_attention" not in text.layer_types:
        return
    for kind, heads in (
        ("key", text.linear_num_key_heads),
        ("value", text.linear_num_value_heads),
    ):
        if heads % (tp * cp):
            raise ValueError(
                f"Gated DeltaNet has {heads} {kind} heads, which do not split over TP {tp} x CP "
                f"{cp} (megatron shards them over TP, then over CP in its all-to-all); choose TP "
                f"x CP dividing {math.gcd(text.linear_num_key_heads, text.linear_num_value_heads)}"
            )


def pad_multiple_reason(args: argparse.Namespace) -> str:
    parts = []
    if args.context_parallel_size > 1:
        parts.append(f"2 x CP {args.context_parallel_size}")
    if args.sequence_parallel:
        parts.append(f"TP {args.tensor_model_parallel_size} with sequence parallelism")
    return " x ".join(parts) or "no constraint"


def pad_multiple(args: argparse.Namespace) -> int:
    """Every sequence length must divide by this: 2 x CP for the load-balanced CP split, x TP
    when sequence parallelism shards the sequence."""
    tp = args.tensor_model_parallel_size if args.sequence_parallel else 1
    return 2 * args.context_parallel_size * tp if args.context_parallel_size > 1 else tp

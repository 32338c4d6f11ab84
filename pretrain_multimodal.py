"""Train a registered vision-language model with megatron-core's `pretrain()`.

The model comes from `models.MODEL_REGISTRY` (--model-name, --model-variant or --hf-config-path),
the data from the entry's dataset provider (--dataset-provider) through our collate
(--dataloader-type external). With --dry-run it validates everything on the CPU and prints the
plan of `planner.py` (parallel layout, parameter counts, memory per GPU, changes that fit)
instead of training; without a GPU a real run stops at once and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
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
from megatron_compat import SavedArgs, fuse_wgrad_accumulation_into_main_grad
from models import get_model_spec
from planner import dry_run_log_path, output_to, planning_device, print_dry_run_plan

NO_GPU = "no GPU found: use DRY_RUN=1 to validate the configuration on the CPU"


def resolved_model_config(args: argparse.Namespace) -> Any:
    """The model config with the special token ids of --hf-tokenizer-path, if given."""
    config = model_config_from_args(args)
    token_ids = token_ids_from_args(args)
    vocab = get_model_spec(args.model_name).shape(config).vocab
    too_large = {name: i for name, i in token_ids.items() if i >= vocab}
    if too_large:
        raise ValueError(f"tokenizer ids {too_large} do not fit the model vocabulary ({vocab})")
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
    model = get_model_spec(args.model_name).build_model(
        resolved_model_config(args),
        base,
        pg_collection or ProcessGroupCollection.use_mpu_process_groups(),
        pre_process=pre_process,
        post_process=post_process,
        recompute_vision=args.recompute_vision,
        vp_stage=vp_stage,
        vision_graph_patches=args.vision_cuda_graph_patches,
        vision_graph_images=args.vision_cuda_graph_images,
    )
    fuse_wgrad_accumulation_into_main_grad(model, args)
    if args.expert_gemm == "torch":
        from grouped_gemm_experts import use_torch_grouped_gemm

        use_torch_grouped_gemm(model)
    return model


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """megatron's dataset-provider signature; returns endless iterators of collated batches."""
    from megatron.core import parallel_state
    from megatron.training import get_args, print_rank_0

    from data.loader import build_loader
    from data.throughput import counted

    args = get_args()
    config = resolved_model_config(args)
    provider = get_model_spec(args.model_name).dataset_provider(args.dataset_provider)
    splits = provider.build(args, config, train_val_test_num_samples)
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
        model_inputs=get_model_spec(args.model_name).model_inputs(config),
        pad_multiple=pad_multiple(args),
        ignored_label_ids=splits.ignored_label_ids,
    )


def token_throughput(args: argparse.Namespace, config: Any) -> Any:
    """Tokens/s/GPU and model TFLOP/s/GPU (with MFU on GPUs whose peak is listed) every log
    interval, printed under megatron's iteration line and written to TensorBoard. The FLOPs come
    from the model spec's `training_flops` (megatron's own TFLOP/s counts the text decoder only)."""
    import torch
    from megatron.training import get_args, get_tensorboard_writer, print_rank_0

    from data.throughput import TokenThroughput, batch_lengths_and_grids, peak_tflops_of

    spec = get_model_spec(args.model_name)

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
        lambda batch: spec.training_flops(config, *batch_lengths_and_grids(batch)),
    )


def wants_help(argv: list[str]) -> bool:
    """-h / --help anywhere: answered before any check, GPU or not."""
    return "-h" in argv or "--help" in argv


def print_help() -> None:
    """megatron's flags and ours. megatron-core 0.19.2 has help strings with a bare `%`, which
    argparse reads as a format character: escape those before printing."""
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(
        prog="pretrain_multimodal.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_megatron_arguments(add_multimodal_args(parser))
    # argparse's own expansion (private, stable since Python 3.2) finds the strings it rejects.
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help:
            continue
        try:
            formatter._expand_help(action)
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")
    parser.print_help()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Our checks, then megatron's parsing and validation with the architecture flags of the
    chosen model placed before the user's (so explicit flags win). In a dry run megatron's
    output (and the libraries' warnings) goes to `args.dry_run_log` and no TensorBoard writer
    is opened."""
    early = preparse(argv)
    user_argv = list(argv)
    with contextlib.ExitStack() as stack:
        log_path = None
        if early.dry_run:
            log_path = dry_run_log_path(argv)
            stack.enter_context(output_to(log_path, mode="w"))
            stack.enter_context(megatron_errors(log_path))
            # megatron opens its TensorBoard writer while parsing whenever --tensorboard-dir is
            # set; an empty value (the last occurrence of a flag wins) keeps it closed.
            user_argv += ["--tensorboard-dir", ""]
        stack.enter_context(planning_device(early.dry_run))
        from megatron.training.arguments import parse_and_validate_args

        from megatron_compat import apply_patches

        apply_patches()  # before validation: one patch concerns what it accepts

        check_early(early)
        sys.argv = [sys.argv[0], *architecture_argv(early), *user_argv]
        args = parse_and_validate_args(extra_args_provider=add_multimodal_args)
        validate_multimodal_args(args)
    args.__class__ = SavedArgs
    if log_path:
        args.dry_run_log = log_path
    return args


@contextlib.contextmanager
def megatron_errors(log_path: str) -> Iterator[None]:
    """While megatron's output goes to `log_path`: its argparse exit (the usage, then the error
    line) and its validation asserts become a ValueError with that line, naming the log."""
    try:
        yield
    except SystemExit as exit_:
        if not exit_.code:
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        with open(log_path) as log:
            lines = [line.strip() for line in log if "error:" in line]
        reason = lines[-1] if lines else f"megatron's argument parser exited with {exit_.code}"
        raise ValueError(f"{reason} (megatron's output: {log_path})") from None
    except AssertionError as error:
        raise ValueError(
            f"megatron refused the arguments: {error} (megatron's output: {log_path})"
        ) from None


def main() -> None:
    argv = sys.argv[1:]
    if wants_help(argv):
        print_help()
        return
    try:
        if not preparse(argv).dry_run:
            import torch

            if not torch.cuda.is_available():
                raise ValueError(NO_GPU)
        args = parse_args(argv)
        if args.dry_run:
            reason = print_dry_run_plan(args, resolved_model_config(args), args.dry_run_log)
            if reason:
                sys.exit(f"error: {reason}")
            return
    except ValueError as error:
        sys.exit(f"error: {error}")
    except AssertionError as error:
        # megatron validates its arguments with asserts; their message names the flag.
        sys.exit(f"error: megatron refused the arguments: {error or 'an assertion failed'}")
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from forward_step import forward_step

    datasets_provider.is_distributed = True
    pretrain(
        pretrain_cfg_container_from_args(args),
        datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )
    # megatron leaves the process groups to interpreter shutdown, where torch warns that they
    # leak and NCCL's teardown is slower; they are released here, as torch asks.
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

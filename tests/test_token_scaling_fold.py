"""The per-token gradient scaling folded into the clipping against megatron's two passes (GPU).

    torchrun --nproc-per-node 1 tests/test_token_scaling_fold.py

`megatron_compat.fold_token_scaling_into_gradient_clipping` leaves the 1 / tokens scaling of
`finalize_model_grads` to the optimizer's clipping, which then multiplies once by both. The tiny
model under megatron DDP with the distributed optimizer (TE's Adam, gradient clipping at 1.0, as
training and the benchmark run) is built twice from the same weights and takes four optimizer
steps on the same micro-batches through megatron's schedule with the per-token loss: once with the
fold, once in megatron's order (the fold refused). The first step is megatron's order on both
sides (the fold starts after a step), so it must agree exactly. Later steps: the gradient norm is
the unscaled norm times the scaling instead of the norm of the rounded products, and each gradient
is multiplied once by min(1, max_norm / norm) x scaling instead of twice, so each differs by about
two fp32 roundings (2^-23 each); Adam divides by sqrt(v) of the same gradients, so the fp32 main
weights move by as little, and the bf16 weights differ only where a rounding boundary falls
between the two: limits 1e-6 relative for the norms and 2^-8 per bf16 weight tensor, and the
fraction of bf16 weights that differ is printed.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
    BF16_ROUNDING,
    TWO_MICRO_BATCHES,
    Check,
    build_megatron,
    collate,
    init_distributed,
    make_sample,
    needs_cuda,
    print_table,
    run_section,
    run_with_torchrun,
    set_model_parallel,
    tiny_config,
    worst_relative_difference,
)

STEPS = [*TWO_MICRO_BATCHES, (63, (200, 150), ((128, 160),)), (64, (90, 300), ((64, 64),))]
# Two fp32 roundings of the norm, with room for the sum's order: 2^-23 = 1.2e-7 each.
NORM_LIMIT = 1e-6


def train(config, weights, fold: bool) -> dict:
    """Four optimizer steps of the bf16 model from `weights` (None: its own initialisation)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import megatron_compat
    from forward_step import loss_func, run_model, to_device

    set_model_parallel(seed=1234)
    model = build_megatron(config, torch.bfloat16)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    initial = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    model.model_type = ModelType.encoder_or_decoder
    language = model.language_model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True
    )
    model = DistributedDataParallel(language, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-3, bf16=True, use_distributed_optimizer=True, clip_grad=1.0
        ),
        [model],
    )
    language.finalize_model_grads_func = finalize_model_grads
    language.no_sync_func = model.no_sync
    can_fold = megatron_compat.can_fold_token_scaling
    megatron_compat.can_fold_token_scaling = can_fold if fold else (lambda optimizer: False)
    norms, folded = [], []
    try:
        for seed, lengths, images in STEPS:
            batch = collate([make_sample(config, seed, lengths, images)], config, "bshd", 640)
            gpu_batch = to_device(batch, torch.device("cuda"))

            def forward(data_iterator, model, gpu_batch=gpu_batch):
                output = run_model(model, gpu_batch)
                return output, lambda output: loss_func(gpu_batch["loss_mask"], output)

            model.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(
                forward_step_func=forward,
                data_iterator=iter(()),
                model=[model],
                num_microbatches=1,
                seq_length=gpu_batch["input_ids"].shape[1],
                micro_batch_size=1,
            )
            folded.append(
                all(getattr(b, "deferred_scaling", None) is not None for b in model.buffers)
            )
            _, grad_norm, _ = optimizer.step()
            norms.append(float(grad_norm))
    finally:
        megatron_compat.can_fold_token_scaling = can_fold
    weights_after = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return {"initial": initial, "norms": norms, "folded": folded, "weights": weights_after}


def compare() -> list[Check]:
    config = tiny_config()
    reference = train(config, None, fold=False)
    folded = train(config, reference["initial"], fold=True)
    norm_errors = [abs(a - b) / b for a, b in zip(folded["norms"], reference["norms"], strict=True)]
    worst, error, differing = worst_relative_difference(folded["weights"], reference["weights"])
    elements = sum(w.numel() for w in reference["weights"].values())
    flipped = sum(int((folded["weights"][n] != w).sum()) for n, w in reference["weights"].items())
    return [
        Check(
            "steps whose scaling waited for the clipping (of 4; the first cannot)",
            sum(folded["folded"]),
            3,
            f"folded {folded['folded']}, megatron's order {reference['folded']}",
            True,
        ),
        Check("steps folded in megatron's order (must be none)", sum(reference["folded"]), 0),
        Check("gradient norm of the first step, folded vs megatron, rel", norm_errors[0], 0.0),
        Check(
            "gradient norm of later steps, worst rel",
            max(norm_errors[1:]),
            NORM_LIMIT,
            ", ".join(f"{e:.1e}" for e in norm_errors),
        ),
        Check(
            "bf16 weights after 4 steps, worst parameter, rel",
            error,
            BF16_ROUNDING,
            f"{worst}; {differing} of {len(reference['weights'])} parameters, "
            f"{flipped} of {elements:,} elements differ",
        ),
    ]


def main() -> int:
    init_distributed()
    checks = run_section("token scaling fold", compare)
    return 0 if print_table("per-token scaling folded into the clipping", checks) else 1


@needs_cuda
def test_token_scaling_fold():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())

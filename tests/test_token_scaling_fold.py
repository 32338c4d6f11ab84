"""The per-token gradient scaling folded into the clipping against megatron's two passes (GPU).

    torchrun --nproc-per-node 1 tests/test_token_scaling_fold.py

`megatron_compat.fold_token_scaling_into_gradient_clipping` leaves the 1 / tokens scaling of
`finalize_model_grads` to the optimizer's clipping, which then multiplies once by both. The tiny
model under megatron DDP with the distributed optimizer (TE's Adam, gradient clipping at 1.0, as
training and the benchmark run) is built twice from the same weights and takes four optimizer
steps on the same micro-batches through megatron's schedule with the per-token loss: once with the
fold, once in megatron's order (the fold refused when the optimizer is built). Every step folds;
the first starts from the same weights on both sides and is compared: its gradient norm is the
unscaled norm times the scaling instead of the norm of the rounded products, and each gradient
is multiplied once by min(1, max_norm / norm) x scaling instead of twice, so the gradients the
optimizer steps with differ by about two fp32 roundings (2^-24 each), and after Adam's update
(at most lr = 1e-3 per element) the fp32 main weights by at most one fp32 rounding of the sum:
limits 1e-6 relative for the norm, each gradient tensor and each fp32 main weight tensor. A
bf16 weight, rounded from its main weight, may land one bf16 step (<= 2^-7 of its value) away
where a rounding boundary falls between the two sides, so each bf16 tensor may differ by up to
2^-7 of its norm (a weight the update brought near zero, where the main weights' tiny absolute
difference is large against its value, may differ by several bf16 steps of that tiny value,
which the norm hardly sees). Later steps start from such weights, which change the next
gradients far beyond a rounding (Adam's early steps move every layer-norm weight alike, so many
of them sit at one boundary): their norms are printed, and only that they folded is checked.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
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
# A few fp32 roundings (2^-24 = 6e-8 each) with room for the order of the norm's sum.
FP32_LIMIT = 1e-6
BF16_STEP = 2**-7  # one bf16 step relative to each value, so to the tensor's norm
COMPARED_STEP = 1  # the step that starts from the same weights on both sides


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
    can_fold = megatron_compat.can_fold_token_scaling
    megatron_compat.can_fold_token_scaling = can_fold if fold else (lambda optimizer: False)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-3, bf16=True, use_distributed_optimizer=True, clip_grad=1.0
        ),
        [model],
    )
    language.finalize_model_grads_func = finalize_model_grads
    language.no_sync_func = model.no_sync
    norms, folded = [], []
    try:
        for step, (seed, lengths, images) in enumerate(STEPS, start=1):
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
            if step == COMPARED_STEP:
                bf16_weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
                main = main_weights_of(optimizer)
                main_weights = {n: w.detach().clone() for n, w in main.items()}
                stepped_gradients = {n: w.grad.detach().clone() for n, w in main.items()}
    finally:
        megatron_compat.can_fold_token_scaling = can_fold
    return {
        "initial": initial,
        "norms": norms,
        "folded": folded,
        "bf16_weights": bf16_weights,
        "main_weights": main_weights,
        "stepped_gradients": stepped_gradients,
    }


def main_weights_of(optimizer) -> dict[str, torch.Tensor]:
    """The distributed optimizer's fp32 main weights (one rank: each shard is a whole tensor);
    their `.grad` holds the gradients its last step used."""
    return {
        f"part {p} group {g} tensor {t}": tensor
        for p, part in enumerate(optimizer.chained_optimizers)
        for g, group in enumerate(part.shard_fp32_from_float16_groups)
        for t, tensor in enumerate(group)
    }


def compare() -> list[Check]:
    config = tiny_config()
    reference = train(config, None, fold=False)
    folded = train(config, reference["initial"], fold=True)
    norm_errors = [abs(a - b) / b for a, b in zip(folded["norms"], reference["norms"], strict=True)]
    main_worst, main_error, main_differing = worst_relative_difference(
        folded["main_weights"], reference["main_weights"]
    )
    grad_worst, grad_error, grad_differing = worst_relative_difference(
        folded["stepped_gradients"], reference["stepped_gradients"]
    )
    bf16 = folded["bf16_weights"], reference["bf16_weights"]
    bf16_worst, bf16_error, bf16_differing = worst_relative_difference(*bf16)
    elements = sum(w.numel() for w in bf16[1].values())
    flipped = sum(int((bf16[0][n] != w).sum()) for n, w in bf16[1].items())
    largest = max(float((bf16[0][n] - w).abs().max()) for n, w in bf16[1].items())
    return [
        Check(
            "steps whose scaling waited for the clipping (of 4)",
            sum(folded["folded"]),
            4,
            f"folded {folded['folded']}, megatron's order {reference['folded']}",
            True,
        ),
        Check("steps folded in megatron's order (must be none)", sum(reference["folded"]), 0),
        Check(
            "gradient norm of step 1, rel",
            norm_errors[0],
            FP32_LIMIT,
            "steps 2-4 from different bf16 weights: "
            + ", ".join(f"{e:.1e}" for e in norm_errors[1:]),
        ),
        Check(
            "gradients step 1 updated with (scaled, clipped), worst tensor, rel",
            grad_error,
            FP32_LIMIT,
            f"{grad_worst}; {grad_differing} of {len(reference['stepped_gradients'])} differ",
        ),
        Check(
            "fp32 main weights after step 1, worst tensor, rel",
            main_error,
            FP32_LIMIT,
            f"{main_worst}; {main_differing} of {len(reference['main_weights'])} tensors differ",
        ),
        Check(
            "bf16 weights after step 1, worst tensor, rel",
            bf16_error,
            BF16_STEP,
            f"{bf16_worst}; {bf16_differing} tensors, {flipped} of {elements:,} elements "
            f"differ, by at most {largest:.1e}",
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

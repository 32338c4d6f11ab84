"""The output layer on the loss tokens only, against the projection of every token (GPU).

    torchrun --nproc-per-node 1 tests/test_loss_token_output.py

`Qwen35LanguageModel` projects onto the vocabulary only the tokens whose loss mask is nonzero
(models/qwen35_vl/model.py). The same tiny model takes the same batch twice, with its loss mask
(those tokens only) and without (every token), and backpropagates the masked loss sum. The change
touches only the output layer, so its effects are checked where they arise: the masked per-token
losses, the output layer's weight gradient and the gradient it hands to the decoder must agree,
and the tokens without loss must come back as 0. fp32 limit 1e-5 relative: the same sums,
accumulated by GEMMs over another number of rows, which cuBLAS may tile differently (a few fp32
roundings; the rest of the backward amplifies such differences, on the tiny random model up to
1e-2 in single parameters, so whole-model fp32 gradients are no test of this change). bf16 limit
one bf16 rounding, 2^-8, for those and for every parameter's gradient. A row lost, doubled or
taken from the wrong token differs by O(1). The full path runs twice; its run-to-run difference
is shown beside each gradient row. Batches: in bf16 a BSHD batch of two rows and a THD pack with
training's kernels; in fp32 the BSHD batch in megatron's deterministic mode (torch's Gated
DeltaNet rule, which takes no packed sequences; fla's fp32 kernels compile for minutes).
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

FP32_LIMIT = 1e-5


def losses_and_gradients(model, batch: dict, with_mask: bool) -> tuple[torch.Tensor, dict]:
    """Per-token losses [B, S] and the gradients of their masked sum, the model's output layer
    told the loss mask or not; the gradient entering the decoder's output is `"decoder output"`."""
    from forward_step import run_model, to_device

    gpu_batch = to_device(batch, torch.device("cuda"))
    mask = gpu_batch["loss_mask"].float()
    captured = {}

    def keep_output_gradient(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.register_hook(lambda grad: captured.update(grad=grad.detach().float().clone()))

    hook = model.language_model.decoder.register_forward_hook(keep_output_gradient)
    model.zero_grad(set_to_none=True)
    try:
        losses = run_model(model, gpu_batch if with_mask else dict(gpu_batch, loss_mask=None))
        (losses.float() * mask).sum().backward()
    finally:
        hook.remove()
    gradients = {
        name: p.grad.detach().float().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    gradients["decoder output"] = captured["grad"]
    return losses.detach().float(), gradients


def gradient_check(label: str, name: str, grads: dict, every: dict, again: dict, limit: float):
    reference = {name: every[name]}
    floor = worst_relative_difference({name: again[name]}, reference)[1]
    return Check(
        f"{label}: gradient of {name}, rel",
        worst_relative_difference({name: grads[name]}, reference)[1],
        limit,
        f"every token, run twice: {floor:.1e}",
    )


def compare(dtype: torch.dtype, layouts: tuple[str, ...], deterministic: bool) -> list[Check]:
    config = tiny_config()
    set_model_parallel()
    model = build_megatron(config, dtype, deterministic_mode=deterministic)
    samples = [make_sample(config, *spec) for spec in TWO_MICRO_BATCHES]
    longest = max(s["input_ids"].numel() for s in samples)
    seq_length = -(-longest // 8) * 8
    fp32 = dtype == torch.float32
    limit = FP32_LIMIT if fp32 else BF16_ROUNDING
    checks = []
    for layout in layouts:
        label = f"{'fp32' if fp32 else 'bf16'} {layout}"
        batch = collate(samples, config, layout, seq_length * (2 if layout == "thd" else 1), 8)
        mask = batch["loss_mask"].cuda().float()
        selected, grads = losses_and_gradients(model, batch, with_mask=True)
        every, every_grads = losses_and_gradients(model, batch, with_mask=False)
        _, again_grads = losses_and_gradients(model, batch, with_mask=False)
        loss_error = float(((selected - every) * mask).norm() / (every * mask).norm())
        checks += [
            Check(
                f"{label}: masked per-token losses, rel",
                loss_error,
                limit,
                f"{int(mask.sum())} of {mask.numel()} tokens take loss",
            ),
            Check(
                f"{label}: losses of tokens without loss (must be 0)",
                float((selected * (1 - mask)).abs().max()),
                0.0,
            ),
            Check(
                f"{label}: parameters with a gradient, both ways",
                float(grads.keys() == every_grads.keys()),
                1.0,
                f"{len(grads) - 1}",
                True,
            ),
        ]
        for name in ("decoder output", "language_model.output_layer.weight"):
            checks.append(gradient_check(label, name, grads, every_grads, again_grads, limit))
        if not fp32:
            worst, error, differing = worst_relative_difference(grads, every_grads)
            floor = worst_relative_difference(again_grads, every_grads)[1]
            checks.append(
                Check(
                    f"{label}: every gradient (parameters, decoder output), worst, rel",
                    error,
                    limit,
                    f"{worst}; {differing} of {len(grads)} differ; "
                    f"every token, run twice: {floor:.1e}",
                )
            )
    return checks


def main() -> int:
    init_distributed()
    # megatron's deterministic mode (its torch Gated DeltaNet rule) requires TE's deterministic
    # attention.
    os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    checks = run_section("fp32", lambda: compare(torch.float32, ("bshd",), deterministic=True))
    checks += run_section(
        "bf16", lambda: compare(torch.bfloat16, ("bshd", "thd"), deterministic=False)
    )
    return 0 if print_table("output layer on the loss tokens only", checks) else 1


@needs_cuda
def test_loss_token_output():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())

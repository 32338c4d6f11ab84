"""Transformer Engine's fused cross entropy against megatron's native fused one (GPU).

    torchrun --nproc-per-node 1 tests/test_te_cross_entropy.py

Training computes the language and MTP losses with TE's kernel (`--cross-entropy-fusion-impl te`,
accepted by `megatron_compat.accept_te_cross_entropy`). Both implementations take the same bf16
logits of a full Qwen3.5 vocabulary (8,192 tokens x 248,320) and compute in fp32: per-token losses
may differ by the rounding of a log-sum-exp over the vocabulary in another summation order and
another exp (limit 1e-5 relative, about 170 fp32 roundings of a loss near 17; a wrong max, target
or normalisation is off by 1e-2 or more), the logits gradients by one bf16 rounding of the same fp32
value (2^-8 of the largest). Prints both sides' time and memory for forward + backward.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
    BF16_ROUNDING,
    Check,
    init_distributed,
    needs_cuda,
    print_table,
    relative_error,
    run_section,
    run_with_torchrun,
    set_model_parallel,
)

TOKENS, VOCAB = 8192, 248320
FP32_LOG_SUM_EXP = 1e-5


def logits_and_labels(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 logits [tokens, 1, vocab] spread like a trained model's (std 3), labels [tokens, 1]
    and an upstream gradient [tokens, 1] weighting each token's loss as a masked mean does."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(TOKENS, 1, VOCAB, device="cuda", generator=generator) * 3
    labels = torch.randint(0, VOCAB, (TOKENS, 1), device="cuda", generator=generator)
    mask = torch.rand(TOKENS, 1, device="cuda", generator=generator) < 0.8
    return logits.bfloat16(), labels, mask.float() / mask.sum()


def loss_grad_and_cost(cross_entropy, logits, labels, upstream, iters: int = 5):
    """Per-token losses, the logits gradient, seconds per forward + backward, peak extra GiB."""
    leaf = logits.detach().requires_grad_()
    loss = cross_entropy(leaf, labels)
    loss.backward(upstream)
    result = loss.detach().clone(), leaf.grad.detach().clone()
    leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(iters):
        cross_entropy(leaf, labels).backward(upstream)
        leaf.grad = None
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    extra_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
    return (*result, seconds, extra_gib)


def compare() -> list[Check]:
    from megatron.core import parallel_state
    from megatron.core.extensions.transformer_engine import te_parallel_cross_entropy
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    tp_group = parallel_state.get_tensor_model_parallel_group()
    logits, labels, upstream = logits_and_labels()
    native_loss, native_grad, native_s, native_gib = loss_grad_and_cost(
        lambda x, y: fused_vocab_parallel_cross_entropy(x, y, tp_group), logits, labels, upstream
    )
    te_loss, te_grad, te_s, te_gib = loss_grad_and_cost(
        lambda x, y: te_parallel_cross_entropy(x, y, tp_group), logits, labels, upstream
    )
    differing = int((te_grad != native_grad).sum())
    print(
        f"forward + backward over [{TOKENS}, 1, {VOCAB}] bf16 logits: native "
        f"{1e3 * native_s:.2f} ms, {native_gib:.2f} GiB extra; TE {1e3 * te_s:.2f} ms, "
        f"{te_gib:.2f} GiB extra",
        flush=True,
    )
    return [
        Check(
            "per-token loss, TE vs native, rel",
            relative_error(te_loss, native_loss),
            FP32_LOG_SUM_EXP,
            f"mean loss {float(native_loss.mean()):.4f}",
        ),
        Check(
            "logits gradient, TE vs native, rel",
            relative_error(te_grad.float(), native_grad.float()),
            BF16_ROUNDING,
            f"{differing:,} of {te_grad.numel():,} elements differ",
        ),
        Check("gradient dtype is the logits' (bf16)", float(te_grad.dtype != logits.dtype), 0),
    ]


def main() -> int:
    init_distributed()
    set_model_parallel()
    checks = run_section("cross entropy", compare)
    return 0 if print_table("TE fused cross entropy vs megatron native", checks) else 1


@needs_cuda
def test_te_cross_entropy():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())

"""Our packed rotations against HF's on a GPU, output and input gradient: the vision tower's
`specs.rotate_in_fp32` (TE's fused RoPE kernel; under the vision CUDA graphs the torch-compiled
fp32 rotation) against `apply_rotary_pos_emb_vision`, and the language attention's rotation
(megatron's unfused chain) against HF's `apply_rotary_pos_emb`.

    torchrun --nproc-per-node 1 tests/test_rotary_vs_hf.py

Limits. Language: 0, the same bf16 operations in the same order. Vision: both sides form cos,
sin and the products in fp32 and round once to bf16, so an element can differ only where the
two fp32 results (TE's `sincosf`, or the compiled kernel's, and fused multiply-adds against
torch's kernels) straddle a
bf16 rounding boundary: one bf16 unit in the last place of the largest value, 2^-7 relative
(max error over max value). A wrong angle row (angles indexed by position within a sequence,
or broadcast over tokens) differs by O(1).
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
    Check,
    needs_cuda,
    print_table,
    relative_error,
    run_section,
    run_with_torchrun,
)

BF16_ULP = 2.0**-7
CONFIG = SimpleNamespace(
    apply_rope_fusion=False,
    rotary_interleaved=False,
    multi_latent_attention=False,
    cuda_graph_impl="none",
)
VISION_GRAPH_CONFIG = SimpleNamespace(**{**vars(CONFIG), "cuda_graph_impl": "local"})
ONE_RANK = SimpleNamespace(size=lambda: 1, rank=lambda: 0)  # no context parallelism


def random_rotation_inputs(
    tokens: int, heads: int, head_dim: int, rotary_dim: int, seed: int, device: str
):
    """bf16 [T, heads, dim] activations and output gradient, fp32 [T, rotary dim] angles of
    positions up to the pack's length times inverse frequencies up to 1."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x, grad = (
        torch.randn(tokens, heads, head_dim, device=device, generator=generator).bfloat16()
        for _ in range(2)
    )
    angles = torch.rand(tokens, rotary_dim, device=device, generator=generator) * tokens
    return x, grad, angles


def output_and_input_grad(rotation, x: torch.Tensor, grad: torch.Tensor):
    inputs = x.clone().requires_grad_()
    out = rotation(inputs)
    out.backward(grad)
    return out.detach(), inputs.grad


def rotation_checks(device: str = "cuda"):
    """On a CPU (no TE kernel) the vision rotation is megatron's on the fp32 tensor, HF's
    operations in HF's order: tests/test_packed_rotary.py asserts every check measures 0 there."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    from models.qwen35_vl.specs import rotate_in_fp32

    x, grad, angles = random_rotation_inputs(2116, 16, 72, 72, seed=0, device=device)
    theirs = output_and_input_grad(
        lambda t: hf.apply_rotary_pos_emb_vision(t, t, angles.cos(), angles.sin())[0], x, grad
    )
    for tower, config in (("vision", CONFIG), ("vision under CUDA graphs", VISION_GRAPH_CONFIG)):
        ours = output_and_input_grad(
            lambda t, config=config: rotate_in_fp32(
                t[:, None], angles[:, None, None], config, ONE_RANK
            )[:, 0],
            x,
            grad,
        )
        for what, mine, reference in zip(("output", "input gradient"), ours, theirs, strict=True):
            differing = int((mine != reference).sum())
            yield Check(
                f"{tower}, ours vs HF: {what}, rel",
                relative_error(mine, reference),
                BF16_ULP,
                f"{differing:,} of {mine.numel():,} elements differ",
            )

    x, grad, angles = random_rotation_inputs(8192, 4, 256, 64, seed=1, device=device)
    ours = output_and_input_grad(
        lambda t: apply_rotary_pos_emb(
            t[:, None], angles[:, None, None], CONFIG, cp_group=ONE_RANK
        )[:, 0],
        x,
        grad,
    )
    cos, sin = (part.bfloat16()[None] for part in (angles.cos(), angles.sin()))
    theirs = output_and_input_grad(
        lambda t: hf.apply_rotary_pos_emb(t[None], t[None], cos, sin, unsqueeze_dim=2)[0][0],
        x,
        grad,
    )
    for what, mine, reference in zip(("output", "input gradient"), ours, theirs, strict=True):
        yield Check(
            f"language, partial rotary, megatron vs HF: {what}, elements differing",
            float((mine != reference).sum()),
            0.0,
        )


def main() -> int:
    checks = run_section("rotation", rotation_checks)
    return 0 if print_table("Packed RoPE vs HF's rotations", checks) else 1


@needs_cuda
def test_rotary_vs_hf():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())

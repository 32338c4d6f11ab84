"""The single-pass rotation of `specs.PackedRotarySelfAttention` equals megatron-core's THD RoPE
(which reads sequence boundaries back to the host) bit for bit, for per-token angles without
context parallelism: language MRoPE angles restarting per sequence and the vision tower's.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import (
    _apply_rotary_pos_emb_thd,
    apply_rotary_pos_emb,
)

from tests.test_rotary_vs_hf import CONFIG, ONE_RANK, rotation_checks


@pytest.mark.parametrize(
    ("lengths", "heads", "head_dim", "rotary_dim"),
    [((7, 12, 5), 4, 256, 64), ((16, 64, 36, 100), 3, 72, 72)],  # language (partial), vision
)
def test_single_pass_equals_megatron_thd_path(lengths, heads, head_dim, rotary_dim):
    generator = torch.Generator().manual_seed(0)
    tokens = sum(lengths)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(tokens, heads, head_dim, generator=generator, dtype=torch.bfloat16)
    angles = torch.randn(tokens, 1, 1, rotary_dim, generator=generator) * 10
    megatron = _apply_rotary_pos_emb_thd(query, cu_seqlens, angles, cp_group=ONE_RANK)
    single_pass = apply_rotary_pos_emb(
        query.unsqueeze(1), angles, config=CONFIG, cp_group=ONE_RANK
    ).squeeze(1)
    assert torch.equal(single_pass, megatron)


def test_rotations_equal_hf_on_cpu():
    """The language rotation and the vision tower's fp32 one (megatron's chain where TE's fused
    kernel is absent) are HF's, bit for bit; tests/test_rotary_vs_hf.py checks the GPU path."""
    checks = list(rotation_checks("cpu"))
    assert len(checks) == 6
    assert all(check.measured == 0 for check in checks), checks


def test_the_graphed_vision_rotation_is_megatrons_fp32_rotation_bit_for_bit():
    """The formula `specs.rotate_halves_in_fp32` compiles for the vision CUDA graphs, run eagerly:
    megatron's rotation of the fp32 tensor, output and input gradient."""
    from models.qwen35_vl.specs import rotation_of_halves_in_fp32

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(300, 1, 16, 72, generator=generator, dtype=torch.bfloat16)
    angles = torch.rand(300, 1, 1, 72, generator=generator) * 300
    grad = torch.randn(300, 1, 16, 72, generator=generator, dtype=torch.bfloat16)
    results = []
    for rotation in (
        lambda t, a: rotation_of_halves_in_fp32(t, a.cos(), a.sin()),
        lambda t, a: apply_rotary_pos_emb(t.float(), a, config=CONFIG, cp_group=ONE_RANK).to(
            t.dtype
        ),
    ):
        inputs = query.clone().requires_grad_()
        output = rotation(inputs, angles)
        output.backward(grad)
        results.append((output.detach(), inputs.grad))
    (output, input_grad), (expected, expected_grad) = results
    assert torch.equal(output, expected) and torch.equal(input_grad, expected_grad)


def test_vision_layers_rotate_in_fp32():
    """The vision tower's layers keep HF's fp32 rotation (TE's fused kernel on a GPU), the
    language attention megatron's bf16 one."""
    from models.qwen35_vl.specs import (
        PackedRotarySelfAttention,
        VisionRotarySelfAttention,
        vision_layer_spec,
    )

    assert vision_layer_spec().submodules.self_attention.module is VisionRotarySelfAttention
    assert VisionRotarySelfAttention.rotate is not PackedRotarySelfAttention.rotate

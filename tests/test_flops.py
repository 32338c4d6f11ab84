"""CPU checks of the FLOPs model (models/qwen35_vl/flops.py, the spec's `training_flops`): every
part against a hand count on tiny dense and MoE configs (two packed sequences of 100 and 28
tokens, one 1x4x6 image), the scaling with sequence length, a collated batch's FLOPs as the
training log counts them, and the MFU arithmetic (data/throughput.py).
"""

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.throughput import PEAK_BF16_TFLOPS, batch_lengths_and_grids, mfu, peak_tflops_of
from models import get_model_spec
from models.qwen35_vl.configuration import Qwen35VLConfig, TextConfig, VisionConfig
from models.qwen35_vl.flops import FlopsBreakdown, training_flops

LENGTHS = [100, 28]
GRIDS = [(1, 4, 6)]
T = 100 + 28
VISION = VisionConfig(
    depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=256
)
DENSE = Qwen35VLConfig(
    name="tiny",
    text=TextConfig(
        hidden_size=256,
        num_hidden_layers=4,  # linear, linear, linear, full
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        intermediate_size=512,
        vocab_size=1024,
    ),
    vision=VISION,
)
MOE = Qwen35VLConfig(
    name="tiny-moe",
    text=TextConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=48,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=192,
        vocab_size=1024,
    ),
    vision=VISION,
)

# Shared by both configs (h 256, 2 heads x 256, 1 kv head, vocab 1024), forward FLOPs.
ATTN_PROJ = (
    2 * T * 256 * (2 * 2 * 256)  # q with its output gate
    + 2 * T * 256 * (1 * 256)  # k
    + 2 * T * 256 * (1 * 256)  # v
    + 2 * T * (2 * 256) * 256  # o
)
ATTN_SCORES = 2 * 2 * (100 * 101 // 2 + 28 * 29 // 2) * 2 * 256
LM_HEAD = 2 * T * 256 * 1024
EH_PROJ = 2 * T * (2 * 256) * 256
# key_dim 2*d_k, value_dim 4*d_v, conv_dim 2*key_dim + value_dim; 3 Gated DeltaNet layers.
DENSE_GDN_PROJ = (
    2 * T * 256 * 512  # in_proj_qkv (conv_dim 2*128 + 256)
    + 2 * T * 256 * 256  # in_proj_z
    + 2 * T * 256 * 4  # in_proj_b
    + 2 * T * 256 * 4  # in_proj_a
    + 2 * T * 256 * 256  # out_proj
)
# Vision: N = 1*4*6 = 24 patches, patch volume 3*2*16*16 = 1536, 6 merged tokens of 4*128.
VISION_EXPECTED = {
    "vision_patch_embed": 3 * (2 * 24 * 1536 * 128),
    "vision_layers": 3
    * 2  # depth
    * (
        2 * 24 * 128 * 384  # qkv
        + 2 * 24 * 128 * 128  # proj
        + 2 * 24 * 128 * 256  # fc1
        + 2 * 24 * 256 * 128  # fc2
    ),
    "vision_attention": 3 * 2 * (2 * 2 * 24 * 24 * 128),
    "vision_merger": 3 * (2 * 6 * 512 * 512 + 2 * 6 * 512 * 256),
}


def test_dense_parts_match_hand_count() -> None:
    got = training_flops(DENSE, LENGTHS, GRIDS)
    dense_mlp = 3 * 2 * T * 256 * 512
    expected = {
        "attention_projections": 3 * 1 * ATTN_PROJ,
        "attention_scores": 3 * 1 * ATTN_SCORES,
        "gdn_projections": 3 * 3 * DENSE_GDN_PROJ,
        "gdn_conv": 3 * 3 * (2 * T * 4 * 512),
        # chunk 64, d_k = d_v = 64, 4 value heads: the eight chunked terms, each 2*64*64.
        "gdn_delta_rule": 3 * 3 * T * 4 * (8 * 2 * 64 * 64),
        "mlp": 3 * 4 * dense_mlp,
        "moe_router": 0,
        "moe_routed_experts": 0,
        "moe_shared_expert": 0,
        "lm_head": 3 * LM_HEAD,
        "mtp": 3 * (EH_PROJ + ATTN_PROJ + ATTN_SCORES + dense_mlp + LM_HEAD),
        **VISION_EXPECTED,
    }
    parts = got.as_dict()
    assert parts.pop("total") == got.total == sum(expected.values())
    assert parts == expected
    assert all(isinstance(value, float) for value in parts.values())


def test_moe_parts_match_hand_count() -> None:
    got = training_flops(MOE, LENGTHS, GRIDS)
    router = 2 * T * 256 * 8
    routed = 2 * 3 * 2 * T * 256 * 128  # top-2 experts, 3 matmuls each
    shared = 3 * 2 * T * 256 * 192 + 2 * T * 256  # shared expert + its gate
    assert got.mlp == 0
    assert got.moe_router == 3 * 4 * router
    assert got.moe_routed_experts == 3 * 4 * routed
    assert got.moe_shared_expert == 3 * 4 * shared
    assert got.mtp == 3 * (EH_PROJ + ATTN_PROJ + ATTN_SCORES + router + routed + shared + LM_HEAD)
    # d_k 32 and d_v 48 tell the chunk (64) terms from the state terms.
    per_token_head = (
        2 * 64 * 32  # A = beta K K^T
        + 2 * 64 * 32  # w = A (beta exp(g) K)
        + 2 * 64 * 48  # u = A (beta V)
        + 2 * 32 * 48  # w S
        + 2 * 32 * 48  # S update
        + 2 * 32 * 48  # q S
        + 2 * 64 * 32  # intra-chunk Q K^T
        + 2 * 64 * 48  # intra-chunk attention x new values
    )
    assert got.gdn_delta_rule == 3 * 3 * T * 4 * per_token_head
    # key_dim 64, value_dim 192, conv_dim 2*64 + 192 = 320.
    assert got.gdn_projections == 3 * 3 * (
        2 * T * 256 * 320 + 2 * T * 256 * 192 + 2 * 2 * T * 256 * 4 + 2 * T * 192 * 256
    )
    assert got.gdn_conv == 3 * 3 * (2 * T * 4 * 320)


def test_doubling_sequence_lengths() -> None:
    base = training_flops(DENSE, LENGTHS, GRIDS)
    doubled = training_flops(DENSE, [2 * s for s in LENGTHS], GRIDS)
    linear = [
        "attention_projections",
        "gdn_projections",
        "gdn_conv",
        "gdn_delta_rule",
        "mlp",
        "lm_head",
    ]
    for name in linear:
        assert getattr(doubled, name) == 2 * getattr(base, name), name
    for name in VISION_EXPECTED:
        assert getattr(doubled, name) == getattr(base, name), name
    assert doubled.attention_scores / base.attention_scores == pytest.approx(4, rel=0.01)
    assert 2 < doubled.mtp / base.mtp < 4


def test_without_mtp() -> None:
    with_mtp = training_flops(DENSE, LENGTHS, GRIDS)
    without = training_flops(DENSE, LENGTHS, GRIDS, include_mtp=False)
    assert without.mtp == 0
    assert dataclasses.replace(with_mtp, mtp=0.0) == without
    assert training_flops(DENSE.with_mtp_layers(0), LENGTHS, GRIDS) == without


def test_mfu() -> None:
    assert PEAK_BF16_TFLOPS == {"H100 SXM": 989.0, "H200": 989.0}
    # 8 GPUs at 989 TFLOP/s for 2 s can do 8 * 989e12 * 2 FLOPs; half of that is 50% MFU.
    assert mfu(8 * 989e12 * 2 / 2, 2.0, 8) == pytest.approx(0.5, rel=1e-12)
    assert mfu(3e15, 1.5, 4, peak_tflops=1000.0) == pytest.approx(3e15 / (1.5 * 4 * 1000e12))
    with pytest.raises(ValueError):
        mfu(1e15, 0.0, 8)


def test_empty_step() -> None:
    assert training_flops(DENSE, [], []) == FlopsBreakdown()


@pytest.mark.parametrize("mode", ["bshd", "thd"])
def test_batch_flops_use_real_lengths_and_image_grids(mode: str) -> None:
    """The training log's FLOPs of a collated micro-batch: padding is not counted, packed
    sequences are attended separately, every image's grid counts."""
    from tests.gpu_harness import collate, make_sample, tiny_config

    config = tiny_config()
    samples = [
        make_sample(config, 0, (30, 20), [(64, 96)]),
        make_sample(config, 1, (30, 10, 10), [(32, 32), (64, 32)]),
    ]
    lengths = [int(s["input_ids"].numel()) for s in samples]
    grids = [tuple(g) for s in samples for g in s["image_grid_thw"].tolist()]
    batch = collate(samples, config, mode, seq_length=256, pad_multiple=8)
    expected = training_flops(config, lengths, grids).total
    spec = get_model_spec("qwen35_vl")
    counted = spec.training_flops(config, *batch_lengths_and_grids(batch))
    assert counted == pytest.approx(expected, rel=1e-12)
    assert len(grids) == 3 and max(lengths) < 256  # padding present, three images


def test_peak_by_device_name() -> None:
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_of("NVIDIA H200") == 989.0
    assert peak_tflops_of("NVIDIA H100 PCIe") is None  # a lower peak, not listed
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") is None

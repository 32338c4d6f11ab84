"""CPU checks of the Qwen3-VL FLOPs model (models/qwen3_vl/flops.py): every part against hand
counts on tiny dense, MoE and mixed dense/MoE configs, the attention term's quadratic scaling, the
vision tower with DeepStack mergers, input validation, and the weight matmuls against HF models.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from models.qwen3_vl.configuration import VARIANTS, Qwen3VLConfig, TextConfig, VisionConfig
from models.qwen3_vl.flops import FlopsBreakdown, training_flops

LENGTHS = [100, 28]
GRIDS = [(1, 4, 6)]
T = 100 + 28
TOKEN_IDS = dict(
    image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003
)
VISION = VisionConfig(
    depth=3,
    hidden_size=128,
    intermediate_size=256,
    num_heads=2,
    out_hidden_size=256,
    deepstack_visual_indexes=(0, 2),
    num_position_embeddings=16,
)
# h 256, 4 heads x 96 (q width 384), 2 kv heads (kv width 192), vocab 1024.
TEXT = dict(
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=96,
    mrope_section=(18, 15, 15),
    intermediate_size=512,
    vocab_size=1024,
)
DENSE = Qwen3VLConfig(
    name="tiny", text=TextConfig(num_hidden_layers=3, **TEXT), vision=VISION, **TOKEN_IDS
)
MOE_FIELDS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128)
MOE = Qwen3VLConfig(
    name="tiny-moe",
    text=TextConfig(num_hidden_layers=4, **MOE_FIELDS, **TEXT),
    vision=VISION,
    **TOKEN_IDS,
)
# Every second layer sparse (1, 3, 5) except layer 3: sparse 1 and 5, dense 0, 2, 3, 4.
MIXED = Qwen3VLConfig(
    name="tiny-mixed",
    text=TextConfig(
        num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=(3,), **MOE_FIELDS, **TEXT
    ),
    vision=VISION,
    **TOKEN_IDS,
)

# Per layer, forward FLOPs.
ATTN_PROJ = (
    2 * T * 256 * 384  # q
    + 2 * T * 256 * 192  # k
    + 2 * T * 256 * 192  # v
    + 2 * T * 384 * 256  # o
)
ATTN_SCORES = 2 * 2 * (100 * 101 // 2 + 28 * 29 // 2) * 4 * 96
DENSE_MLP = 3 * 2 * T * 256 * 512  # gate, up, down
ROUTER = 2 * T * 256 * 8
ROUTED = 2 * 3 * 2 * T * 256 * 128  # top-2 experts, 3 matmuls each
LM_HEAD = 2 * T * 256 * 1024
# Vision: N = 1*4*6 = 24 patches, patch volume 3*2*16*16 = 1536, 6 merged tokens of 4*128 = 512.
MERGER = 2 * 6 * 512 * 512 + 2 * 6 * 512 * 256  # fc1, fc2
VISION_EXPECTED = {
    "vision_patch_embed": 3 * (2 * 24 * 1536 * 128),
    "vision_layers": 3
    * 3  # depth
    * (
        2 * 24 * 128 * 384  # qkv
        + 2 * 24 * 128 * 128  # proj
        + 2 * 24 * 128 * 256  # fc1
        + 2 * 24 * 256 * 128  # fc2
    ),
    "vision_attention": 3 * 3 * (2 * 2 * 24 * 24 * 128),
    "vision_merger": 3 * MERGER,
    "vision_deepstack_mergers": 3 * 2 * MERGER,  # two DeepStack levels
}


def check_parts(config: Qwen3VLConfig, expected: dict[str, int]) -> None:
    got = training_flops(config, LENGTHS, GRIDS)
    parts = got.as_dict()
    assert parts.pop("total") == got.total == sum(expected.values())
    assert parts == expected
    assert all(isinstance(value, float) for value in parts.values())


def test_dense_parts_match_hand_count() -> None:
    check_parts(
        DENSE,
        {
            "attention_projections": 3 * 3 * ATTN_PROJ,
            "attention_scores": 3 * 3 * ATTN_SCORES,
            "mlp": 3 * 3 * DENSE_MLP,
            "moe_router": 0,
            "moe_routed_experts": 0,
            "lm_head": 3 * LM_HEAD,
            **VISION_EXPECTED,
        },
    )


def test_moe_parts_match_hand_count() -> None:
    assert MOE.text.sparse_layers == (True,) * 4
    check_parts(
        MOE,
        {
            "attention_projections": 3 * 4 * ATTN_PROJ,
            "attention_scores": 3 * 4 * ATTN_SCORES,
            "mlp": 0,
            "moe_router": 3 * 4 * ROUTER,
            "moe_routed_experts": 3 * 4 * ROUTED,
            "lm_head": 3 * LM_HEAD,
            **VISION_EXPECTED,
        },
    )


def test_mixed_dense_and_moe_layers_match_hand_count() -> None:
    assert MIXED.text.sparse_layers == (False, True, False, False, False, True)
    check_parts(
        MIXED,
        {
            "attention_projections": 3 * 6 * ATTN_PROJ,
            "attention_scores": 3 * 6 * ATTN_SCORES,
            "mlp": 3 * 4 * DENSE_MLP,
            "moe_router": 3 * 2 * ROUTER,
            "moe_routed_experts": 3 * 2 * ROUTED,
            "lm_head": 3 * LM_HEAD,
            **VISION_EXPECTED,
        },
    )


@pytest.mark.parametrize("config", [DENSE, MIXED], ids=lambda c: c.name)
def test_attention_scores_scale_quadratically(config: Qwen3VLConfig) -> None:
    base = training_flops(config, LENGTHS, GRIDS)
    doubled = training_flops(config, [2 * s for s in LENGTHS], GRIDS)
    pairs = sum(s * (s + 1) // 2 for s in LENGTHS)
    doubled_pairs = sum(2 * s * (2 * s + 1) // 2 for s in LENGTHS)
    assert doubled.attention_scores * pairs == base.attention_scores * doubled_pairs
    assert doubled.attention_scores / base.attention_scores == pytest.approx(4, rel=0.01)
    for name in ("attention_projections", "mlp", "moe_router", "moe_routed_experts", "lm_head"):
        assert getattr(doubled, name) == 2 * getattr(base, name), name
    for name in VISION_EXPECTED:
        assert getattr(doubled, name) == getattr(base, name), name
    # Packing two causal halves attends over fewer pairs than one sequence of the same tokens.
    one = training_flops(config, [2048], [])
    packed = training_flops(config, [1024, 1024], [])
    assert one.attention_projections == packed.attention_projections
    assert one.attention_scores / packed.attention_scores == pytest.approx(2, rel=0.001)


def test_vision_tower_with_deepstack_mergers() -> None:
    """One 2-frame 4x6 video grid and one 8x4 image: attention stays within each frame."""
    grids = [(2, 4, 6), (1, 8, 4)]
    got = training_flops(DENSE, [], grids)
    patches, merged_tokens = 2 * 24 + 32, (2 * 24 + 32) // 4  # 80 patches, 20 merged tokens
    merger = 2 * merged_tokens * 512 * 512 + 2 * merged_tokens * 512 * 256
    block = 2 * patches * 128 * (384 + 128 + 256) + 2 * patches * 256 * 128
    assert got.as_dict() == {
        **FlopsBreakdown().as_dict(),
        "vision_patch_embed": 3 * 2 * patches * 1536 * 128,
        "vision_layers": 3 * 3 * block,
        "vision_attention": 3 * 3 * 2 * 2 * (2 * 24**2 + 32**2) * 128,
        "vision_merger": 3 * merger,
        "vision_deepstack_mergers": 3 * 2 * merger,
        "total": got.total,
    }
    # Per image, the parts add up; the text parts stay zero.
    single = [training_flops(DENSE, [], [grid]) for grid in grids]
    assert got.total == sum(part.total for part in single)
    no_deepstack = Qwen3VLConfig(
        name="no-deepstack",
        text=DENSE.text,
        vision=dataclasses.replace(VISION, deepstack_visual_indexes=()),
        **TOKEN_IDS,
    )
    without = training_flops(no_deepstack, [], grids)
    assert without.vision_deepstack_mergers == 0
    assert got.total - without.total == got.vision_deepstack_mergers == 2 * got.vision_merger


def test_empty_step_and_validation() -> None:
    assert training_flops(DENSE, [], []) == FlopsBreakdown()
    assert training_flops(DENSE, [0, 0], []) == FlopsBreakdown()
    with pytest.raises(ValueError, match="non-negative"):
        training_flops(DENSE, [10, -1], [])
    for grid in [(1, 4, 5), (1, 3, 4), (0, 4, 4), (1, 0, 4)]:
        with pytest.raises(ValueError, match="spatial merge size 2"):
            training_flops(DENSE, [10], [grid])


def meta_hf_model(config: Qwen3VLConfig) -> torch.nn.Module:
    """HF's model for our config, on the meta device (no memory, any size)."""
    moe = config.text.is_moe
    model_class = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        return model_class(config.to_hf_config())


def matmul_weights(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Element counts of the matmul weights (2-D and up) of `module`, by name."""
    return {
        name: p.numel()
        for name, p in module.named_parameters()
        if p.dim() >= 2 and not any(part in name for part in skip)
    }


CHECKED = [DENSE, MOE, MIXED, *(VARIANTS[name] for name in ("proxy", "proxy-moe", "8b", "30b_a3b"))]


@pytest.mark.parametrize("config", CHECKED, ids=lambda c: c.name)
def test_linear_flops_equal_six_tokens_times_hf_weights(config: Qwen3VLConfig) -> None:
    """Text only: without the attention scores, 6 x tokens x the language model's matmul
    weights (active experts only, embeddings excluded, lm_head included) counted on HF's model;
    vision: 6 x patches x the per-patch weights + 6 x merged tokens x the mergers' weights."""
    model = meta_hf_model(config)
    t, v = config.text, config.vision
    language = matmul_weights(model.model.language_model, skip=("embed_tokens",))
    active_share = t.num_experts_per_tok / t.num_experts if t.is_moe else 0.0
    weights = sum(
        count * active_share if ".experts." in name else count for name, count in language.items()
    )
    weights += model.lm_head.weight.numel()
    got = training_flops(config, LENGTHS, [])
    assert got.total - got.attention_scores == pytest.approx(6 * T * weights, rel=1e-12)
    # Each layer holds only q/k/v/o and a dense MLP or a router + experts.
    kinds = {name.split(".", 2)[2].rsplit(".", 1)[0] for name in language}
    allowed = {f"self_attn.{p}_proj" for p in "qkvo"} | {
        f"mlp.{p}_proj" for p in ("gate", "up", "down")
    }
    assert kinds <= allowed | {"mlp.gate", "mlp.experts"}

    grid = (1, 4, 6)
    patches, merged_tokens = 24, 24 // v.spatial_merge_size**2
    vision = matmul_weights(model.model.visual, skip=("pos_embed",))
    per_merged = sum(count for name, count in vision.items() if "merger" in name)
    per_patch = sum(vision.values()) - per_merged
    image = training_flops(config, [], [grid])
    vision_linear = image.total - image.vision_attention
    assert vision_linear == 6 * (patches * per_patch + merged_tokens * per_merged)

"""Qwen3.5-VL configuration: exact parameter counts against HF models built on the meta device,
HF config round trips, the megatron hybrid layer pattern, config validation and published sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    LlamaConfig,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
)

from models.qwen35_vl.configuration import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    TextConfig,
    from_hf_config,
    get_variant,
    interleaved_layer_types,
)

COUNT_VARIANTS = ["proxy", "proxy-moe", "9b", "35b_a3b", "397b"]
ROUND_TRIP_VARIANTS = ["proxy", "proxy-moe", "9b", "397b"]


def meta_hf_model(hf_config, moe: bool):
    model_class = Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration
    with torch.device("meta"):
        return model_class(hf_config)


@pytest.fixture(scope="module", params=COUNT_VARIANTS)
def variant_and_model(request):
    config = get_variant(request.param)
    return config, meta_hf_model(config.to_hf_config(), config.text.is_moe)


def test_total_parameters_match_hf(variant_and_model):
    config, model = variant_and_model
    # parameters() deduplicates tied weights, as a checkpoint does.
    hf_total = sum(p.numel() for p in model.parameters())
    counts = config.parameter_counts()
    assert counts.total == hf_total
    assert counts.language + counts.vision == counts.total
    hf_vision = sum(p.numel() for p in model.model.visual.parameters())
    assert counts.vision == hf_vision


def test_active_parameters_match_hf_experts(variant_and_model):
    config, model = variant_and_model
    t = config.text
    counts = config.parameter_counts()
    if not t.is_moe:
        assert counts.active == counts.total
        assert counts.routed_experts == 0
        return
    expert_numel = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    )
    assert expert_numel == t.num_hidden_layers * t.num_experts * 3 * t.hidden_size * (
        t.moe_intermediate_size
    )
    inactive = expert_numel * (t.num_experts - t.num_experts_per_tok) // t.num_experts
    assert counts.active == counts.total - inactive
    per_layer_expert = 3 * t.hidden_size * t.moe_intermediate_size
    assert counts.active == counts.total - (
        (t.num_experts - t.num_experts_per_tok) * per_layer_expert * t.num_hidden_layers
    )
    # Routed experts include the MTP layer's.
    assert counts.routed_experts == (
        (t.num_hidden_layers + t.mtp_num_hidden_layers) * t.num_experts * per_layer_expert
    )


@pytest.mark.parametrize("name", ROUND_TRIP_VARIANTS)
def test_from_hf_config_round_trip_except_mtp(name):
    config = get_variant(name)
    back = from_hf_config(config.to_hf_config(), name="round-trip")
    assert back.vision == config.vision
    # The MTP depth is checked separately (test_from_hf_config_round_trip_keeps_mtp_layers).
    assert dataclasses.replace(back.text, mtp_num_hidden_layers=0) == dataclasses.replace(
        config.text, mtp_num_hidden_layers=0
    )
    for token in ("image_token_id", "video_token_id", "vision_start_token_id"):
        assert getattr(back, token) == getattr(config, token)
    assert back.vision_end_token_id == config.vision_end_token_id
    assert back.name == "round-trip"


@pytest.mark.parametrize("name", ROUND_TRIP_VARIANTS)
def test_from_hf_config_round_trip_of_dict(name):
    config = get_variant(name).with_mtp_layers(0)
    back = from_hf_config(config.to_hf_config().to_dict())
    assert back.text == config.text
    assert back.vision == config.vision


@pytest.mark.parametrize("name", ROUND_TRIP_VARIANTS)
def test_from_hf_config_round_trip_keeps_mtp_layers(name):
    config = get_variant(name)
    back = from_hf_config(config.to_hf_config())
    assert back.text.mtp_num_hidden_layers == config.text.mtp_num_hidden_layers
    assert back.text == config.text


def test_from_hf_config_reads_mtp_layers_of_released_configs():
    hf = get_variant("9b").to_hf_config()
    hf.text_config.mtp_num_hidden_layers = 1  # as in the released config.json files
    assert from_hf_config(hf).text.mtp_num_hidden_layers == 1


def test_from_hf_config_rejects_other_models():
    with pytest.raises(ValueError, match="got 'llama'"):
        from_hf_config(LlamaConfig())
    with pytest.raises(ValueError, match="qwen3_5"):
        from_hf_config({"model_type": "llama"})


def test_hybrid_layer_pattern_9b():
    config = get_variant("9b")
    assert config.text.mtp_num_hidden_layers == 1
    assert config.hybrid_layer_pattern() == "G-G-G-*-" * 8 + "/*-"
    assert config.with_mtp_layers(0).hybrid_layer_pattern() == "G-G-G-*-" * 8


def test_hybrid_layer_pattern_397b():
    pattern = get_variant("397b").hybrid_layer_pattern()
    assert pattern.startswith("GEGEGE*E")
    assert pattern.endswith("/*E")
    main = pattern.split("/")[0]
    assert len(main) == 2 * 60
    assert main == "GEGEGE*E" * 15


def test_layer_types_are_three_linear_then_one_full():
    assert interleaved_layer_types(8) == (LINEAR_ATTENTION,) * 3 + (FULL_ATTENTION,) + (
        LINEAR_ATTENTION,
    ) * 3 + (FULL_ATTENTION,)


SMALL_TEXT = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    linear_num_value_heads=8,
)


def test_mismatched_mrope_section_raises():
    with pytest.raises(ValueError, match="mrope_section"):
        TextConfig(**SMALL_TEXT, intermediate_size=1024, mrope_section=(11, 11, 11))


def test_dense_and_moe_are_exclusive():
    with pytest.raises(ValueError, match="exactly one"):
        TextConfig(**SMALL_TEXT)
    with pytest.raises(ValueError, match="exactly one"):
        TextConfig(**SMALL_TEXT, intermediate_size=1024, num_experts=4, num_experts_per_tok=2)


def test_layer_types_length_checked():
    with pytest.raises(ValueError, match="layer_types has 3 entries"):
        TextConfig(**SMALL_TEXT, intermediate_size=1024, layer_types=(LINEAR_ATTENTION,) * 3)


def test_vision_out_hidden_size_must_match_text():
    config = get_variant("proxy")
    with pytest.raises(ValueError, match="out_hidden_size 256"):
        dataclasses.replace(config, vision=dataclasses.replace(config.vision, out_hidden_size=256))


def test_9b_published_size():
    total = get_variant("9b").parameter_counts().total
    assert abs(total - 9.41e9) / 9.41e9 < 0.005
    # HF's default Qwen3_5Config is the 9B text model; with the 9B vision projection width
    # (out_hidden_size 4096) its parameter count is the same 9.41e9.
    hf_default = Qwen3_5Config(vision_config={"out_hidden_size": 4096})
    model = meta_hf_model(hf_default, moe=False)
    hf_total = sum(p.numel() for p in model.parameters())
    assert abs(hf_total - 9.41e9) / 9.41e9 < 0.005
    assert from_hf_config(hf_default).parameter_counts().total == hf_total


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [("35b_a3b", 35e9, 3e9), ("397b", 397e9, 17e9), ("122b_a10b", 122e9, 10e9)],
)
def test_moe_published_sizes(name, total, active):
    counts = get_variant(name).parameter_counts()
    assert abs(counts.total - total) / total < 0.01
    # The "A<n>B" names are rounded down.
    assert active <= counts.active < active * 1.35

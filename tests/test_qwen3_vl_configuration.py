"""Qwen3-VL configuration: exact parameter counts against HF models built on the meta device for
every variant, HF config round trips (objects, dicts and released config.json layouts), field
validation naming the bad field, variant lookup and the published model sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    LlamaConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers import Qwen3VLConfig as HFQwen3VLConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

from models.qwen3_vl.configuration import (
    VARIANT_ALIASES,
    VARIANTS,
    TextConfig,
    VisionConfig,
    from_hf_config,
    get_variant,
)

RELEASED = ["2b", "4b", "8b", "32b", "30b_a3b", "235b_a22b"]


def meta_hf_model(config):
    """HF's model for our config, on the meta device (no memory, any size)."""
    moe = config.text.is_moe
    model_class = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        return model_class(config.to_hf_config())


def hf_numel(module: torch.nn.Module) -> int:
    # parameters() yields a tied weight once, as a checkpoint stores it.
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_and_model(request):
    config = get_variant(request.param)
    return config, meta_hf_model(config)


# ---- parameter counts ---------------------------------------------------------------------


def test_variant_names():
    assert set(VARIANTS) == {"proxy", "proxy-moe", *RELEASED}
    assert {name for name, config in VARIANTS.items() if config.text.is_moe} == {
        "proxy-moe",
        "30b_a3b",
        "235b_a22b",
    }
    for name, config in VARIANTS.items():
        assert config.name == name
        assert config.source


def test_total_parameters_match_hf(variant_and_model):
    config, model = variant_and_model
    counts = config.parameter_counts()
    assert counts.total == hf_numel(model)
    assert counts.vision == hf_numel(model.model.visual)
    assert counts.language == hf_numel(model.model.language_model) + (
        0 if config.text.tie_word_embeddings else model.lm_head.weight.numel()
    )
    assert counts.language + counts.vision == counts.total
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert tied == config.text.tie_word_embeddings
    embedding = model.model.language_model.embed_tokens.weight.numel()
    assert counts.embeddings == embedding * (1 if tied else 2)


def test_deepstack_mergers_match_hf(variant_and_model):
    config, model = variant_and_model
    visual = model.model.visual
    assert len(visual.deepstack_merger_list) == len(config.vision.deepstack_visual_indexes)
    assert list(visual.deepstack_visual_indexes) == list(config.vision.deepstack_visual_indexes)


def test_active_parameters_match_hf_experts(variant_and_model):
    config, model = variant_and_model
    t = config.text
    counts = config.parameter_counts()
    expert_numel = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    )
    assert counts.routed_experts == expert_numel
    if not t.is_moe:
        assert expert_numel == 0
        assert counts.active == counts.total
        return
    # Each token runs num_experts_per_tok of the num_experts equal-sized experts of every layer.
    inactive = expert_numel * (t.num_experts - t.num_experts_per_tok) // t.num_experts
    assert counts.active == counts.total - inactive
    assert expert_numel == t.num_hidden_layers * t.num_experts * 3 * t.hidden_size * (
        t.moe_intermediate_size
    )


def test_dense_layers_of_an_moe_model_match_hf():
    """decoder_sparse_step and mlp_only_layers put dense MLPs (intermediate_size) between the
    sparse layers; our per-layer rule and counts follow HF's."""
    base = get_variant("proxy-moe")
    text = dataclasses.replace(base.text, decoder_sparse_step=2, mlp_only_layers=(3,))
    config = dataclasses.replace(base, text=text)
    assert text.sparse_layers == (False, True, False, False, False, True)
    model = meta_hf_model(config)
    hf_sparse = tuple(
        isinstance(layer.mlp, Qwen3VLMoeTextSparseMoeBlock)
        for layer in model.model.language_model.layers
    )
    assert hf_sparse == text.sparse_layers
    counts = config.parameter_counts()
    assert counts.total == hf_numel(model)
    per_expert = 3 * text.hidden_size * text.moe_intermediate_size
    assert counts.routed_experts == 2 * text.num_experts * per_expert
    assert counts.active == counts.total - 2 * (text.num_experts - text.num_experts_per_tok) * (
        per_expert
    )


def test_attention_bias_counted_like_hf():
    base = get_variant("proxy")
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, attention_bias=True))
    assert config.parameter_counts().total == hf_numel(meta_hf_model(config))
    assert config.parameter_counts().total > base.parameter_counts().total


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [
        ("2b", 2.13e9, None),
        ("4b", 4.44e9, None),
        ("8b", 8.77e9, None),
        ("32b", 33.4e9, None),
        ("30b_a3b", 31.1e9, 3e9),
        ("235b_a22b", 236e9, 22e9),
    ],
)
def test_published_sizes(name, total, active):
    """Sizes listed on the Hub model pages (3 significant digits)."""
    counts = get_variant(name).parameter_counts()
    assert abs(counts.total - total) / total < 0.0025
    if active is None:
        assert counts.active == counts.total
    else:
        # The "A<n>B" names round the text model's active count down; the vision tower adds more.
        assert active <= counts.active < active * 1.35


def test_proxies_are_small():
    for name in ("proxy", "proxy-moe"):
        assert 100e6 <= get_variant(name).parameter_counts().total <= 150e6


# ---- Hugging Face round trips -------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_from_hf_config_round_trip(name):
    config = get_variant(name)
    back = from_hf_config(config.to_hf_config(), name="round-trip")
    assert back.name == "round-trip"
    assert dataclasses.replace(back, name=name, source=config.source) == config


@pytest.mark.parametrize("name", list(VARIANTS))
def test_from_hf_config_round_trip_of_dict(name):
    config = get_variant(name)
    back = from_hf_config(config.to_hf_config().to_dict(), name=name)
    assert dataclasses.replace(back, source=config.source) == config


def test_hf_config_carries_our_fields():
    config = get_variant("30b_a3b")
    hf = config.to_hf_config()
    assert type(hf).__name__ == "Qwen3VLMoeConfig"
    assert hf.tie_word_embeddings is False
    assert hf.text_config.num_experts == 128
    assert hf.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert hf.text_config.rope_parameters["rope_theta"] == 5_000_000.0
    assert hf.vision_config.deepstack_visual_indexes == [8, 16, 24]
    assert type(get_variant("8b").to_hf_config()).__name__ == "Qwen3VLConfig"


# The architecture fields of released config.json files, in their on-disk layout (rope settings in
# the legacy `rope_scaling` / `rope_theta` keys, vision model_type "qwen3_vl" / "qwen3_vl_moe").
RELEASED_CONFIG_JSON = {
    "4b": {
        "model_type": "qwen3_vl",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "attention_bias": False,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "max_position_embeddings": 262144,
            "num_attention_heads": 32,
            "num_hidden_layers": 36,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": [24, 20, 20],
                "rope_type": "default",
            },
            "rope_theta": 5000000,
            "tie_word_embeddings": True,
            "vocab_size": 151936,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "deepstack_visual_indexes": [5, 11, 17],
            "depth": 24,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1024,
            "in_channels": 3,
            "intermediate_size": 4096,
            "num_heads": 16,
            "num_position_embeddings": 2304,
            "out_hidden_size": 2560,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    },
    "30b_a3b": {
        "model_type": "qwen3_vl_moe",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_moe_text",
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "max_position_embeddings": 262144,
            "mlp_only_layers": [],
            "moe_intermediate_size": 768,
            "norm_topk_prob": True,
            "num_attention_heads": 32,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_hidden_layers": 48,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": [24, 20, 20],
                "rope_type": "default",
            },
            "rope_theta": 5000000,
            "vocab_size": 151936,
        },
        "vision_config": {
            "model_type": "qwen3_vl_moe",
            "deepstack_visual_indexes": [8, 16, 24],
            "depth": 27,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1152,
            "in_channels": 3,
            "intermediate_size": 4304,
            "num_heads": 16,
            "num_position_embeddings": 2304,
            "out_hidden_size": 2048,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    },
}


@pytest.mark.parametrize("name", list(RELEASED_CONFIG_JSON))
def test_released_config_json_layout_parses_to_variant(name):
    back = from_hf_config(RELEASED_CONFIG_JSON[name], name=name)
    config = get_variant(name)
    assert dataclasses.replace(back, source=config.source) == config


def test_hf_default_vision_config_is_the_large_tower():
    """HF's Qwen3VLConfig defaults are no released model (a 4096-wide, 32-layer text model with a
    3584 projection, inconsistent with each other), but its vision defaults are the 27-block
    tower of the 8B and larger models, our VisionConfig defaults."""
    hf = HFQwen3VLConfig()
    ours = VisionConfig()
    assert tuple(hf.vision_config.deepstack_visual_indexes) == ours.deepstack_visual_indexes
    assert hf.vision_config.rope_parameters["rope_theta"] == ours.rope_theta
    for field in dataclasses.fields(VisionConfig):
        if field.name not in ("out_hidden_size", "rope_theta", "deepstack_visual_indexes"):
            assert getattr(hf.vision_config, field.name) == getattr(ours, field.name), field.name
    with pytest.raises(ValueError, match="out_hidden_size 3584 must equal the text hidden_size"):
        from_hf_config(hf)


def test_from_hf_config_rejects_other_models():
    with pytest.raises(ValueError, match="got 'llama'"):
        from_hf_config(LlamaConfig())
    with pytest.raises(ValueError, match="qwen3_vl"):
        from_hf_config({"model_type": "llama"})


# ---- validation ---------------------------------------------------------------------------

DENSE = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=1024,
)
MOE = dict(DENSE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(DENSE, hidden_size=0), r"TextConfig.hidden_size must be positive, got 0 \(e.g. 4096"),
        (dict(DENSE, head_dim=-128), r"TextConfig.head_dim must be positive.*e.g. 128"),
        (dict(DENSE, rope_theta=0.0), r"TextConfig.rope_theta must be positive"),
        (dict(DENSE, num_key_value_heads=3), r"num_key_value_heads 3 must divide .*4 \(e.g. 2\)"),
        (dict(DENSE, head_dim=127), r"TextConfig.head_dim must be even"),
        (
            dict(DENSE, mrope_section=(24, 20, 21)),
            r"mrope_section \[24, 20, 21\] must be .*head_dim / 2 = 64 \(e.g. \[24, 20, 20\]\)",
        ),
        (dict(DENSE, mrope_section=(32, 32)), r"TextConfig.mrope_section \[32, 32\]"),
        (dict(DENSE, mrope_interleaved=False), r"TextConfig.mrope_interleaved must be True"),
        (dict(DENSE, hidden_act="gelu"), r"TextConfig.hidden_act must be 'silu'"),
        (dict(DENSE, num_experts=-1), r"TextConfig.num_experts must be >= 0"),
        (dict(DENSE, num_experts_per_tok=2), r"TextConfig.num_experts_per_tok is 2 .*dense"),
        (dict(DENSE, mlp_only_layers=(1,)), r"TextConfig.mlp_only_layers is \(1,\)"),
        (
            dict(MOE, num_experts_per_tok=9),
            r"num_experts_per_tok must be in \[1, num_experts = 8\], got 9 \(e.g. 8\)",
        ),
        (dict(MOE, moe_intermediate_size=0), r"TextConfig.moe_intermediate_size must be positive"),
        (dict(MOE, mlp_only_layers=(4,)), r"TextConfig.mlp_only_layers \[4\] .*\[0, 4\)"),
        (dict(MOE, mlp_only_layers=(1, 1)), r"mlp_only_layers \[1, 1\] must be distinct"),
        (dict(MOE, decoder_sparse_step=0), r"TextConfig.decoder_sparse_step must be positive"),
        (dict(MOE, norm_topk_prob=False), r"TextConfig.norm_topk_prob must be True"),
    ],
)
def test_bad_text_fields_raise_naming_the_field(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        TextConfig(**overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(depth=0), r"VisionConfig.depth must be positive, got 0 \(e.g. 27\)"),
        (dict(spatial_merge_size=0), r"VisionConfig.spatial_merge_size must be positive"),
        (dict(num_heads=5), r"VisionConfig.num_heads 5 must divide hidden_size 1152"),
        (dict(hidden_size=1120, num_heads=16), r"head_dim .* = 70 must be a multiple of 4"),
        (
            dict(num_position_embeddings=2300),
            r"num_position_embeddings 2300 must be a square .*e.g. 2209",
        ),
        (dict(deepstack_visual_indexes=(8, 27)), r"deepstack_visual_indexes \[8, 27\] .*= 27"),
        (dict(deepstack_visual_indexes=(16, 8)), r"deepstack_visual_indexes \[16, 8\] must be"),
        (dict(deepstack_visual_indexes=(-1,)), r"VisionConfig.deepstack_visual_indexes \[-1\]"),
    ],
)
def test_bad_vision_fields_raise_naming_the_field(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        VisionConfig(**overrides)


def test_bad_model_fields_raise_naming_the_field():
    proxy = get_variant("proxy")
    with pytest.raises(ValueError, match=r"out_hidden_size 256 must equal the text hidden_size"):
        dataclasses.replace(proxy, vision=dataclasses.replace(proxy.vision, out_hidden_size=256))
    short_text = dataclasses.replace(proxy.text, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"deepstack_visual_indexes has 3 entries .*at most 2"):
        dataclasses.replace(proxy, text=short_text)
    with pytest.raises(ValueError, match=r"image_token_id 151936 must be .*\[0, 151936\).*151655"):
        dataclasses.replace(proxy, image_token_id=151936)
    with pytest.raises(ValueError, match="special token ids must be distinct"):
        dataclasses.replace(proxy, video_token_id=proxy.image_token_id)


def test_configs_are_frozen_and_lists_become_tuples():
    text = TextConfig(**dict(MOE, mrope_section=[24, 20, 20], mlp_only_layers=[0]))
    assert text.mrope_section == (24, 20, 20)
    assert text.mlp_only_layers == (0,)
    assert VisionConfig(deepstack_visual_indexes=[1, 2]).deepstack_visual_indexes == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        text.hidden_size = 1024  # type: ignore[misc]
    hash(get_variant("235b_a22b"))


# ---- variant lookup -----------------------------------------------------------------------


def test_get_variant_aliases():
    assert get_variant("30b") is VARIANTS["30b_a3b"]
    assert get_variant("235b-a22b") is VARIANTS["235b_a22b"]
    assert get_variant("proxy_moe") is VARIANTS["proxy-moe"]
    assert all(target in VARIANTS for target in VARIANT_ALIASES.values())
    assert not set(VARIANT_ALIASES) & set(VARIANTS)


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="unknown Qwen3-VL variant '7b'") as error:
        get_variant("7b")
    for name in [*VARIANTS, *VARIANT_ALIASES]:
        assert name in str(error.value)

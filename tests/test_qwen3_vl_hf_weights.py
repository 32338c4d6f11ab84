"""Qwen3-VL HF <-> megatron weight rules: name coverage and megatron shapes on real proxy models
and released sizes (meta device), bit-exact round trips in every expert layout, the fused QKV row
order and tensor-parallel sharding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import pytest
import torch

from models.qwen3_vl.configuration import Qwen3VLConfig, get_variant
from models.qwen3_vl.hf_weights import (
    hf_model_class,
    hf_tensor_shapes,
    hf_to_megatron,
    megatron_tensor_shapes,
    megatron_to_hf,
    split_fused_experts,
    weight_rules,
)
from models.qwen35_vl.hf_weights import (
    COLUMN,
    REPLICATED,
    ROW,
    WeightRule,
    check_names,
    shard_for_tensor_parallel,
)

EMBED = "model.language_model.embed_tokens.weight"


def _variant(name: str, **text_changes) -> Qwen3VLConfig:
    config = get_variant(name)
    return dataclasses.replace(config, text=dataclasses.replace(config.text, **text_changes))


# The proxies are tied; the untied cases also cover attention biases and (MoE) a dense layer.
CASES = {
    "proxy": _variant("proxy"),
    "proxy-moe": _variant("proxy-moe"),
    "proxy-untied-bias": _variant("proxy", tie_word_embeddings=False, attention_bias=True),
    "proxy-moe-untied-dense0": _variant(
        "proxy-moe", tie_word_embeddings=False, mlp_only_layers=(0,)
    ),
}


@functools.cache
def built_case(name: str):
    """(config, HF model state dict) of a real float32 HF model with random weights."""
    config = CASES[name]
    torch.manual_seed(0)
    model = hf_model_class(config)(config.to_hf_config()).float()
    with torch.no_grad():
        # HF initialises norms to ones and biases to zeros; random values make every misplaced
        # row visible.
        for parameter in model.parameters():
            parameter.normal_()
    state = model.state_dict()
    same = state["lm_head.weight"].data_ptr() == state[EMBED].data_ptr()
    assert same == config.text.tie_word_embeddings
    return config, state


@pytest.fixture(params=list(CASES))
def case(request):
    return built_case(request.param)


@pytest.fixture(params=[name for name, config in CASES.items() if config.text.is_moe])
def moe_case(request):
    return built_case(request.param)


def expected_megatron_shapes(config: Qwen3VLConfig) -> dict[str, tuple[int, ...]]:
    """What megatron's layers hold (TP=1), written out independently of the rules."""
    t, v = config.text, config.vision
    h, d, vh = t.hidden_size, t.head_dim, v.hidden_size
    merged = vh * v.spatial_merge_size**2
    shapes: dict[str, tuple[int, ...]] = {
        "vision.patch_embed.weight": (vh, v.in_channels * v.temporal_patch_size * v.patch_size**2),
        "vision.patch_embed.bias": (vh,),
        "vision.pos_embed.weight": (v.num_position_embeddings, vh),
    }
    for i in range(v.depth):
        p = f"vision.blocks.layers.{i}."
        shapes |= {
            p + "self_attention.linear_qkv.layer_norm_weight": (vh,),
            p + "self_attention.linear_qkv.layer_norm_bias": (vh,),
            p + "self_attention.linear_qkv.weight": (3 * vh, vh),
            p + "self_attention.linear_qkv.bias": (3 * vh,),
            p + "self_attention.linear_proj.weight": (vh, vh),
            p + "self_attention.linear_proj.bias": (vh,),
            p + "mlp.linear_fc1.layer_norm_weight": (vh,),
            p + "mlp.linear_fc1.layer_norm_bias": (vh,),
            p + "mlp.linear_fc1.weight": (v.intermediate_size, vh),
            p + "mlp.linear_fc1.bias": (v.intermediate_size,),
            p + "mlp.linear_fc2.weight": (vh, v.intermediate_size),
            p + "mlp.linear_fc2.bias": (vh,),
        }
    mergers = {"vision.merger.": vh}
    mergers |= {f"vision.deepstack_mergers.{k}.": merged for k in range(3)}
    for p, norm in mergers.items():
        shapes |= {
            p + "norm.weight": (norm,),
            p + "norm.bias": (norm,),
            p + "mlp.linear_fc1.weight": (merged, merged),
            p + "mlp.linear_fc1.bias": (merged,),
            p + "mlp.linear_fc2.weight": (v.out_hidden_size, merged),
            p + "mlp.linear_fc2.bias": (v.out_hidden_size,),
        }
    shapes["language_model.embedding.word_embeddings.weight"] = (t.vocab_size, h)
    qkv_rows = (t.num_attention_heads + 2 * t.num_key_value_heads) * d
    for i, sparse in enumerate(t.sparse_layers):
        p, mlp = (
            f"language_model.decoder.layers.{2 * i}.",
            f"language_model.decoder.layers.{2 * i + 1}.",
        )
        shapes |= {
            p + "self_attention.linear_qkv.layer_norm_weight": (h,),
            p + "self_attention.linear_qkv.weight": (qkv_rows, h),
            p + "self_attention.q_layernorm.weight": (d,),
            p + "self_attention.k_layernorm.weight": (d,),
            p + "self_attention.linear_proj.weight": (h, t.num_attention_heads * d),
        }
        if t.attention_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv_rows,)
            shapes[p + "self_attention.linear_proj.bias"] = (h,)
        if sparse:
            i_moe = t.moe_intermediate_size
            shapes[mlp + "pre_mlp_layernorm.weight"] = (h,)
            shapes[mlp + "mlp.router.weight"] = (t.num_experts, h)
            for e in range(t.num_experts):
                shapes[f"{mlp}mlp.experts.linear_fc1.weight{e}"] = (2 * i_moe, h)
                shapes[f"{mlp}mlp.experts.linear_fc2.weight{e}"] = (h, i_moe)
        else:
            shapes[mlp + "mlp.linear_fc1.layer_norm_weight"] = (h,)
            shapes[mlp + "mlp.linear_fc1.weight"] = (2 * t.intermediate_size, h)
            shapes[mlp + "mlp.linear_fc2.weight"] = (h, t.intermediate_size)
    shapes["language_model.decoder.final_norm.weight"] = (h,)
    if not t.tie_word_embeddings:
        shapes["language_model.output_layer.weight"] = (t.vocab_size, h)
    return shapes


def checkpoint_state(state, config):
    """The model state without the tied lm_head alias, as a checkpoint stores it."""
    if config.text.tie_word_embeddings:
        return {k: v for k, v in state.items() if k != "lm_head.weight"}
    return dict(state)


# ---- real proxy models -----------------------------------------------------------------------


def test_rules_cover_the_real_hf_names_exactly_once(case):
    config, state = case
    rules = weight_rules(config)
    uses = Counter(name for rule in rules for name in rule.hf)
    assert max(uses.values()) == 1, [name for name, n in uses.items() if n > 1]
    present = set(split_fused_experts(checkpoint_state(state, config), config))
    check_names("rules vs real HF model", set(uses), present)
    assert len({rule.megatron for rule in rules}) == len(rules)


def test_megatron_shapes_are_megatron_layer_shapes(case):
    config, state = case
    megatron = hf_to_megatron(state, config)
    assert {k: tuple(v.shape) for k, v in megatron.items()} == expected_megatron_shapes(config)
    assert megatron_tensor_shapes(config) == expected_megatron_shapes(config)
    numel = sum(tensor.numel() for tensor in megatron.values())
    assert numel == config.parameter_counts().total


def test_hf_to_megatron_to_hf_is_bit_exact(case):
    config, state = case
    expected = checkpoint_state(state, config)
    back = megatron_to_hf(hf_to_megatron(state, config), config)
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert back[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(back[name], tensor), name


def test_every_expert_layout_gives_the_same_megatron_state(moe_case):
    config, state = moe_case
    reference = hf_to_megatron(state, config)
    for layout in ("checkpoint", "per_expert"):
        hf = megatron_to_hf(reference, config, expert_layout=layout)
        if layout == "checkpoint":
            fused = [k for k in hf if k.endswith("experts.gate_up_proj")]
            assert fused and all(hf[k].shape[1] == config.text.hidden_size for k in fused)
        else:
            assert not any(k.endswith("gate_up_proj") for k in hf)
        again = hf_to_megatron(hf, config, expert_layout=layout)
        assert all(torch.equal(again[k], reference[k]) for k in reference), layout


def test_fused_expert_gate_up_is_concatenated_not_interleaved(moe_case):
    config, state = moe_case
    layer = config.text.sparse_layers.index(True)
    p = f"model.language_model.layers.{layer}.mlp.experts."
    megatron = hf_to_megatron(state, config)
    fc1 = megatron[f"language_model.decoder.layers.{2 * layer + 1}.mlp.experts.linear_fc1.weight3"]
    assert torch.equal(fc1, state[p + "gate_up_proj"][3])
    fc2 = megatron[f"language_model.decoder.layers.{2 * layer + 1}.mlp.experts.linear_fc2.weight3"]
    assert torch.equal(fc2, state[p + "down_proj"][3])


def test_wrong_expert_layout_and_untied_lm_head_are_rejected(case):
    config, state = case
    if config.text.is_moe:
        with pytest.raises(ValueError, match=r"experts\.gate_up_proj.*'checkpoint'"):
            hf_to_megatron(state, config, expert_layout="checkpoint")
    if config.text.tie_word_embeddings:
        bad = dict(state)
        bad["lm_head.weight"] = state["lm_head.weight"] + 1
        with pytest.raises(ValueError, match=r"lm_head\.weight differs"):
            hf_to_megatron(bad, config)
    else:
        missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
        with pytest.raises(KeyError, match=r"1 missing.*lm_head\.weight"):
            hf_to_megatron(missing, config)


# ---- released sizes on the meta device --------------------------------------------------------


@pytest.mark.parametrize("name", ["2b", "8b", "30b_a3b", "235b_a22b"])
def test_released_sizes_rules_and_parameter_counts(name):
    config = get_variant(name)
    hf_shapes = hf_tensor_shapes(config)
    check_names(name, {n for rule in weight_rules(config) for n in rule.hf}, set(hf_shapes))
    shapes = megatron_tensor_shapes(config)
    assert shapes == expected_megatron_shapes(config)
    total = sum(torch.Size(shape).numel() for shape in shapes.values())
    assert total == config.parameter_counts().total


# ---- QKV layout ------------------------------------------------------------------------------


def test_qkv_regrouping_row_order():
    heads, groups, dim, hidden = 4, 2, 3, 5

    def labelled(base: int, n: int) -> torch.Tensor:
        # Row r of head j holds base + 10 * j + r in every column.
        rows = torch.tensor([base + 10 * j + r for j in range(n) for r in range(dim)])
        return rows[:, None].expand(-1, hidden).float()

    q, k, v = labelled(0, heads), labelled(1000, groups), labelled(2000, groups)
    rule = WeightRule("qkv", ("q", "k", "v"), "qkv", COLUMN, heads=(heads, groups, dim))
    fused = rule.to_megatron([q, k, v])[:, 0].tolist()
    # Group 0: q heads 0, 1, then k0, v0; group 1: q heads 2, 3, then k1, v1.
    expected = [0, 1, 2, 10, 11, 12, 1000, 1001, 1002, 2000, 2001, 2002]
    expected += [20, 21, 22, 30, 31, 32, 1010, 1011, 1012, 2010, 2011, 2012]
    assert fused == expected
    back = rule.to_hf(rule.to_megatron([q, k, v]), [q.shape, k.shape, v.shape])
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))
    bias = rule.to_megatron([q[:, 0], k[:, 0], v[:, 0]])
    assert bias.tolist() == expected


def test_vision_qkv_is_per_head_q_k_v():
    heads, dim = 2, 2
    qkv = torch.arange(3 * heads * dim, dtype=torch.float32)  # HF rows: [q h0 h1; k ...; v ...]
    rule = WeightRule("v", ("qkv",), "vision_qkv", COLUMN, heads=(heads, heads, dim))
    assert rule.to_megatron([qkv]).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    assert torch.equal(rule.to_hf(rule.to_megatron([qkv]), [qkv.shape])[0], qkv)


# ---- tensor parallelism ----------------------------------------------------------------------


def test_tp2_shards_concatenate_to_the_full_tensor(case):
    config, state = case
    megatron = hf_to_megatron(state, config)
    kinds = Counter()
    for rule in weight_rules(config):
        full = megatron[rule.megatron]
        shards = [shard_for_tensor_parallel(rule, full, rank, 2) for rank in range(2)]
        if rule.tp == REPLICATED or rule.expert:
            assert all(shard is full for shard in shards), rule.megatron
            continue
        kinds[rule.tp] += 1
        dim = 0 if rule.tp == COLUMN else 1
        assert all(s.shape[dim] * 2 == full.shape[dim] for s in shards), rule.megatron
        if rule.sections:
            # Each rank holds its half of every section (gate half, then up half).
            halves = [s.split([n // 2 for n in rule.sections], dim=dim) for s in shards]
            rebuilt = torch.cat(
                [torch.cat(pair, dim=dim) for pair in zip(*halves, strict=True)], dim=dim
            )
        else:
            rebuilt = torch.cat(shards, dim=dim)
        assert torch.equal(rebuilt, full), rule.megatron
    assert kinds[COLUMN] and kinds[ROW]


def test_tp2_qkv_shard_is_one_query_group_and_fc1_shard_is_gate_and_up_halves(case):
    config, state = case
    t = config.text
    megatron = hf_to_megatron(state, config)
    rules = {rule.megatron: rule for rule in weight_rules(config)}
    p, hf = "language_model.decoder.layers.0.", "model.language_model.layers.0."
    qkv = shard_for_tensor_parallel(
        rules[p + "self_attention.linear_qkv.weight"],
        megatron[p + "self_attention.linear_qkv.weight"],
        1,
        2,
    )
    per_group = t.num_attention_heads // t.num_key_value_heads * t.head_dim
    q_rows = state[hf + "self_attn.q_proj.weight"].chunk(2)[1]
    k_rows = state[hf + "self_attn.k_proj.weight"].chunk(2)[1]
    assert torch.equal(qkv[:per_group], q_rows[:per_group])
    assert torch.equal(qkv[per_group : per_group + t.head_dim], k_rows[: t.head_dim])
    assert qkv.shape[0] * 2 == megatron[p + "self_attention.linear_qkv.weight"].shape[0]
    if t.sparse_layers[0]:
        return  # layer 0 has routed experts, never TP-split
    mlp = "language_model.decoder.layers.1."
    fc1 = shard_for_tensor_parallel(
        rules[mlp + "mlp.linear_fc1.weight"], megatron[mlp + "mlp.linear_fc1.weight"], 1, 2
    )
    gate = state[hf + "mlp.gate_proj.weight"].chunk(2)[1]
    up = state[hf + "mlp.up_proj.weight"].chunk(2)[1]
    assert torch.equal(fc1, torch.cat([gate, up]))


def test_non_dividing_tp_raises_naming_the_tensor():
    config = CASES["proxy"]
    rules = {rule.megatron: rule for rule in weight_rules(config)}
    shapes = megatron_tensor_shapes(config)

    def shard(name: str, size: int) -> None:
        shard_for_tensor_parallel(rules[name], torch.empty(shapes[name], device="meta"), 0, size)

    qkv = "language_model.decoder.layers.0.self_attention.linear_qkv.weight"
    with pytest.raises(ValueError, match=f"{qkv}: 2 query groups"):
        shard(qkv, 4)  # 2 groups: rows would divide, groups do not
    fc1 = "language_model.decoder.layers.7.mlp.linear_fc1.weight"
    with pytest.raises(ValueError, match=f"{fc1}: dimension 1536"):
        shard(fc1, 5)
    embed = "language_model.embedding.word_embeddings.weight"
    with pytest.raises(ValueError, match=f"{embed}: dimension 151936"):
        shard(embed, 3)
    proj = "vision.blocks.layers.1.self_attention.linear_proj.weight"
    with pytest.raises(ValueError, match=proj):
        shard(proj, 3)
    shard(qkv, 2)  # dividing sizes pass

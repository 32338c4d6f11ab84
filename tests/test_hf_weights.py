"""HF <-> megatron weight mapping: bit-exact round trips (dense and MoE, with and without MTP),
fused-expert splitting, name checking, tensor/expert-parallel sharding and the gated-attention
qkv row layout.
"""

from __future__ import annotations

import functools

import pytest
import torch

from models.qwen35_vl import hf_weights
from models.qwen35_vl.configuration import get_variant
from models.qwen35_vl.hf_weights import (
    hf_tensor_shapes,
    hf_to_megatron,
    megatron_to_hf,
    shard_for_tensor_parallel,
    split_fused_experts,
    weight_rules,
)

CASES = [(name, mtp) for name in ("proxy", "proxy-moe") for mtp in (0, 1)]


def case_id(case):
    return f"{case[0]}-mtp{case[1]}"


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    shapes = hf_tensor_shapes(config)
    if config.text.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # tied checkpoints do not store it
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


@functools.cache
def _state_with_mtp(name: str) -> dict[str, torch.Tensor]:
    """Random HF checkpoint of a variant with its MTP layer (built once per session)."""
    return random_state(checkpoint_shapes(get_variant(name).with_mtp_layers(1)))


def hf_state_for(name: str, mtp: int) -> dict[str, torch.Tensor]:
    """A fresh dict (shared tensors) of the variant's checkpoint, without `mtp.*` for mtp=0."""
    state = _state_with_mtp(name)
    return {k: v for k, v in state.items() if mtp or not k.startswith("mtp.")}


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def config_and_state(request):
    name, mtp = request.param
    config = get_variant(name).with_mtp_layers(mtp)
    state = hf_state_for(name, mtp)
    assert {k: tuple(v.shape) for k, v in state.items()} == checkpoint_shapes(config)
    return config, state


def test_hf_to_megatron_to_hf_is_bit_exact(config_and_state):
    config, hf_state = config_and_state
    megatron = hf_to_megatron(hf_state, config)
    assert set(megatron) == {rule.megatron for rule in weight_rules(config)}
    back = megatron_to_hf(megatron, config)
    assert set(back) == set(hf_state)
    for name, tensor in hf_state.items():
        assert back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name


def test_megatron_numel_equals_hf_numel(config_and_state):
    config, hf_state = config_and_state
    megatron = hf_to_megatron(hf_state, config)
    hf_numel = sum(t.numel() for t in hf_state.values())
    assert sum(t.numel() for t in megatron.values()) == hf_numel
    counts = config.parameter_counts()
    assert hf_numel == counts.total + counts.mtp


def test_mtp_tensors_present_only_with_mtp(config_and_state):
    config, hf_state = config_and_state
    mtp_names = [name for name in hf_state if name.startswith("mtp.")]
    if config.text.mtp_num_hidden_layers:
        assert "mtp.fc.weight" in mtp_names
        assert "mtp.layers.0.self_attn.q_proj.weight" in mtp_names
    else:
        assert mtp_names == []


def test_megatron_to_hf_ignores_extra_state(config_and_state):
    config, hf_state = config_and_state
    megatron = hf_to_megatron(hf_state, config)
    megatron["language_model.decoder.layers.0.self_attention.in_proj._extra_state"] = None
    assert set(megatron_to_hf(megatron, config)) == set(hf_state)


def test_split_fused_experts_against_hand_split_tensors():
    config = get_variant("proxy-moe")
    prefix = "model.language_model.layers.0.mlp.experts."
    other = torch.ones(2, 2)
    # transformers' layout: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I];
    # here E=2, I=1, H=2.
    fused = {
        prefix + "gate_up_proj": torch.arange(8.0).reshape(2, 2, 2),
        prefix + "down_proj": torch.arange(4.0).reshape(2, 2, 1),
        "model.language_model.norm.weight": other,
    }
    expected = {
        prefix + "0.gate_proj.weight": torch.tensor([[0.0, 1.0]]),
        prefix + "0.up_proj.weight": torch.tensor([[2.0, 3.0]]),
        prefix + "1.gate_proj.weight": torch.tensor([[4.0, 5.0]]),
        prefix + "1.up_proj.weight": torch.tensor([[6.0, 7.0]]),
        prefix + "0.down_proj.weight": torch.tensor([[0.0], [1.0]]),
        prefix + "1.down_proj.weight": torch.tensor([[2.0], [3.0]]),
        "model.language_model.norm.weight": other,
    }
    split = split_fused_experts(fused, config)
    assert set(split) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(split[name], tensor), name
    assert split["model.language_model.norm.weight"] is other


def test_missing_and_unexpected_hf_tensors_are_named():
    config = get_variant("proxy").with_mtp_layers(0)
    hf_state = hf_state_for("proxy", 0)
    missing = "model.language_model.layers.3.self_attn.k_proj.weight"
    del hf_state[missing]
    hf_state["model.language_model.layers.3.self_attn.bogus.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as error:
        hf_to_megatron(hf_state, config)
    message = str(error.value)
    assert "1 missing" in message and missing in message
    assert "1 unexpected" in message and "self_attn.bogus.weight" in message


def test_mtp_checkpoint_loaded_without_mtp_config_names_mtp_tensors():
    config = get_variant("proxy").with_mtp_layers(1)
    hf_state = hf_state_for("proxy", 1)
    with pytest.raises(KeyError, match=r"unexpected \['mtp\."):
        hf_to_megatron(hf_state, config.with_mtp_layers(0))


def test_missing_megatron_tensor_is_named():
    config = get_variant("proxy").with_mtp_layers(0)
    megatron = hf_to_megatron(hf_state_for("proxy", 0), config)
    del megatron["vision.merger.norm.bias"]
    with pytest.raises(KeyError, match=r"vision\.merger\.norm\.bias"):
        megatron_to_hf(megatron, config)


def test_more_than_one_mtp_layer_is_refused():
    with pytest.raises(ValueError, match="one MTP layer"):
        weight_rules(get_variant("proxy").with_mtp_layers(2))


@pytest.mark.parametrize("name", ["proxy", "proxy-moe"])
def test_tensor_parallel_shards_split_the_tensor(name):
    config = get_variant(name).with_mtp_layers(1)
    megatron = hf_to_megatron(hf_state_for(name, 1), config)
    split_rules = 0
    for rule in weight_rules(config):
        tensor = megatron[rule.megatron]
        shards = [shard_for_tensor_parallel(rule, tensor, rank, 2) for rank in range(2)]
        if rule.tp != hf_weights.REPLICATED and not rule.expert:
            split_rules += 1
            dim = 0 if rule.tp == hf_weights.COLUMN else 1
            assert shards[0].shape[dim] * 2 == tensor.shape[dim], rule.megatron
            assert not torch.equal(shards[0], shards[1]), rule.megatron
            if not rule.sections:  # sectioned splits: test_sectioned_column_shard_...
                assert torch.equal(torch.cat(shards, dim=dim), tensor), rule.megatron
        else:
            assert shards[0] is tensor and shards[1] is tensor
    assert split_rules > 20


def test_sectioned_column_shard_takes_each_section_slice():
    config = get_variant("proxy").with_mtp_layers(0)
    rule = next(r for r in weight_rules(config) if r.megatron.endswith("in_proj.weight"))
    tensor = torch.arange(sum(rule.sections), dtype=torch.float).unsqueeze(1)
    shard = shard_for_tensor_parallel(rule, tensor, 1, 2)
    expected, offset = [], 0
    for section in rule.sections:
        expected.append(tensor[offset + section // 2 : offset + section])
        offset += section
    assert torch.equal(shard, torch.cat(expected))


def test_attention_qkv_tp_larger_than_groups_raises():
    config = get_variant("proxy")
    assert config.text.num_key_value_heads == 2
    rule = next(r for r in weight_rules(config) if r.kind == "attention_qkv")
    t = config.text
    rows = (2 * t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    tensor = torch.zeros(rows, t.hidden_size)
    assert shard_for_tensor_parallel(rule, tensor, 0, 2).shape[0] == rows // 2
    with pytest.raises(ValueError, match="2 query groups do not split over TP size 4"):
        shard_for_tensor_parallel(rule, tensor, 0, 4)


def test_attention_qkv_layout_is_grouped_q_gate_k_v():
    """Rows of HF q_proj are per head [query dims, gate dims]; megatron's linear_qkv must hold,
    for each query group, [its query heads, their gate heads, the group's k, the group's v]."""
    config = get_variant("proxy-moe")
    t = config.text
    heads, groups, dim = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    per_group = heads // groups
    hidden = 3
    # Each row's value encodes (kind, head, dim): kind 0 = q, 1 = gate, 2 = k, 3 = v.
    q_rows = [(is_gate, head, d) for head in range(heads) for is_gate in (0, 1) for d in range(dim)]
    q_proj = torch.tensor([[1000 * 1000 * g + 1000 * h + d] * hidden for g, h, d in q_rows])
    k_proj = torch.tensor(
        [[2_000_000 + 1000 * h + d] * hidden for h in range(groups) for d in range(dim)]
    )
    v_proj = torch.tensor(
        [[3_000_000 + 1000 * h + d] * hidden for h in range(groups) for d in range(dim)]
    )
    rule = next(r for r in weight_rules(config) if r.kind == "attention_qkv")
    qkv = rule.to_megatron([q_proj, k_proj, v_proj])
    expected = []
    for group in range(groups):
        group_heads = range(group * per_group, (group + 1) * per_group)
        expected += [1000 * h + d for h in group_heads for d in range(dim)]
        expected += [1_000_000 + 1000 * h + d for h in group_heads for d in range(dim)]
        expected += [2_000_000 + 1000 * group + d for d in range(dim)]
        expected += [3_000_000 + 1000 * group + d for d in range(dim)]
    assert qkv[:, 0].tolist() == expected
    assert torch.equal(qkv[:, 0], qkv[:, 2])
    shapes = [tuple(q_proj.shape), tuple(k_proj.shape), tuple(v_proj.shape)]
    back = rule.to_hf(qkv, shapes)
    assert all(torch.equal(a, b) for a, b in zip(back, (q_proj, k_proj, v_proj), strict=True))


def test_vision_qkv_layout_is_per_head_q_k_v():
    config = get_variant("proxy")
    v = config.vision
    rule = next(r for r in weight_rules(config) if r.kind == "vision_qkv")
    # HF fused qkv rows: [q (all heads), k (all heads), v (all heads)].
    rows = [
        (kind, head, d)
        for kind in range(3)
        for head in range(v.num_heads)
        for d in range(v.head_dim)
    ]
    hf = torch.tensor([1_000_000 * k + 1000 * h + d for k, h, d in rows])
    megatron = rule.to_megatron([hf])
    expected = [
        1_000_000 * k + 1000 * h + d
        for h in range(v.num_heads)
        for k in range(3)
        for d in range(v.head_dim)
    ]
    assert megatron.tolist() == expected
    assert torch.equal(rule.to_hf(megatron, [tuple(hf.shape)])[0], hf)


def test_patch_embed_is_flattened_conv_kernel():
    config = get_variant("proxy")
    shape = hf_tensor_shapes(config)["model.visual.patch_embed.proj.weight"]
    v = config.vision
    assert shape == (
        v.hidden_size,
        v.in_channels,
        v.temporal_patch_size,
        v.patch_size,
        v.patch_size,
    )
    rule = next(r for r in weight_rules(config) if r.kind == "patch_embed")
    kernel = torch.randn(shape)
    flat = rule.to_megatron([kernel])
    assert flat.shape == (v.hidden_size, v.in_channels * v.temporal_patch_size * v.patch_size**2)
    assert torch.equal(flat[7], kernel[7].flatten())

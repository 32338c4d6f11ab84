"""scripts/convert_hf_checkpoint.py --model qwen3_vl on CPU: tiny random Qwen3-VL models (dense and
MoE) saved by transformers go through import (torch_dist and fsdp_dtensor) and export and come
back bit-identical; the torch_dist checkpoint holds the keys, global shapes and `_extra_state`
objects megatron asks for (derived here by hand from megatron-core 0.19's HybridStack and
TEGroupedMLP), the fsdp_dtensor one the names Megatron-FSDP loads; fused experts are read in both
HF layouts and written in the released one.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from models import get_model_spec
from models.qwen3_vl.checkpoint_layout import WEIGHTS
from models.qwen3_vl.configuration import Qwen3VLConfig, get_variant
from models.qwen3_vl.hf_weights import hf_model_class, megatron_tensor_shapes
from scripts.convert_hf_checkpoint import INDEX_FILE, export_checkpoint, import_checkpoint
from scripts.hf_checkpoint import read_hf_checkpoint

MODEL = "qwen3_vl"


def tiny_config(moe: bool) -> Qwen3VLConfig:
    """The proxy (dense: untied output layer, to cover it) at test size: 2 decoder layers, 2 vision
    blocks both feeding DeepStack, hidden 64, vocabulary 512, 4 experts of width 48 (so neither
    fused expert layout is square); two key/value groups, so it splits over TP=2."""
    base = get_variant("proxy-moe" if moe else "proxy")
    text = dataclasses.replace(
        base.text,
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, mrope_section=(6, 5, 5), intermediate_size=96, vocab_size=512,
        max_position_embeddings=1024, tie_word_embeddings=moe,
        **(dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48) if moe else {}),
    )  # fmt: skip
    vision = dataclasses.replace(
        base.vision, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        deepstack_visual_indexes=(0, 1), num_position_embeddings=16,
    )  # fmt: skip
    return dataclasses.replace(
        base, name="tiny", text=text, vision=vision, image_token_id=500, video_token_id=501,
        vision_start_token_id=502, vision_end_token_id=503,
    )  # fmt: skip


def save_tiny(directory: str, moe: bool, released_layout: bool = True) -> dict[str, torch.Tensor]:
    """A random tiny model by save_pretrained in several shards, its fused experts optionally
    rewritten in the released checkpoints' layout ([E, in, out]; transformers writes its own
    [E, out, in]); returns every stored tensor."""
    torch.manual_seed(0)
    config = tiny_config(moe)
    hf_model_class(config)(config.to_hf_config()).save_pretrained(directory, max_shard_size="200KB")
    if moe and released_layout:
        with open(os.path.join(directory, INDEX_FILE)) as f:
            weight_map = json.load(f)["weight_map"]
        tensors = read_hf_checkpoint(directory)
        for file in set(weight_map.values()):
            shard = {
                name: t.transpose(1, 2).contiguous() if ".mlp.experts." in name else t
                for name, t in tensors.items()
                if weight_map[name] == file
            }
            save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
    return read_hf_checkpoint(directory)


def test_registry_converts_with_this_weight_conversion():
    assert get_model_spec(MODEL).weights is WEIGHTS


@pytest.mark.parametrize(
    ("moe", "megatron_format"),
    [(False, "torch_dist"), (True, "torch_dist"), (False, "fsdp_dtensor"), (True, "fsdp_dtensor")],
)
def test_import_export_is_bit_exact(tmp_path, moe, megatron_format):
    hf, megatron, back = (str(tmp_path / name) for name in ("hf", "megatron", "back"))
    original = save_tiny(hf, moe)
    result = import_checkpoint(
        hf, megatron, ep=2 if moe else 1, max_bytes=256 * 1024,
        megatron_format=megatron_format, model=MODEL,
    )  # fmt: skip
    assert result["parts"] > 2  # several DCP parts, merged into one checkpoint
    export_checkpoint(megatron, back, max_bytes=256 * 1024, model=MODEL)
    exported = read_hf_checkpoint(back)
    assert set(exported) == set(original)
    assert all(torch.equal(exported[name], original[name]) for name in original)


def test_save_pretrained_experts_export_in_the_released_layout(tmp_path):
    """transformers' own [E, out, in] experts import too; the export, in the released layout,
    loads in transformers to the very same model."""
    hf, megatron, back = (str(tmp_path / name) for name in ("hf", "megatron", "back"))
    original = save_tiny(hf, moe=True, released_layout=False)
    import_checkpoint(hf, megatron, tp=2, ep=2, model=MODEL)
    export_checkpoint(megatron, back, model=MODEL)
    exported = read_hf_checkpoint(back)
    gate_up = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    assert tuple(original[gate_up].shape) == (4, 96, 64)
    assert torch.equal(exported[gate_up], original[gate_up].transpose(1, 2))
    model_class = hf_model_class(tiny_config(moe=True))
    reference = model_class.from_pretrained(hf).state_dict()
    loaded = model_class.from_pretrained(back).state_dict()
    assert set(loaded) == set(reference)
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def expected_torch_dist_shapes(config: Qwen3VLConfig) -> dict[str, tuple[int, ...]]:
    """megatron's keys and global shapes, by hand: the vision TransformerBlock stacks its blocks
    (leading axis `depth`); HybridStack keeps one key per layer (HF layer i = attention layer 2i +
    MLP layer 2i + 1); TEGroupedMLP stacks a layer's experts under `experts.experts.`."""
    t, v = config.text, config.vision
    h, vh, depth = t.hidden_size, v.hidden_size, v.depth
    merged = vh * v.spatial_merge_size**2
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
    shapes = {
        "vision.patch_embed.weight": (vh, patch),
        "vision.patch_embed.bias": (vh,),
        "vision.pos_embed.weight": (v.num_position_embeddings, vh),
    }
    blocks = "vision.blocks.layers."
    for name, shape in {
        "self_attention.linear_qkv.layer_norm_weight": (vh,),
        "self_attention.linear_qkv.layer_norm_bias": (vh,),
        "self_attention.linear_qkv.weight": (3 * vh, vh),
        "self_attention.linear_qkv.bias": (3 * vh,),
        "self_attention.linear_proj.weight": (vh, vh),
        "self_attention.linear_proj.bias": (vh,),
        "mlp.linear_fc1.layer_norm_weight": (vh,),
        "mlp.linear_fc1.layer_norm_bias": (vh,),
        "mlp.linear_fc1.weight": (v.intermediate_size, vh),
        "mlp.linear_fc1.bias": (v.intermediate_size,),
        "mlp.linear_fc2.weight": (vh, v.intermediate_size),
        "mlp.linear_fc2.bias": (vh,),
    }.items():
        shapes[blocks + name] = (depth, *shape)
    mergers = ["vision.merger."] + [
        f"vision.deepstack_mergers.{k}." for k in range(len(v.deepstack_visual_indexes))
    ]
    for merger in mergers:
        norm = vh if merger == "vision.merger." else merged  # DeepStack: norm after the merge
        shapes |= {
            merger + "norm.weight": (norm,),
            merger + "norm.bias": (norm,),
            merger + "mlp.linear_fc1.weight": (merged, merged),
            merger + "mlp.linear_fc1.bias": (merged,),
            merger + "mlp.linear_fc2.weight": (h, merged),
            merger + "mlp.linear_fc2.bias": (h,),
        }
    text = "language_model."
    shapes[text + "embedding.word_embeddings.weight"] = (t.vocab_size, h)
    q_width, kv_width = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    for i, sparse in enumerate(t.sparse_layers):
        attention, mlp = f"{text}decoder.layers.{2 * i}.", f"{text}decoder.layers.{2 * i + 1}."
        shapes |= {
            attention + "self_attention.linear_qkv.layer_norm_weight": (h,),
            attention + "self_attention.linear_qkv.weight": (q_width + 2 * kv_width, h),
            attention + "self_attention.q_layernorm.weight": (t.head_dim,),
            attention + "self_attention.k_layernorm.weight": (t.head_dim,),
            attention + "self_attention.linear_proj.weight": (h, q_width),
        }
        if sparse:
            e, width = t.num_experts, t.moe_intermediate_size
            shapes |= {
                mlp + "pre_mlp_layernorm.weight": (h,),
                mlp + "mlp.router.weight": (e, h),
                mlp + "mlp.experts.experts.linear_fc1.weight": (e, 2 * width, h),
                mlp + "mlp.experts.experts.linear_fc2.weight": (e, h, width),
            }
        else:
            shapes |= {
                mlp + "mlp.linear_fc1.layer_norm_weight": (h,),
                mlp + "mlp.linear_fc1.weight": (2 * t.intermediate_size, h),
                mlp + "mlp.linear_fc2.weight": (h, t.intermediate_size),
            }
    shapes[text + "decoder.final_norm.weight"] = (h,)
    if not t.tie_word_embeddings:
        shapes[text + "output_layer.weight"] = (t.vocab_size, h)
    return shapes


def expected_extra_state(config: Qwen3VLConfig) -> set[str]:
    """The ShardedObjects (unique keys) the model asks for: every TE module's `_extra_state`
    (stacked like its block's tensors; one per expert), the output layer's, the common state."""
    t, v = config.text, config.vision
    blocks = ["self_attention.linear_qkv", "self_attention.core_attention"]
    blocks += ["self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
    keys = {
        f"vision.blocks.layers.{module}._extra_state/shard_{i}_{v.depth}"
        for module in blocks
        for i in range(v.depth)
    }
    levels = range(len(v.deepstack_visual_indexes))
    for merger in ["merger", *(f"deepstack_mergers.{k}" for k in levels)]:
        for module in ("norm", "mlp.linear_fc1", "mlp.linear_fc2"):
            keys.add(f"vision.{merger}.{module}._extra_state/shard_0_1")
    attention = ["linear_qkv", "core_attention", "q_layernorm", "k_layernorm", "linear_proj"]
    for i, sparse in enumerate(t.sparse_layers):
        layer = f"language_model.decoder.layers.{2 * i}.self_attention."
        keys |= {f"{layer}{module}._extra_state/shard_0_1" for module in attention}
        mlp = f"language_model.decoder.layers.{2 * i + 1}."
        if sparse:
            keys.add(f"{mlp}pre_mlp_layernorm._extra_state/shard_0_1")
            keys |= {
                f"{mlp}mlp.experts.experts.linear_fc{n}._extra_state/shard_{e}_{t.num_experts}"
                for n in (1, 2)
                for e in range(t.num_experts)
            }
        else:
            keys |= {f"{mlp}mlp.linear_fc{n}._extra_state/shard_0_1" for n in (1, 2)}
    keys.add("language_model.decoder.final_norm._extra_state/shard_0_1")
    # HybridModel keeps its output layer's (None) extra state, tied or not.
    keys.add("language_model.output_layer._extra_state/shard_0_1")
    keys.add("common_state/shard_0_1")
    return keys


def read_dcp(directory: str, key: str) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(directory)
    entry = reader.read_metadata().state_dict_metadata[key]
    target = {key: torch.empty(entry.size, dtype=entry.properties.dtype)}
    dcp.load(target, storage_reader=reader, no_dist=True)
    return target[key]


@pytest.mark.parametrize("moe", [False, True])
def test_torch_dist_checkpoint_has_megatron_keys_shapes_and_objects(tmp_path, moe):
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    hf, megatron = str(tmp_path / "hf"), str(tmp_path / "megatron")
    original = save_tiny(hf, moe)
    import_checkpoint(hf, megatron, model=MODEL)
    release = os.path.join(megatron, "release")
    tensors = load_tensors_metadata(release)
    config = tiny_config(moe)
    shapes = {key: tuple(tensor.global_shape) for key, tensor in tensors.items()}
    assert shapes == expected_torch_dist_shapes(config)
    assert set(load_sharded_metadata(release)) - set(tensors) == expected_extra_state(config)
    fc2 = read_dcp(release, "vision.blocks.layers.mlp.linear_fc2.weight")
    assert torch.equal(fc2[1], original["model.visual.blocks.1.mlp.linear_fc2.weight"])
    if moe:  # expert 3 of HF layer 1: rows [gate; up] of the released [E, H, 2I] tensor
        experts = "language_model.decoder.layers.3.mlp.experts.experts."
        gate_up = original["model.language_model.layers.1.mlp.experts.gate_up_proj"]
        assert torch.equal(read_dcp(release, experts + "linear_fc1.weight")[3], gate_up[3].T)


def test_fsdp_dtensor_checkpoint_loads_like_megatron_fsdp(tmp_path):
    """megatron's fsdp_dtensor loader, strict: {'model': {'module.<state-dict name>': ...}} with
    the model's own (per-expert) names, SwiGLU fc1 halves `_w` / `_v` except in the GELU vision
    blocks (the mergers are split too), no extra state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    hf, megatron = str(tmp_path / "hf"), str(tmp_path / "megatron")
    original = save_tiny(hf, moe=True)
    import_checkpoint(hf, megatron, megatron_format="fsdp_dtensor", model=MODEL)
    model: dict[str, torch.Tensor] = {}
    for name, shape in megatron_tensor_shapes(tiny_config(moe=True)).items():
        split = ".linear_fc1.weight" in name or ".linear_fc1.bias" in name
        split = split and not name.startswith("vision.blocks.")
        for suffix in ("_w", "_v") if split else ("",):
            rows = shape[0] // 2 if split else shape[0]
            model[f"module.{name}{suffix}"] = torch.empty((rows, *shape[1:]))  # fp32 model
    state = {"model": model, "args": None, "iteration": None, "checkpoint_version": None}
    reader = dcp.FileSystemReader(os.path.join(megatron, "release"))
    dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
    stored = {key for key in reader.read_metadata().state_dict_metadata if key.startswith("model.")}
    assert stored == {"model." + name for name in model}
    fc1 = "module.language_model.decoder.layers.3.mlp.experts.linear_fc1.weight2"
    gate, up = original["model.language_model.layers.1.mlp.experts.gate_up_proj"][2].T.chunk(2)
    assert torch.equal(model[fc1 + "_w"], gate) and torch.equal(model[fc1 + "_v"], up)
    assert "module.vision.deepstack_mergers.1.mlp.linear_fc1.bias_v" in model


def test_fsdp_dtensor_needs_tensor_parallel_one(tmp_path):
    hf = str(tmp_path / "hf")
    save_tiny(hf, moe=False)
    with pytest.raises(ValueError, match=r"fsdp_dtensor with --tp 2: .* vision mergers"):
        import_checkpoint(
            hf, str(tmp_path / "out"), tp=2, megatron_format="fsdp_dtensor", model=MODEL
        )

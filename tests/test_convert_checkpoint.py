"""scripts/convert_hf_checkpoint.py on CPU: a tiny random model saved by transformers'
save_pretrained (dense and MoE, several shards, with and without MTP tensors) goes through import
(a megatron torch_dist checkpoint, read back with megatron's own metadata readers) and export, and
every tensor comes back bit-identical; bad inputs are refused with the problem named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from scripts.convert_hf_checkpoint import (
    INDEX_FILE,
    TRACKER_FILE,
    export_checkpoint,
    import_checkpoint,
)
from scripts.hf_checkpoint import read_hf_checkpoint, save_hf_checkpoint
from tests.gpu_harness import tiny_config


def converter_config(moe: bool):
    """The tiny test model with two key/value groups, so it splits over TP=2."""
    config = tiny_config(moe=moe)
    return dataclasses.replace(config, text=dataclasses.replace(config.text, num_key_value_heads=2))


def save_tiny(directory: str, moe: bool, with_mtp: bool) -> dict[str, torch.Tensor]:
    """A random tiny model saved in 1 MB shards (optionally with `mtp.*` tensors)."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    config = converter_config(moe)
    model_class = Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration
    return save_hf_checkpoint(model_class(config.to_hf_config()), config, directory, with_mtp)


@pytest.mark.parametrize(("moe", "with_mtp"), [(False, False), (False, True), (True, True)])
def test_import_export_is_bit_exact(tmp_path, moe, with_mtp):
    hf, megatron, back = (str(tmp_path / name) for name in ("hf", "megatron", "back"))
    original = save_tiny(hf, moe, with_mtp)
    assert len([f for f in os.listdir(hf) if f.endswith(".safetensors")]) > 2
    result = import_checkpoint(hf, megatron, max_bytes=512 * 1024)
    assert result["parts"] > 2  # several DCP parts, merged into one checkpoint
    assert result["peak_memory_mib"] > 0
    export_checkpoint(megatron, back, max_bytes=1024 * 1024)
    exported = read_hf_checkpoint(back)
    assert set(exported) == set(original)
    assert all(torch.equal(exported[name], original[name]) for name in original)


def test_exported_checkpoint_loads_in_transformers(tmp_path):
    from transformers import Qwen3_5MoeForConditionalGeneration

    hf, megatron, back = (str(tmp_path / name) for name in ("hf", "megatron", "back"))
    save_tiny(hf, moe=True, with_mtp=False)
    import_checkpoint(hf, megatron, tp=2, ep=2)
    export_checkpoint(megatron, back)
    reference = Qwen3_5MoeForConditionalGeneration.from_pretrained(hf).state_dict()
    loaded = Qwen3_5MoeForConditionalGeneration.from_pretrained(back).state_dict()
    assert set(loaded) == set(reference)
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def read_dcp(directory: str, key: str) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(directory)
    entry = reader.read_metadata().state_dict_metadata[key]
    target = {key: torch.empty(entry.size, dtype=entry.properties.dtype)}
    dcp.load(target, storage_reader=reader, no_dist=True)
    return target[key]


def test_checkpoint_has_megatron_keys_objects_and_common_state(tmp_path):
    """What megatron's loader reads: the tracker, common state, tensor keys with global shapes
    (layer / expert axes, Gated DeltaNet sections) and the TE `_extra_state` objects."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.serialization import (
        load_common_state_dict,
        load_sharded_metadata,
    )

    hf, megatron = str(tmp_path / "hf"), str(tmp_path / "megatron")
    original = save_tiny(hf, moe=True, with_mtp=True)
    import_checkpoint(hf, megatron, max_bytes=256 * 1024)
    with open(os.path.join(megatron, TRACKER_FILE)) as f:
        assert f.read() == "release"
    release = os.path.join(megatron, "release")
    assert load_common_state_dict(release) == {"checkpoint_version": 3.0, "iteration": 0}
    shapes = {key: tuple(t.global_shape) for key, t in load_tensors_metadata(release).items()}
    config = converter_config(moe=True)
    t, v = config.text, config.vision
    experts = "language_model.decoder.layers.1.mlp.experts.experts.linear_fc2.weight"
    assert shapes[experts] == (t.num_experts, t.hidden_size, t.moe_intermediate_size)
    down = original["model.language_model.layers.0.mlp.experts.4.down_proj.weight"]
    assert torch.equal(read_dcp(release, experts)[4], down)
    gdn = "language_model.decoder.layers.0.self_attention."
    z = original["model.language_model.layers.0.linear_attn.in_proj_z.weight"]
    assert torch.equal(read_dcp(release, gdn + "in_proj.weight.z"), z)
    assert (
        shapes[gdn + "conv1d.weight.value"][0] == t.linear_num_value_heads * t.linear_value_head_dim
    )
    fc2 = "vision.blocks.layers.mlp.linear_fc2.weight"
    assert shapes[fc2] == (v.depth, v.hidden_size, v.intermediate_size)
    vision_fc2 = original["model.visual.blocks.1.mlp.linear_fc2.weight"]
    assert torch.equal(read_dcp(release, fc2)[1], vision_fc2)
    assert "language_model.mtp.layers.0.eh_proj.weight" in shapes
    objects = set(load_sharded_metadata(release))
    assert {
        "language_model.decoder.layers.6.self_attention.linear_qkv._extra_state/shard_0_1",
        "language_model.decoder.layers.6.self_attention.core_attention._extra_state/shard_0_1",
        "language_model.decoder.layers.0.self_attention.out_norm._extra_state/shard_0_1",
        "language_model.decoder.layers.1.mlp.experts.experts.linear_fc1._extra_state/shard_7_8",
        "vision.blocks.layers.self_attention.linear_qkv._extra_state/shard_1_2",
        "language_model.output_layer._extra_state/shard_0_1",
    } <= objects
    assert not any("conv1d._extra_state" in key or "router._extra_state" in key for key in objects)


def test_export_reads_a_training_checkpoint_directory(tmp_path):
    """A save directory whose tracker names an iteration; the HF config passed explicitly."""
    hf, megatron, back = (str(tmp_path / name) for name in ("hf", "megatron", "back"))
    original = save_tiny(hf, moe=False, with_mtp=False)
    import_checkpoint(hf, megatron)
    os.rename(os.path.join(megatron, "release"), os.path.join(megatron, "iter_0000020"))
    with open(os.path.join(megatron, TRACKER_FILE), "w") as f:
        f.write("20")
    os.remove(os.path.join(megatron, "config.json"))
    with pytest.raises(FileNotFoundError, match="--hf-config"):
        export_checkpoint(megatron, back)
    export_checkpoint(megatron, back, hf_config_dir=hf)
    exported = read_hf_checkpoint(back)
    assert all(torch.equal(exported[name], original[name]) for name in original)


def test_refuses_a_non_empty_output_directory(tmp_path):
    hf, megatron = str(tmp_path / "hf"), str(tmp_path / "megatron")
    save_tiny(hf, moe=False, with_mtp=False)
    os.makedirs(os.path.join(megatron, "release"))
    open(os.path.join(megatron, "release", "stale"), "w").close()
    with pytest.raises(FileExistsError, match="not empty"):
        import_checkpoint(hf, megatron)


def test_refuses_other_models(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match=r"Qwen3\.5"):
        import_checkpoint(str(tmp_path / "llama"), str(tmp_path / "out"), tp=1, ep=1)


def test_names_missing_and_unexpected_tensors(tmp_path):
    hf = str(tmp_path / "hf")
    save_tiny(hf, moe=False, with_mtp=False)
    index_path = os.path.join(hf, INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    dropped = "model.language_model.layers.0.linear_attn.A_log"
    index["weight_map"].pop(dropped)
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(KeyError, match=dropped):
        import_checkpoint(hf, str(tmp_path / "out"), tp=1, ep=1)


@pytest.mark.parametrize(("moe", "tp", "ep", "problem"), [
    (False, 3, 1, "does not split over tensor-parallel size 3"),
    (True, 1, 3, "8 experts do not split over EP 3"),
    (False, 1, 2, "EP 2 needs a MoE model"),
])  # fmt: skip
def test_refuses_layouts_the_sizes_do_not_divide(tmp_path, moe, tp, ep, problem):
    hf = str(tmp_path / "hf")
    save_tiny(hf, moe=moe, with_mtp=False)
    with pytest.raises(ValueError, match=problem):
        import_checkpoint(hf, str(tmp_path / "out"), tp=tp, ep=ep)


def test_tied_checkpoint_that_also_stores_the_head(tmp_path, capsys):
    """Some tied checkpoints carry lm_head.weight anyway: import skips it, saying so."""
    from transformers import Qwen3_5ForConditionalGeneration

    config = converter_config(moe=False)
    config = dataclasses.replace(
        config, text=dataclasses.replace(config.text, tie_word_embeddings=True)
    )
    hf, megatron, back = (str(tmp_path / name) for name in ("hf", "megatron", "back"))
    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration(config.to_hf_config())
    original = save_hf_checkpoint(model, config, hf, with_mtp=False)
    assert "lm_head.weight" not in original
    head = {"lm_head.weight": original["model.language_model.embed_tokens.weight"].clone()}
    save_file(head, os.path.join(hf, "head.safetensors"))
    index_path = os.path.join(hf, INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"]["lm_head.weight"] = "head.safetensors"
    with open(index_path, "w") as f:
        json.dump(index, f)
    import_checkpoint(hf, megatron)
    assert "lm_head.weight ignored" in capsys.readouterr().out
    export_checkpoint(megatron, back)
    exported = read_hf_checkpoint(back)
    assert set(exported) == set(original)
    assert all(torch.equal(exported[name], original[name]) for name in original)


def test_fsdp_dtensor_round_trip_is_bit_exact(tmp_path):
    hf, megatron, back = (str(tmp_path / name) for name in ("hf", "megatron", "back"))
    original = save_tiny(hf, moe=True, with_mtp=True)
    result = import_checkpoint(
        hf, megatron, ep=2, max_bytes=512 * 1024, megatron_format="fsdp_dtensor"
    )
    assert result["parts"] > 2
    export_checkpoint(megatron, back)
    exported = read_hf_checkpoint(back)
    assert set(exported) == set(original)
    assert all(torch.equal(exported[name], original[name]) for name in original)


def test_fsdp_dtensor_checkpoint_loads_like_megatron_fsdp(tmp_path):
    """megatron's fsdp_dtensor loader: a DCP checkpoint without metadata.json, read with a strict
    DefaultLoadPlanner into {'model': {'module.<name>': ...}, 'args', 'iteration',
    'checkpoint_version'}; SwiGLU fc1 tensors split into _w / _v halves except in the GELU
    vision blocks, Gated DeltaNet's in_proj fused, experts one key each, no extra state."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing import check_is_distributed_checkpoint
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from models.qwen35_vl.checkpoint_layout import megatron_shape
    from models.qwen35_vl.hf_weights import hf_tensor_shapes, weight_rules

    hf, megatron = str(tmp_path / "hf"), str(tmp_path / "megatron")
    original = save_tiny(hf, moe=True, with_mtp=True)
    import_checkpoint(hf, megatron, megatron_format="fsdp_dtensor")
    release = os.path.join(megatron, "release")
    assert not check_is_distributed_checkpoint(release)  # megatron then takes it as fsdp_dtensor
    assert os.path.exists(os.path.join(release, ".metadata"))

    config = converter_config(moe=True).with_mtp_layers(1)
    t = config.text
    hf_shapes = hf_tensor_shapes(config)
    model: dict[str, torch.Tensor] = {}
    for rule in weight_rules(config):
        shape = megatron_shape(rule, hf_shapes)
        name = "module." + rule.megatron
        split = rule.megatron.rsplit(".", 2)[-2] == "linear_fc1" and "vision.blocks" not in name
        for suffix in ("_w", "_v") if split else ("",):
            rows = shape[0] // 2 if split else shape[0]
            model[name + suffix] = torch.empty((rows, *shape[1:]))  # the tiny model is fp32
    state = {"model": model, "args": None, "iteration": None, "checkpoint_version": None}
    reader = dcp.FileSystemReader(release)
    dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
    stored = {k for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
    assert stored == {"model." + name for name in model}
    assert (state["args"], state["iteration"], state["checkpoint_version"]) == (None, 0, 3.0)

    layer = "module.language_model.decoder.layers.1.mlp."
    expert = "model.language_model.layers.0.mlp.experts.3."
    fc1 = layer + "experts.linear_fc1.weight3"
    assert torch.equal(model[fc1 + "_w"], original[expert + "gate_proj.weight"])
    assert torch.equal(model[fc1 + "_v"], original[expert + "up_proj.weight"])
    up = original["model.language_model.layers.0.mlp.shared_expert.up_proj.weight"]
    assert torch.equal(model[layer + "shared_experts.linear_fc1.weight_v"], up)
    gdn = "module.language_model.decoder.layers.0.self_attention."
    z = original["model.language_model.layers.0.linear_attn.in_proj_z.weight"]
    in_proj = model[gdn + "in_proj.weight"]  # [qkv, z, beta, alpha] rows, one key
    qkv = 2 * t.linear_num_key_heads * t.linear_key_head_dim + z.shape[0]
    assert torch.equal(in_proj[qkv : qkv + z.shape[0]], z)
    assert "module.vision.blocks.layers.1.mlp.linear_fc1.weight" in model
    assert "module.vision.merger.mlp.linear_fc1.bias_w" in model
    assert not any("_extra_state" in key for key in stored)


def test_fsdp_dtensor_refuses_what_its_layout_cannot_hold(tmp_path):
    import argparse

    import torch.distributed.checkpoint as dcp

    hf = str(tmp_path / "hf")
    save_tiny(hf, moe=False, with_mtp=False)
    with pytest.raises(ValueError, match="fsdp_dtensor with --tp 2"):
        import_checkpoint(hf, str(tmp_path / "out"), tp=2, megatron_format="fsdp_dtensor")
    trained = str(tmp_path / "trained")  # an FSDP training checkpoint saved at TP=2
    state = {"args": argparse.Namespace(tensor_model_parallel_size=2), "iteration": 5}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(trained), no_dist=True)
    with pytest.raises(ValueError, match="saved with TP=2"):
        export_checkpoint(trained, str(tmp_path / "back"), hf_config_dir=hf)


def test_export_refuses_a_non_empty_output_directory(tmp_path):
    hf, megatron, back = (str(tmp_path / name) for name in ("hf", "megatron", "back"))
    save_tiny(hf, moe=False, with_mtp=False)
    import_checkpoint(hf, megatron)
    os.makedirs(back)
    open(os.path.join(back, "stale"), "w").close()
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(megatron, back)
    assert os.listdir(back) == ["stale"]


def test_import_names_a_missing_directory_or_config(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(f"--hf-path {missing}: no such")):
        import_checkpoint(missing, str(tmp_path / "out"))
    hf = str(tmp_path / "hf")
    save_tiny(hf, moe=False, with_mtp=False)
    os.remove(os.path.join(hf, "config.json"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"--hf-path {hf} has no config.json")):
        import_checkpoint(hf, str(tmp_path / "out"))


def test_import_names_a_truncated_shard(tmp_path):
    hf = str(tmp_path / "hf")
    save_tiny(hf, moe=False, with_mtp=False)
    with open(os.path.join(hf, INDEX_FILE)) as f:
        shard = os.path.join(hf, sorted(set(json.load(f)["weight_map"].values()))[-1])
    with open(shard, "rb") as f:
        data = f.read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{shard}: not a readable safetensors file")):
        import_checkpoint(hf, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")

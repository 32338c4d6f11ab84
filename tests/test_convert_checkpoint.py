"""scripts/convert_hf_checkpoint.py on CPU: a tiny random model saved by transformers'
save_pretrained (dense and MoE, several shards, with and without MTP tensors) goes through import
(TP / EP shards) and export, and every tensor comes back bit-identical; bad inputs are refused
with the problem named.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.qwen35_vl.hf_weights import mtp_tensor_shapes
from scripts.convert_hf_checkpoint import INDEX_FILE, export_checkpoint, import_checkpoint
from tests.gpu_harness import tiny_config


def converter_config(moe: bool):
    """The tiny test model with two key/value groups, so it splits over TP=2."""
    config = tiny_config(moe=moe)
    return dataclasses.replace(config, text=dataclasses.replace(config.text, num_key_value_heads=2))


def save_tiny(directory: str, moe: bool, with_mtp: bool) -> dict[str, torch.Tensor]:
    """save_pretrained of a random tiny model (several shards), optionally plus `mtp.*` tensors
    in their own shard (transformers writes none); returns every saved tensor."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    config = converter_config(moe)
    model_class = Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration
    model_class(config.to_hf_config()).save_pretrained(directory, max_shard_size="1MB")
    if with_mtp:
        mtp = {
            name: torch.randn(shape)
            for name, shape in mtp_tensor_shapes(config.with_mtp_layers(1)).items()
        }
        save_file(mtp, os.path.join(directory, "mtp.safetensors"))
        index_path = os.path.join(directory, INDEX_FILE)
        with open(index_path) as f:
            index = json.load(f)
        index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
        with open(index_path, "w") as f:
            json.dump(index, f)
    return read_all(directory)


def read_all(directory: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(directory, INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    tensors = {}
    for name, file in weight_map.items():
        with safe_open(os.path.join(directory, file), "pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


@pytest.mark.parametrize(
    ("moe", "with_mtp", "tp", "ep"),
    [(False, False, 2, 1), (False, True, 1, 1), (True, True, 2, 2), (True, False, 1, 4)],
)
def test_import_export_is_bit_exact(tmp_path, moe, with_mtp, tp, ep):
    hf, megatron, back = (str(tmp_path / name) for name in ("hf", "megatron", "back"))
    original = save_tiny(hf, moe, with_mtp)
    assert len([f for f in os.listdir(hf) if f.endswith(".safetensors")]) > 2
    layout = import_checkpoint(hf, megatron, tp=tp, ep=ep, max_bytes=512 * 1024)
    assert layout["mtp_num_hidden_layers"] == int(with_mtp)
    assert len(layout["ranks"]) == tp * ep
    assert layout["peak_memory_mib"] > 0
    export_checkpoint(megatron, back, max_bytes=1024 * 1024)
    exported = read_all(back)
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


def test_rank_files_hold_megatron_shards(tmp_path):
    hf, megatron = str(tmp_path / "hf"), str(tmp_path / "megatron")
    original = save_tiny(hf, moe=True, with_mtp=False)
    import_checkpoint(hf, megatron, tp=2, ep=2)
    rank = read_all(os.path.join(megatron, "tp01_ep001"))
    # EP rank 1 of 2 holds experts 4-7 of 8 as local experts 0-3.
    local = rank["language_model.decoder.layers.1.mlp.experts.linear_fc2.weight0"]
    assert torch.equal(
        local, original["model.language_model.layers.0.mlp.experts.4.down_proj.weight"]
    )
    assert "language_model.decoder.layers.1.mlp.experts.linear_fc2.weight4" not in rank
    # TP rank 1 of 2 holds the second half of the output projection's input features.
    o_proj = original["model.language_model.layers.3.self_attn.o_proj.weight"]
    shard = rank["language_model.decoder.layers.6.self_attention.linear_proj.weight"]
    assert torch.equal(shard, o_proj.chunk(2, dim=1)[1])


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

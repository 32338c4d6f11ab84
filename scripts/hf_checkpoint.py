"""User tool: writes and reads small HF Qwen3.5 checkpoints: transformers' save_pretrained in
several shards, optionally plus random `mtp.*` tensors as the released checkpoints carry
(transformers writes none), and every tensor of such a directory read back.

    from scripts.hf_checkpoint import read_hf_checkpoint, save_hf_checkpoint
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.qwen35_vl.configuration import Qwen35VLConfig
from models.qwen35_vl.hf_weights import mtp_tensor_shapes

INDEX_FILE = "model.safetensors.index.json"


def save_hf_checkpoint(
    model, config: Qwen35VLConfig, directory: str, with_mtp: bool, max_shard_size: str = "1MB"
) -> dict[str, torch.Tensor]:
    """save_pretrained of `model` (CPU copy), plus random `mtp.*` tensors in their own shard when
    `with_mtp`; returns every saved tensor."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if with_mtp:
        generator = torch.Generator().manual_seed(7)
        dtype = next(model.parameters()).dtype
        mtp = {
            name: torch.randn(shape, generator=generator).to(dtype)
            for name, shape in mtp_tensor_shapes(config.with_mtp_layers(1)).items()
        }
        save_file(mtp, os.path.join(directory, "mtp.safetensors"))
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                index = json.load(f)
        else:  # a checkpoint small enough for one file has no index yet
            with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
                index = {"weight_map": dict.fromkeys(f.keys(), "model.safetensors")}
        index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
        with open(index_path, "w") as f:
            json.dump(index, f)
    return read_hf_checkpoint(directory)


def read_hf_checkpoint(directory: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(directory, INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    tensors = {}
    for name, file in weight_map.items():
        with safe_open(os.path.join(directory, file), "pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors

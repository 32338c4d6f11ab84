"""Where Qwen3.5-VL's weights live in megatron-core 0.19 distributed checkpoints.

`torch_dist` stores every parameter under its ShardedTensor key as one global (unsharded) tensor,
so one checkpoint loads into any TP / EP / DP layout; keys follow the modules' `sharded_state_dict`
(`tensor_chunks`, `extra_state_objects`). Megatron-FSDP's `fsdp_dtensor` stores the model's
`state_dict` names under `model.module.`, with SwiGLU fc1 weights split in halves
(`fsdp_dtensor_chunks`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .configuration import Qwen35VLConfig
from .hf_weights import WeightRule

# megatron's GatedDeltaNet.sharded_state_dict saves these sections of in_proj / conv1d under
# separate keys (`in_proj.weight.query`, ...) so that they reshard independently over TP.
GDN_IN_PROJ_SECTIONS = ("query", "key", "value", "z", "beta", "alpha")
GDN_CONV_SECTIONS = ("query", "key", "value")

OUTPUT_LAYER = "language_model.output_layer"
# TransformerBlock (the vision tower) stacks its identical layers along a leading layer axis.
_VISION_LAYER = re.compile(r"^vision\.blocks\.layers\.(\d+)\.(.+)$")
# TEGroupedMLP keys all experts of a layer together, expert index first ("experts." twice, to
# match SequentialMLP's keys).
_EXPERT = re.compile(r"^(.+\.mlp\.experts\.)(linear_fc[12])\.weight(\d+)$")
# Parameter owners that are not Transformer Engine modules (or megatron parallel linears), so
# they carry no `_extra_state`.
_NO_EXTRA_STATE = {
    "patch_embed",
    "pos_embed",
    "word_embeddings",
    "conv1d",
    "router",
    "self_attention",  # Gated DeltaNet's own A_log / dt_bias
    "shared_experts",  # the shared-expert gate weight
}


@dataclass(frozen=True)
class TensorChunk:
    """One stored piece of a checkpoint tensor: rows `rows` (dim 0) of a megatron (TP=1) tensor,
    with a leading axis of size 1 added when `stacked` (layer or expert index)."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    rows: tuple[int, int] | None = None
    stacked: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, *self.global_shape[1:]) if self.stacked else self.global_shape

    def take(self, tensor: Tensor) -> Tensor:
        """This chunk of the full megatron tensor."""
        part = tensor if self.rows is None else tensor[self.rows[0] : self.rows[1]]
        return part.unsqueeze(0) if self.stacked else part

    def put(self, chunk: Tensor, tensor: Tensor) -> None:
        """Inverse of `take`: write `chunk` into the full megatron tensor."""
        part = chunk[0] if self.stacked else chunk
        if self.rows is None:
            tensor.copy_(part)
        else:
            tensor[self.rows[0] : self.rows[1]].copy_(part)


def megatron_shape(rule: WeightRule, hf_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of a megatron (TP=1) tensor, computed on meta tensors."""
    inputs = [torch.empty(hf_shapes[name], device="meta") for name in rule.hf]
    return tuple(rule.to_megatron(inputs).shape)


def _sections(rule: WeightRule, shape: tuple[int, ...], names: tuple[str, ...]):
    start = 0
    for name, size in zip(names, rule.sections, strict=True):
        yield TensorChunk(
            f"{rule.megatron}.{name}", (size, *shape[1:]), (0,) * len(shape), (start, start + size)
        )
        start += size


def tensor_chunks(
    rule: WeightRule, shape: tuple[int, ...], config: Qwen35VLConfig
) -> list[TensorChunk]:
    """The checkpoint chunks that hold the megatron tensor of `rule` (full shape `shape`)."""
    zeros = (0,) * len(shape)
    vision_layer = _VISION_LAYER.match(rule.megatron)
    if vision_layer:
        layer, rest = vision_layer.groups()
        key = f"vision.blocks.layers.{rest}"
        global_shape = (config.vision.depth, *shape)
        return [TensorChunk(key, global_shape, (int(layer), *zeros), stacked=True)]
    expert = _EXPERT.match(rule.megatron)
    if expert:
        prefix, linear, index = expert.groups()
        key = f"{prefix}experts.{linear}.weight"
        global_shape = (config.text.num_experts, *shape)
        return [TensorChunk(key, global_shape, (int(index), *zeros), stacked=True)]
    if rule.megatron.endswith(".self_attention.in_proj.weight"):
        return list(_sections(rule, shape, GDN_IN_PROJ_SECTIONS))
    if rule.megatron.endswith(".self_attention.conv1d.weight"):
        return list(_sections(rule, shape, GDN_CONV_SECTIONS))
    return [TensorChunk(rule.megatron, shape, zeros)]


@dataclass(frozen=True)
class ExtraStateObject:
    """A module's `_extra_state` entry (a megatron ShardedObject): TE modules store an empty
    uint8 tensor when not training in FP8, megatron's parallel linears store None."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    empty_tensor: bool = True

    def value(self) -> Tensor | None:
        return torch.empty(0, dtype=torch.uint8) if self.empty_tensor else None


def extra_state_objects(rules: list[WeightRule], config: Qwen35VLConfig) -> list[ExtraStateObject]:
    """The `_extra_state` objects a model built from our TE specs asks for when it loads."""
    owners: dict[str, None] = {}
    for rule in rules:
        owner = rule.megatron.rsplit(".", 1)[0]
        if owner.rsplit(".", 1)[-1] in _NO_EXTRA_STATE:
            continue
        if owner.endswith(".linear_qkv"):
            owners[owner[: -len("linear_qkv")] + "core_attention"] = None
        owners[owner] = None
    # The output layer is megatron's own ColumnParallelLinear (extra state None); it exists, and
    # asks for its extra state, even when its weight is tied to the embedding.
    owners.pop(OUTPUT_LAYER, None)
    objects = [ExtraStateObject(f"{OUTPUT_LAYER}._extra_state", (1,), (0,), empty_tensor=False)]
    for owner in owners:
        vision_layer = _VISION_LAYER.match(owner + ".")
        if vision_layer:
            layer, rest = vision_layer.groups()
            key = f"vision.blocks.layers.{rest}_extra_state"
            objects.append(ExtraStateObject(key, (config.vision.depth,), (int(layer),)))
        elif ".mlp.experts.linear_fc" in owner:
            prefix, linear = owner.rsplit(".", 1)
            key = f"{prefix}.experts.{linear}._extra_state"
            num = config.text.num_experts
            objects.extend(ExtraStateObject(key, (num,), (e,)) for e in range(num))
        else:
            objects.append(ExtraStateObject(f"{owner}._extra_state", (1,), (0,)))
    return objects


# Megatron-FSDP's model keys: FSDP wrapper -> Float16Module -> model state-dict names.
FSDP_MODEL_PREFIX = "model.module."
# megatron 0.19's handle_swiglu_in_state_dict stores these fc1 tensors as `<name>_w` (first half
# of the rows) and `<name>_v` (second half), except inside TransformerLayers whose config has no
# gated linear unit: here the GELU vision blocks. The vision merger is no TransformerLayer, so its
# (GELU) fc1 is split too; the split only names two halves, loading undoes it.
_SWIGLU_FC1 = re.compile(r"\.mlp\.(experts\.|shared_experts\.)?linear_fc1\.(weight|bias)\d*$")


def fsdp_dtensor_chunks(rule: WeightRule, shape: tuple[int, ...]) -> list[TensorChunk]:
    """The `fsdp_dtensor` checkpoint entries that hold the (TP=1) megatron tensor of `rule`."""
    key = FSDP_MODEL_PREFIX + rule.megatron
    zeros = (0,) * len(shape)
    if _SWIGLU_FC1.search(rule.megatron) and not _VISION_LAYER.match(rule.megatron):
        half = shape[0] // 2
        return [
            TensorChunk(f"{key}_w", (half, *shape[1:]), zeros, (0, half)),
            TensorChunk(f"{key}_v", (half, *shape[1:]), zeros, (half, shape[0])),
        ]
    return [TensorChunk(key, shape, zeros)]

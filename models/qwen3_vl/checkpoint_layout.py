"""How Qwen3-VL's weights move between HF checkpoints and megatron-core 0.19 distributed checkpoints
(`scripts/convert_hf_checkpoint.py`). The model is built from Qwen3.5's modules (HybridModel
decoder, vision tower), so its tensors sit where Qwen3.5's do; what differs is that Qwen3-VL-MoE
checkpoints store each layer's routed experts as one fused tensor per projection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from models.qwen35_vl import checkpoint_layout as qwen35_layout
from models.qwen35_vl.checkpoint_layout import TensorChunk, extra_state_objects, megatron_shape
from models.qwen35_vl.hf_weights import (
    REPLICATED,
    WeightRule,
    check_names,
    shard_for_tensor_parallel,
)
from models.spec import WeightConversion

from . import hf_weights
from .configuration import Qwen3VLConfig

# TEGroupedMLP's torch_dist keys repeat this part ("<layer>.mlp.experts.experts.linear_fc1.weight")
# to match SequentialMLP's keys.
_EXPERTS = ".mlp.experts."


@dataclass(frozen=True)
class FusedExpertsRule:
    """All routed experts of one MoE layer's linear_fc1 (or linear_fc2): megatron's per-expert
    weights `weight0 ... weight{E-1}` stacked as [E, out, in], from the one fused HF tensor
    (`mlp.experts.gate_up_proj` / `down_proj`) Qwen3-VL-MoE checkpoints store.

    transformers holds that tensor as [E, out, in] (gate rows then up rows, as megatron's fc1) and
    its save_pretrained writes it so; the released checkpoints store the transpose [E, in, out].
    Reading, we take a tensor of the [E, out, in] shape as is and transpose any other, exactly as
    transformers' loader does; we write the released layout, except when out == in: the two
    layouts then have one shape, which transformers reads as its own, so we write that one.
    """

    megatron: str  # "<layer>.mlp.experts.linear_fc1.weight": the expert index left off
    hf: tuple[str]
    shape: tuple[int, int, int]  # [E, out, in]
    expert: bool = True  # placed by expert parallelism, never TP-split
    tp: str = REPLICATED

    @property
    def hf_shape(self) -> tuple[int, int, int]:
        """The released checkpoints' layout, [E, in, out]."""
        return (self.shape[0], self.shape[2], self.shape[1])

    def to_megatron(self, tensors: list[Tensor]) -> Tensor:
        fused = tensors[0]
        return fused if tuple(fused.shape) == self.shape else fused.transpose(1, 2)

    def to_hf(self, tensor: Tensor, hf_shapes: list[tuple[int, ...]]) -> list[Tensor]:
        return [tensor if tuple(hf_shapes[0]) == self.shape else tensor.transpose(1, 2)]


def _fused_expert_rules(config: Qwen3VLConfig, first: WeightRule) -> Iterator[FusedExpertsRule]:
    """The two fused rules of the MoE layer whose expert 0's linear_fc1 rule is `first`."""
    t = config.text
    megatron = first.megatron.removesuffix("linear_fc1.weight0")
    hf = first.hf[0].removesuffix("0.gate_proj.weight")
    experts, width, hidden = t.num_experts, t.moe_intermediate_size, t.hidden_size
    yield FusedExpertsRule(
        megatron + "linear_fc1.weight", (hf + "gate_up_proj",), (experts, 2 * width, hidden)
    )
    yield FusedExpertsRule(
        megatron + "linear_fc2.weight", (hf + "down_proj",), (experts, hidden, width)
    )


def weight_rules(config: Qwen3VLConfig) -> list[Any]:
    """`hf_weights.weight_rules` with each MoE layer's per-expert rules replaced by the two
    fused rules of that layer (the HF names the checkpoints hold)."""
    rules: list[Any] = []
    for rule in hf_weights.weight_rules(config):
        if not rule.expert:
            rules.append(rule)
        elif rule.megatron.endswith(".linear_fc1.weight0"):
            rules.extend(_fused_expert_rules(config, rule))
    return rules


def hf_tensor_shapes(config: Qwen3VLConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the HF tensors the rules name, fused experts in the released layout."""
    shapes = {
        name: shape
        for name, shape in hf_weights.hf_tensor_shapes(config).items()
        if _EXPERTS not in name  # the per-expert names
    }
    for rule in weight_rules(config):
        if isinstance(rule, FusedExpertsRule):
            shapes[rule.hf[0]] = rule.hf_shape
    return shapes


def tensor_chunks(rule: Any, shape: tuple[int, ...], config: Qwen3VLConfig) -> list[TensorChunk]:
    """The torch_dist chunks of the megatron tensor of `rule`: Qwen3.5's layout, where
    TEGroupedMLP keys all experts of a layer together, expert index first."""
    if isinstance(rule, FusedExpertsRule):
        layer, linear = rule.megatron.split(_EXPERTS)
        return [TensorChunk(f"{layer}{_EXPERTS}experts.{linear}", shape, (0,) * len(shape))]
    return qwen35_layout.tensor_chunks(rule, shape, config)


@dataclass(frozen=True)
class ExpertChunk(TensorChunk):
    """Expert `expert` (rows `rows`) of a fused [E, out, in] megatron tensor."""

    expert: int = 0

    def take(self, tensor: Tensor) -> Tensor:
        return super().take(tensor[self.expert])

    def put(self, chunk: Tensor, tensor: Tensor) -> None:
        super().put(chunk, tensor[self.expert])


def fsdp_dtensor_chunks(rule: Any, shape: tuple[int, ...]) -> list[TensorChunk]:
    """The fsdp_dtensor entries of the megatron tensor of `rule`: Qwen3.5's, where every expert
    has its own key (`weight{e}`, SwiGLU fc1 split in `_w` / `_v`)."""
    if not isinstance(rule, FusedExpertsRule):
        return qwen35_layout.fsdp_dtensor_chunks(rule, shape)
    chunks: list[TensorChunk] = []
    for e in range(shape[0]):
        # Expert e's own rule, so that its keys and fc1 halves come from Qwen3.5's naming.
        single = WeightRule(f"{rule.megatron}{e}", ())
        chunks.extend(
            ExpertChunk(chunk.key, chunk.global_shape, chunk.offset, chunk.rows, expert=e)
            for chunk in qwen35_layout.fsdp_dtensor_chunks(single, shape[1:])
        )
    return chunks


def config_with_tensors(config: Qwen3VLConfig, names: set[str], megatron: bool) -> Qwen3VLConfig:
    """Qwen3-VL has no optional tensors (no MTP layers): every checkpoint has the config's."""
    return config


def unused_hf_tensors(config: Qwen3VLConfig) -> dict[str, str]:
    if config.text.tie_word_embeddings:
        return {"lm_head.weight": "the config ties the output layer to the embedding"}
    return {}


WEIGHTS = WeightConversion(
    rules=weight_rules,
    hf_tensor_shapes=hf_tensor_shapes,
    megatron_shape=megatron_shape,
    shard_for_tensor_parallel=shard_for_tensor_parallel,
    torch_dist_chunks=tensor_chunks,
    fsdp_dtensor_chunks=fsdp_dtensor_chunks,
    extra_state_objects=extra_state_objects,
    check_names=check_names,
    config_with_tensors=config_with_tensors,
    unused_hf_tensors=unused_hf_tensors,
    fsdp_dtensor_tp_note=(
        "megatron-core 0.19's FSDP checkpoints split the GELU vision mergers' linear_fc1, as "
        "any linear_fc1 outside a TransformerLayer, into SwiGLU halves (_w / _v), which keeps "
        "their rows in the TP layout of the run that wrote them"
    ),
)

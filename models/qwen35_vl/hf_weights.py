"""Hugging Face <-> megatron weight mapping for Qwen3.5-VL, one rule per megatron tensor.

HF names follow the released checkpoints (`model.visual.*`, `model.language_model.*`, `lm_head`,
`mtp.*`, per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`); `split_fused_experts`
converts transformers' in-memory 3D expert tensors to them. Megatron names are those of
`Qwen35VLModel` at TP=1; `shard_for_tensor_parallel` gives the slice a TP rank holds (and so
checks that a TP size divides the model).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .configuration import FULL_ATTENTION, Qwen35VLConfig

HF_TEXT = "model.language_model."
HF_VISION = "model.visual."
MEGATRON_TEXT = "language_model."
MEGATRON_VISION = "vision."

# How a megatron tensor is split over tensor-parallel ranks.
REPLICATED = "replicated"
COLUMN = "column"  # split dim 0 (output features); `sections` split each section separately
ROW = "row"  # split dim 1 (input features)


@dataclass(frozen=True)
class WeightRule:
    """One megatron tensor and the HF tensors it is made of.

    `kind`: "copy" (one tensor), "concat" (HF tensors stacked along dim 0), "attention_qkv"
    (q_proj with its per-head output gate, k_proj, v_proj -> megatron's grouped
    [q, gate, k, v] layout), "qkv" (the same without the gate: [q heads of the group, k, v] per
    query group), "vision_qkv" (HF [q; k; v] -> per-head [q, k, v]), "patch_embed" (Conv3d
    kernel -> linear weight). `tp` / `sections` describe the TP split; `expert` marks a
    routed-expert tensor (placed by expert parallelism, never TP-split here).
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"
    tp: str = REPLICATED
    sections: tuple[int, ...] = ()
    heads: tuple[int, int, int] = (0, 0, 0)  # (query heads, groups, head dim) for qkv kinds
    expert: bool = False

    def to_megatron(self, tensors: list[Tensor]) -> Tensor:
        if self.kind == "copy":
            return tensors[0]
        if self.kind == "concat":
            return torch.cat(tensors, dim=0)
        if self.kind == "patch_embed":
            return tensors[0].reshape(tensors[0].shape[0], -1)
        heads, groups, dim = self.heads
        if self.kind == "vision_qkv":
            qkv = tensors[0]
            return qkv.reshape(3, heads, dim, *qkv.shape[1:]).transpose(0, 1).reshape(qkv.shape)
        if self.kind == "attention_qkv":
            q_gate, k, v = tensors
            per_group = heads // groups
            rest = q_gate.shape[1:]
            q_gate = q_gate.reshape(groups, per_group, 2, dim, *rest)
            parts = [
                q_gate[:, :, 0].reshape(groups, per_group * dim, *rest),
                q_gate[:, :, 1].reshape(groups, per_group * dim, *rest),
                k.reshape(groups, dim, *rest),
                v.reshape(groups, dim, *rest),
            ]
            return torch.cat(parts, dim=1).reshape(-1, *rest)
        if self.kind == "qkv":
            q, k, v = tensors
            rest = q.shape[1:]
            parts = [
                q.reshape(groups, heads // groups * dim, *rest),
                k.reshape(groups, dim, *rest),
                v.reshape(groups, dim, *rest),
            ]
            return torch.cat(parts, dim=1).reshape(-1, *rest)
        raise ValueError(f"unknown rule kind {self.kind!r}")

    def to_hf(self, tensor: Tensor, hf_shapes: list[tuple[int, ...]]) -> list[Tensor]:
        if self.kind == "copy":
            return [tensor]
        if self.kind == "concat":
            return list(torch.split(tensor, [shape[0] for shape in hf_shapes], dim=0))
        if self.kind == "patch_embed":
            return [tensor.reshape(hf_shapes[0])]
        heads, groups, dim = self.heads
        if self.kind == "vision_qkv":
            rest = tensor.shape[1:]
            return [tensor.reshape(heads, 3, dim, *rest).transpose(0, 1).reshape(tensor.shape)]
        if self.kind == "attention_qkv":
            per_group = heads // groups
            rest = tensor.shape[1:]
            grouped = tensor.reshape(groups, (2 * per_group + 2) * dim, *rest)
            q, gate, k, v = torch.split(
                grouped, [per_group * dim, per_group * dim, dim, dim], dim=1
            )
            q_gate = torch.stack(
                [
                    q.reshape(groups, per_group, dim, *rest),
                    gate.reshape(groups, per_group, dim, *rest),
                ],
                dim=2,
            )
            return [q_gate.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
        if self.kind == "qkv":
            per_group = heads // groups
            rest = tensor.shape[1:]
            grouped = tensor.reshape(groups, (per_group + 2) * dim, *rest)
            q, k, v = torch.split(grouped, [per_group * dim, dim, dim], dim=1)
            return [part.reshape(-1, *rest) for part in (q, k, v)]
        raise ValueError(f"unknown rule kind {self.kind!r}")


def vision_rules(config: Any) -> Iterator[WeightRule]:
    """The vision tower: patch embedding, position table, blocks and the final merger."""
    v = config.vision
    qkv_heads = (v.num_heads, v.num_heads, v.head_dim)
    yield WeightRule(
        "vision.patch_embed.weight", (HF_VISION + "patch_embed.proj.weight",), "patch_embed"
    )
    yield WeightRule("vision.patch_embed.bias", (HF_VISION + "patch_embed.proj.bias",))
    yield WeightRule("vision.pos_embed.weight", (HF_VISION + "pos_embed.weight",))
    for i in range(v.depth):
        meg, hf = f"vision.blocks.layers.{i}.", f"{HF_VISION}blocks.{i}."
        attn, mlp = meg + "self_attention.", meg + "mlp."
        yield WeightRule(attn + "linear_qkv.layer_norm_weight", (hf + "norm1.weight",))
        yield WeightRule(attn + "linear_qkv.layer_norm_bias", (hf + "norm1.bias",))
        for suffix in ("weight", "bias"):
            yield WeightRule(
                f"{attn}linear_qkv.{suffix}",
                (f"{hf}attn.qkv.{suffix}",),
                "vision_qkv",
                COLUMN,
                heads=qkv_heads,
            )
        yield WeightRule(attn + "linear_proj.weight", (hf + "attn.proj.weight",), tp=ROW)
        yield WeightRule(attn + "linear_proj.bias", (hf + "attn.proj.bias",))
        yield WeightRule(mlp + "linear_fc1.layer_norm_weight", (hf + "norm2.weight",))
        yield WeightRule(mlp + "linear_fc1.layer_norm_bias", (hf + "norm2.bias",))
        yield WeightRule(mlp + "linear_fc1.weight", (hf + "mlp.linear_fc1.weight",), tp=COLUMN)
        yield WeightRule(mlp + "linear_fc1.bias", (hf + "mlp.linear_fc1.bias",), tp=COLUMN)
        yield WeightRule(mlp + "linear_fc2.weight", (hf + "mlp.linear_fc2.weight",), tp=ROW)
        yield WeightRule(mlp + "linear_fc2.bias", (hf + "mlp.linear_fc2.bias",))
    yield from merger_rules("vision.merger.", HF_VISION + "merger.")


def merger_rules(meg: str, hf: str) -> Iterator[WeightRule]:
    """A patch merger: its LayerNorm `norm` and its MLP (column-parallel fc1, row-parallel fc2;
    a row-parallel bias is added after the all-reduce, so every rank holds it whole)."""
    yield WeightRule(meg + "norm.weight", (hf + "norm.weight",))
    yield WeightRule(meg + "norm.bias", (hf + "norm.bias",))
    yield WeightRule(meg + "mlp.linear_fc1.weight", (hf + "linear_fc1.weight",), tp=COLUMN)
    yield WeightRule(meg + "mlp.linear_fc1.bias", (hf + "linear_fc1.bias",), tp=COLUMN)
    yield WeightRule(meg + "mlp.linear_fc2.weight", (hf + "linear_fc2.weight",), tp=ROW)
    yield WeightRule(meg + "mlp.linear_fc2.bias", (hf + "linear_fc2.bias",))


def _mixer_rules(
    config: Qwen35VLConfig, meg: str, hf: str, layer_type: str
) -> Iterator[WeightRule]:
    """Token mixer of one decoder layer; `hf` is the HF layer prefix (ends with '.')."""
    t = config.text
    attn = meg + "self_attention."
    if layer_type == FULL_ATTENTION:
        yield WeightRule(attn + "linear_qkv.layer_norm_weight", (hf + "input_layernorm.weight",))
        yield WeightRule(
            attn + "linear_qkv.weight",
            tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"),
            "attention_qkv",
            COLUMN,
            heads=(t.num_attention_heads, t.num_key_value_heads, t.head_dim),
        )
        yield WeightRule(attn + "q_layernorm.weight", (hf + "self_attn.q_norm.weight",))
        yield WeightRule(attn + "k_layernorm.weight", (hf + "self_attn.k_norm.weight",))
        yield WeightRule(attn + "linear_proj.weight", (hf + "self_attn.o_proj.weight",), tp=ROW)
        return
    key_dim = t.linear_num_key_heads * t.linear_key_head_dim
    value_dim = t.linear_num_value_heads * t.linear_value_head_dim
    gdn = hf + "linear_attn."
    yield WeightRule(attn + "in_proj.layer_norm_weight", (hf + "input_layernorm.weight",))
    yield WeightRule(
        attn + "in_proj.weight",
        tuple(gdn + f"in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")),
        "concat",
        COLUMN,
        sections=(key_dim, key_dim, value_dim, value_dim) + (t.linear_num_value_heads,) * 2,
    )
    yield WeightRule(
        attn + "conv1d.weight",
        (gdn + "conv1d.weight",),
        tp=COLUMN,
        sections=(key_dim, key_dim, value_dim),
    )
    yield WeightRule(attn + "A_log", (gdn + "A_log",), tp=COLUMN)
    yield WeightRule(attn + "dt_bias", (gdn + "dt_bias",), tp=COLUMN)
    yield WeightRule(attn + "out_norm.weight", (gdn + "norm.weight",))
    yield WeightRule(attn + "out_proj.weight", (gdn + "out_proj.weight",), tp=ROW)


def _mlp_rules(config: Qwen35VLConfig, meg: str, hf: str) -> Iterator[WeightRule]:
    """MLP / MoE half of one decoder layer."""
    t = config.text
    if not t.is_moe:
        yield from dense_mlp_rules(meg, hf, t.intermediate_size)
        return
    yield from routed_expert_rules(meg, hf, t.num_experts)
    yield from _gated_mlp_rules(
        meg + "mlp.shared_experts.", hf + "mlp.shared_expert.", t.shared_expert_intermediate_size
    )
    yield WeightRule(
        meg + "mlp.shared_experts.gate_weight", (hf + "mlp.shared_expert_gate.weight",)
    )


def dense_mlp_rules(meg: str, hf: str, width: int) -> Iterator[WeightRule]:
    """A decoder layer's dense SwiGLU MLP, its norm fused into linear_fc1 (`meg` and `hf` are
    the layer prefixes)."""
    yield WeightRule(
        meg + "mlp.linear_fc1.layer_norm_weight", (hf + "post_attention_layernorm.weight",)
    )
    yield from _gated_mlp_rules(meg + "mlp.", hf + "mlp.", width)


def routed_expert_rules(meg: str, hf: str, num_experts: int) -> Iterator[WeightRule]:
    """A decoder layer's routed experts: separate pre_mlp_layernorm, router, and TEGroupedMLP's
    one parameter per expert (linear_fc1.weight{e} / fc2.weight{e}; e is the global index at
    EP=1, with EP the model renumbers locally), each from the HF per-expert tensors."""
    yield WeightRule(meg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",))
    yield WeightRule(meg + "mlp.router.weight", (hf + "mlp.gate.weight",))
    for e in range(num_experts):
        expert = f"{hf}mlp.experts.{e}."
        yield WeightRule(
            f"{meg}mlp.experts.linear_fc1.weight{e}",
            (expert + "gate_proj.weight", expert + "up_proj.weight"),
            "concat",
            expert=True,
        )
        yield WeightRule(
            f"{meg}mlp.experts.linear_fc2.weight{e}", (expert + "down_proj.weight",), expert=True
        )


def _gated_mlp_rules(meg: str, hf: str, width: int) -> Iterator[WeightRule]:
    """SwiGLU MLP: megatron's fc1 is [gate; up] (split per section over TP), fc2 is down."""
    yield WeightRule(
        meg + "linear_fc1.weight",
        (hf + "gate_proj.weight", hf + "up_proj.weight"),
        "concat",
        COLUMN,
        sections=(width, width),
    )
    yield WeightRule(meg + "linear_fc2.weight", (hf + "down_proj.weight",), tp=ROW)


def _language_rules(config: Qwen35VLConfig) -> Iterator[WeightRule]:
    t = config.text
    yield WeightRule(
        MEGATRON_TEXT + "embedding.word_embeddings.weight",
        (HF_TEXT + "embed_tokens.weight",),
        tp=COLUMN,
    )
    for i, layer_type in enumerate(t.layer_types):
        hf = f"{HF_TEXT}layers.{i}."
        yield from _mixer_rules(config, f"{MEGATRON_TEXT}decoder.layers.{2 * i}.", hf, layer_type)
        yield from _mlp_rules(config, f"{MEGATRON_TEXT}decoder.layers.{2 * i + 1}.", hf)
    yield WeightRule(MEGATRON_TEXT + "decoder.final_norm.weight", (HF_TEXT + "norm.weight",))
    if not t.tie_word_embeddings:
        yield WeightRule(MEGATRON_TEXT + "output_layer.weight", ("lm_head.weight",), tp=COLUMN)
    if t.mtp_num_hidden_layers > 1:
        raise ValueError(
            "released Qwen3.5 checkpoints have one MTP layer; HF names for more are undefined"
        )
    if t.mtp_num_hidden_layers == 1:
        meg = MEGATRON_TEXT + "mtp.layers.0."
        yield WeightRule(meg + "enorm.weight", ("mtp.pre_fc_norm_embedding.weight",))
        yield WeightRule(meg + "hnorm.weight", ("mtp.pre_fc_norm_hidden.weight",))
        yield WeightRule(meg + "eh_proj.weight", ("mtp.fc.weight",), tp=COLUMN)
        yield from _mixer_rules(
            config, meg + "mtp_model_layer.layers.0.", "mtp.layers.0.", FULL_ATTENTION
        )
        yield from _mlp_rules(config, meg + "mtp_model_layer.layers.1.", "mtp.layers.0.")
        yield WeightRule(meg + "final_layernorm.weight", ("mtp.norm.weight",))


def weight_rules(config: Qwen35VLConfig) -> list[WeightRule]:
    """Every megatron tensor of the model (TP=1 names) with its HF source tensors."""
    return [*vision_rules(config), *_language_rules(config)]


def check_names(problem: str, expected: set[str], present: set[str]) -> None:
    """KeyError starting with `problem` and listing the missing and unexpected names, if any."""
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise KeyError(
            f"{problem}: {len(missing)} missing "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}, {len(unexpected)} unexpected "
            f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )


def hf_to_megatron(hf_state: Mapping[str, Tensor], config: Qwen35VLConfig) -> dict[str, Tensor]:
    """Full (TP=1) megatron state dict from an HF state dict in checkpoint layout. A checkpoint
    without `mtp.*` tensors (transformers' `save_pretrained`) needs `config.with_mtp_layers(0)`."""
    rules = weight_rules(config)
    expected = {name for rule in rules for name in rule.hf}
    check_names("HF state dict does not match the config", expected, set(hf_state))
    return {rule.megatron: rule.to_megatron([hf_state[n] for n in rule.hf]) for rule in rules}


def megatron_to_hf(
    megatron_state: Mapping[str, Tensor], config: Qwen35VLConfig
) -> dict[str, Tensor]:
    """HF checkpoint-layout state dict from a full (TP=1) megatron state dict; TE's
    `_extra_state` entries are ignored."""
    rules = weight_rules(config)
    weights = {k: v for k, v in megatron_state.items() if not k.endswith("_extra_state")}
    expected = {rule.megatron for rule in rules}
    check_names("megatron state dict does not match the config", expected, set(weights))
    hf_shapes = hf_tensor_shapes(config)
    out: dict[str, Tensor] = {}
    for rule in rules:
        shapes = [hf_shapes[name] for name in rule.hf]
        out.update(zip(rule.hf, rule.to_hf(weights[rule.megatron], shapes), strict=True))
    return out


def hf_tensor_shapes(config: Qwen35VLConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the HF checkpoint tensors (checkpoint layout), from an HF model built on the
    meta device; the `mtp.*` tensors, which transformers does not model, are those of its first
    full-attention layer plus fc [H, 2H] and three norms."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    model_class = (
        Qwen3_5MoeForConditionalGeneration
        if config.text.is_moe
        else Qwen3_5ForConditionalGeneration
    )
    with torch.device("meta"):
        model = model_class(config.to_hf_config())
    shapes = {
        name: tuple(tensor.shape)
        for name, tensor in split_fused_experts(model.state_dict(), config).items()
    }
    t = config.text
    if t.mtp_num_hidden_layers:
        h = t.hidden_size
        layer = f"{HF_TEXT}layers.{t.layer_types.index(FULL_ATTENTION)}."
        shapes.update(
            {
                "mtp.fc.weight": (h, 2 * h),
                "mtp.pre_fc_norm_embedding.weight": (h,),
                "mtp.pre_fc_norm_hidden.weight": (h,),
                "mtp.norm.weight": (h,),
            }
        )
        shapes.update(
            {
                "mtp.layers.0." + name[len(layer) :]: shape
                for name, shape in list(shapes.items())
                if name.startswith(layer)
            }
        )
    return shapes


def mtp_tensor_shapes(config: Qwen35VLConfig) -> dict[str, tuple[int, ...]]:
    """HF shapes of the `mtp.*` tensors alone."""
    return {k: v for k, v in hf_tensor_shapes(config).items() if k.startswith("mtp.")}


def split_fused_experts(
    hf_state: Mapping[str, Tensor], config: Qwen35VLConfig
) -> dict[str, Tensor]:
    """transformers' in-memory experts (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
    [E, H, I]) -> per-expert checkpoint tensors; other tensors pass through (as views)."""
    out: dict[str, Tensor] = {}
    for name, tensor in hf_state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, expert in enumerate(tensor):
                gate, up = expert.chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def shard_for_tensor_parallel(rule: WeightRule, tensor: Tensor, rank: int, size: int) -> Tensor:
    """The slice of a full megatron tensor that tensor-parallel rank `rank` of `size` holds;
    ValueError naming the tensor when `size` does not divide it."""
    if not 0 <= rank < size:
        raise ValueError(f"{rule.megatron}: rank {rank} is not in [0, {size})")
    if size == 1 or rule.tp == REPLICATED or rule.expert:
        return tensor
    dim = 0 if rule.tp == COLUMN else 1
    _check_divisible(rule, tensor.shape[dim], size)
    if rule.sections:
        pieces = torch.split(tensor, list(rule.sections), dim=dim)
        return torch.cat([piece.chunk(size, dim=dim)[rank] for piece in pieces], dim=dim)
    return tensor.chunk(size, dim=dim)[rank]


def _check_divisible(rule: WeightRule, extent: int, size: int) -> None:
    if rule.kind in ("attention_qkv", "qkv", "vision_qkv"):
        # Megatron splits a fused QKV by whole query groups, not by rows.
        groups = rule.heads[1]
        if groups % size:
            raise ValueError(
                f"{rule.megatron}: {groups} query groups do not split over TP size {size}"
            )
    for part in rule.sections or (extent,):
        if part % size:
            raise ValueError(
                f"{rule.megatron}: dimension {part} does not split over tensor-parallel size {size}"
            )

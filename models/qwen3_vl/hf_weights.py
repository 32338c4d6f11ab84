"""Hugging Face <-> megatron weight mapping for Qwen3-VL (dense and MoE), one rule per megatron
tensor. The megatron names are those of our megatron model (a HybridModel decoder with Transformer
Engine layers under `language_model.`, Qwen3.5's vision tower plus DeepStack mergers under
`vision.`). The rule class, the vision tower's rules and the TP split are Qwen3.5's
(`models/qwen35_vl/hf_weights.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from models.qwen35_vl.hf_weights import (
    COLUMN,
    HF_TEXT,
    HF_VISION,
    MEGATRON_TEXT,
    MEGATRON_VISION,
    ROW,
    WeightRule,
    check_names,
    dense_mlp_rules,
    merger_rules,
    routed_expert_rules,
    vision_rules,
)

from .configuration import Qwen3VLConfig

HF_LM_HEAD = "lm_head.weight"

# Layouts of the routed experts of an HF MoE state dict:
# "transformers": transformers' in-memory modules, `mlp.experts.gate_up_proj` [E, 2I, H] (gate
#   rows then up rows, concatenated, not interleaved) and `mlp.experts.down_proj` [E, H, I];
# "checkpoint": the released safetensors, same names transposed, [E, H, 2I] and [E, I, H]
#   (transformers' loader transposes them, see its conversion_mapping for qwen3_vl_moe);
# "per_expert": `mlp.experts.{e}.{gate,up,down}_proj.weight`, the names the rules use (one HF
#   tensor per megatron expert tensor, as Qwen3-MoE text checkpoints store them).
EXPERT_LAYOUTS = ("transformers", "checkpoint", "per_expert")


# ---- rules -----------------------------------------------------------------------------------


def _vision_rules(config: Qwen3VLConfig) -> Iterator[WeightRule]:
    """Qwen3.5's vision tower, then one merger per DeepStack level in an nn.ModuleList
    `vision.deepstack_mergers` (index k, not the block it reads); their LayerNorm spans the
    merged vector (hidden * merge^2), applied after the 2x2 merge."""
    yield from vision_rules(config)
    for k in range(len(config.vision.deepstack_visual_indexes)):
        yield from merger_rules(
            f"{MEGATRON_VISION}deepstack_mergers.{k}.", f"{HF_VISION}deepstack_merger_list.{k}."
        )


def _attention_rules(config: Qwen3VLConfig, meg: str, hf: str) -> Iterator[WeightRule]:
    """Self-attention of one decoder layer: TE's LayerNorm-fused linear_qkv (input_layernorm),
    per-head-dim RMSNorms on q and k (qk_layernorm=True), row-parallel linear_proj."""
    t = config.text
    attn = meg + "self_attention."
    heads = (t.num_attention_heads, t.num_key_value_heads, t.head_dim)
    yield WeightRule(attn + "linear_qkv.layer_norm_weight", (hf + "input_layernorm.weight",))
    yield WeightRule(
        attn + "linear_qkv.weight",
        tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
        COLUMN,
        heads=heads,
    )
    if t.attention_bias:
        # HF's attention_bias gives q/k/v and o biases (megatron: add_qkv_bias plus a bias on
        # linear_proj; none of the released models has them).
        yield WeightRule(
            attn + "linear_qkv.bias",
            tuple(f"{hf}self_attn.{p}_proj.bias" for p in "qkv"),
            "qkv",
            COLUMN,
            heads=heads,
        )
    yield WeightRule(attn + "q_layernorm.weight", (hf + "self_attn.q_norm.weight",))
    yield WeightRule(attn + "k_layernorm.weight", (hf + "self_attn.k_norm.weight",))
    yield WeightRule(attn + "linear_proj.weight", (hf + "self_attn.o_proj.weight",), tp=ROW)
    if t.attention_bias:
        yield WeightRule(attn + "linear_proj.bias", (hf + "self_attn.o_proj.bias",))


def _mlp_rules(config: Qwen3VLConfig, meg: str, hf: str, sparse: bool) -> Iterator[WeightRule]:
    """MLP half of one decoder layer: Qwen3.5's dense SwiGLU MLP or routed experts (Qwen3-VL has
    no shared expert)."""
    t = config.text
    if sparse:
        yield from routed_expert_rules(meg, hf, t.num_experts)
    else:
        yield from dense_mlp_rules(meg, hf, t.intermediate_size)


def _language_rules(config: Qwen3VLConfig) -> Iterator[WeightRule]:
    t = config.text
    # Vocab-parallel embedding: rows (tokens) are split over TP.
    yield WeightRule(
        MEGATRON_TEXT + "embedding.word_embeddings.weight",
        (HF_TEXT + "embed_tokens.weight",),
        tp=COLUMN,
    )
    # HF decoder layer i is two megatron hybrid layers: attention at 2i, its MLP or MoE at 2i + 1.
    for i, sparse in enumerate(t.sparse_layers):
        hf = f"{HF_TEXT}layers.{i}."
        yield from _attention_rules(config, f"{MEGATRON_TEXT}decoder.layers.{2 * i}.", hf)
        yield from _mlp_rules(config, f"{MEGATRON_TEXT}decoder.layers.{2 * i + 1}.", hf, sparse)
    yield WeightRule(MEGATRON_TEXT + "decoder.final_norm.weight", (HF_TEXT + "norm.weight",))
    if not t.tie_word_embeddings:
        # With tied embeddings megatron's output layer reuses word_embeddings (no tensor).
        yield WeightRule(MEGATRON_TEXT + "output_layer.weight", (HF_LM_HEAD,), tp=COLUMN)


def weight_rules(config: Qwen3VLConfig) -> list[WeightRule]:
    """Every megatron tensor of the model (TP=1, EP=1 names) with its HF source tensors."""
    return [*_vision_rules(config), *_language_rules(config)]


# ---- name checks and shapes ------------------------------------------------------------------


def hf_model_class(config: Qwen3VLConfig) -> type:
    """transformers' `Qwen3VLForConditionalGeneration` or its MoE counterpart."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    if config.text.is_moe:
        return Qwen3VLMoeForConditionalGeneration
    return Qwen3VLForConditionalGeneration


def hf_tensor_shapes(config: Qwen3VLConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the HF tensors the rules name (experts per expert; no `lm_head.weight` when
    tied, as checkpoints do not store it), from an HF model built on the meta device."""
    with torch.device("meta"):
        model = hf_model_class(config)(config.to_hf_config())
    state = _drop_tied_lm_head(model.state_dict(), config)
    return {name: tuple(t.shape) for name, t in split_fused_experts(state, config).items()}


def megatron_tensor_shapes(config: Qwen3VLConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the full (TP=1) megatron tensors, by applying the rules on the meta device."""
    hf_shapes = hf_tensor_shapes(config)
    shapes = {}
    for rule in weight_rules(config):
        inputs = [torch.empty(hf_shapes[name], device="meta") for name in rule.hf]
        shapes[rule.megatron] = tuple(rule.to_megatron(inputs).shape)
    return shapes


def _drop_tied_lm_head(hf_state: Mapping[str, Tensor], config: Qwen3VLConfig) -> dict[str, Tensor]:
    """transformers' state_dict() lists a tied lm_head under its own name too; drop it, after
    checking that it really is the embedding (a different tensor would be silently lost)."""
    state = dict(hf_state)
    if not config.text.tie_word_embeddings or HF_LM_HEAD not in state:
        return state
    head = state.pop(HF_LM_HEAD)
    embed = state.get(HF_TEXT + "embed_tokens.weight")
    if embed is None or head.device.type == "meta" or head.data_ptr() == embed.data_ptr():
        return state  # meta shapes, or the very same storage (a real tie)
    if head.shape != embed.shape or not torch.equal(head, embed):
        raise ValueError(
            f"config ties the embeddings but {HF_LM_HEAD} differs from "
            f"{HF_TEXT}embed_tokens.weight; use an untied config for this checkpoint"
        )
    return state


# ---- routed experts: fused <-> per expert ----------------------------------------------------


def _check_layout(layout: str) -> None:
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert layout {layout!r}; valid: {', '.join(EXPERT_LAYOUTS)}")


def _fused_shapes(config: Qwen3VLConfig, layout: str) -> dict[str, tuple[int, int, int]]:
    t = config.text
    e, i, h = t.num_experts, t.moe_intermediate_size, t.hidden_size
    if layout == "transformers":
        return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}
    return {"gate_up_proj": (e, h, 2 * i), "down_proj": (e, i, h)}


def split_fused_experts(
    hf_state: Mapping[str, Tensor], config: Qwen3VLConfig, layout: str = "transformers"
) -> dict[str, Tensor]:
    """Fused expert tensors (`layout` "transformers" or "checkpoint") -> the per-expert names the
    rules use; other tensors, per-expert ones included, pass through. Returns views."""
    _check_layout(layout)
    if layout == "per_expert":
        return dict(hf_state)
    shapes = _fused_shapes(config, layout)
    out: dict[str, Tensor] = {}
    for name, tensor in hf_state.items():
        kind = name.rsplit(".", 1)[-1]
        if not (name.startswith(HF_TEXT) and ".mlp.experts." in name and kind in shapes):
            out[name] = tensor
            continue
        if tuple(tensor.shape) != shapes[kind]:
            other = "checkpoint" if layout == "transformers" else "transformers"
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)} is not the {layout!r} expert layout "
                f"{shapes[kind]} of this config (the {other!r} layout is "
                f"{_fused_shapes(config, other)[kind]})"
            )
        prefix = name[: -len(kind)]
        # The "checkpoint" layout is the transpose (x @ W instead of W @ x) of transformers'.
        experts = tensor if layout == "transformers" else tensor.transpose(1, 2)
        for e, expert in enumerate(experts):
            if kind == "gate_up_proj":
                gate, up = expert.chunk(2, dim=0)  # concatenated: gate rows, then up rows
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
            else:
                out[f"{prefix}{e}.down_proj.weight"] = expert
    return out


def fuse_experts(
    hf_state: Mapping[str, Tensor], config: Qwen3VLConfig, layout: str = "transformers"
) -> dict[str, Tensor]:
    """Inverse of `split_fused_experts`: per-expert tensors -> fused `layout` tensors (new
    memory); other tensors pass through."""
    _check_layout(layout)
    state = dict(hf_state)
    if layout == "per_expert" or not config.text.is_moe:
        return state
    out: dict[str, Tensor] = {}
    for i, sparse in enumerate(config.text.sparse_layers):
        if not sparse:
            continue
        prefix = f"{HF_TEXT}layers.{i}.mlp.experts."
        experts = range(config.text.num_experts)
        gate_up = torch.stack(
            [
                torch.cat(
                    [
                        state.pop(f"{prefix}{e}.gate_proj.weight"),
                        state.pop(f"{prefix}{e}.up_proj.weight"),
                    ]
                )
                for e in experts
            ]
        )
        down = torch.stack([state.pop(f"{prefix}{e}.down_proj.weight") for e in experts])
        if layout == "checkpoint":
            gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        out[prefix + "gate_up_proj"] = gate_up
        out[prefix + "down_proj"] = down
    return {**state, **out}


# ---- conversion ------------------------------------------------------------------------------


def hf_to_megatron(
    hf_state: Mapping[str, Tensor], config: Qwen3VLConfig, expert_layout: str = "transformers"
) -> dict[str, Tensor]:
    """Full (TP=1) megatron state dict from an HF state dict whose fused experts (if any) are in
    `expert_layout` (per-expert names are accepted in any layout). A tied `lm_head.weight` equal
    to the embedding, as transformers' state_dict() lists it, is dropped."""
    state = split_fused_experts(_drop_tied_lm_head(hf_state, config), config, expert_layout)
    rules = weight_rules(config)
    expected = {name for rule in rules for name in rule.hf}
    check_names("HF state dict does not match the config", expected, set(state))
    return {rule.megatron: rule.to_megatron([state[n] for n in rule.hf]) for rule in rules}


def megatron_to_hf(
    megatron_state: Mapping[str, Tensor],
    config: Qwen3VLConfig,
    expert_layout: str = "transformers",
) -> dict[str, Tensor]:
    """HF state dict (experts in `expert_layout`, no `lm_head.weight` when tied) from a full
    (TP=1) megatron state dict; TE's `_extra_state` entries are ignored."""
    _check_layout(expert_layout)
    rules = weight_rules(config)
    weights = {k: v for k, v in megatron_state.items() if not k.endswith("_extra_state")}
    check_names(
        "megatron state dict does not match the config", {r.megatron for r in rules}, set(weights)
    )
    hf_shapes = hf_tensor_shapes(config)
    out: dict[str, Tensor] = {}
    for rule in rules:
        shapes = [hf_shapes[name] for name in rule.hf]
        out.update(zip(rule.hf, rule.to_hf(weights[rule.megatron], shapes), strict=True))
    return fuse_experts(out, config, expert_layout)

"""Qwen3.5-VL configuration: dataclasses mirroring the HF `qwen3_5` / `qwen3_5_moe` config fields,
the named variants (proxy, proxy-moe, 0.8b ... 397b), conversion from/to HF configs, the megatron
layer pattern and TransformerConfig fields, and exact parameter counts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


def interleaved_layer_types(num_layers: int, full_attention_interval: int = 4) -> tuple[str, ...]:
    """HF's default `layer_types`: every `full_attention_interval`-th layer is full attention."""
    return tuple(
        FULL_ATTENTION if (i + 1) % full_attention_interval == 0 else LINEAR_ATTENTION
        for i in range(num_layers)
    )


@dataclass(frozen=True)
class TextConfig:
    """Language model fields; names follow HF `Qwen3_5TextConfig` / `Qwen3_5MoeTextConfig`."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    linear_num_value_heads: int
    intermediate_size: int | None = None  # dense MLP width; None for MoE models
    vocab_size: int = 248320
    head_dim: int = 256
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    layer_types: tuple[str, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, int, int] = (11, 11, 10)
    mrope_interleaved: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    # Mixture of experts (num_experts == 0 means a dense MLP in every layer).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.001
    # Multi-token prediction layers shipped with the released checkpoints (HF drops them on load).
    mtp_num_hidden_layers: int = 1

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", interleaved_layer_types(self.num_hidden_layers))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION}
        if unknown:
            raise ValueError(f"unknown layer types {sorted(unknown)}")
        if self.is_moe == (self.intermediate_size is not None):
            raise ValueError("set exactly one of intermediate_size (dense) or num_experts (MoE)")
        if 2 * sum(self.mrope_section) != self.rotary_dim:
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} covers {2 * sum(self.mrope_section)} "
                f"rotary dims but head_dim {self.head_dim} x partial_rotary_factor "
                f"{self.partial_rotary_factor} = {self.rotary_dim}"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class VisionConfig:
    """Vision tower fields; names follow HF `Qwen3_5VisionConfig`."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 4096
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class Qwen35VLConfig:
    """A whole Qwen3.5-VL model: text + vision + the special token ids the model reads."""

    name: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    # Chat-template tokens of the released tokenizer (<|im_start|>, <|im_end|>, <|endoftext|>),
    # which synthetic conversations use.
    im_start_token_id: int = 248045
    im_end_token_id: int = 248046
    pad_token_id: int = 248044
    source: str = ""

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {self.vision.out_hidden_size} must equal the text "
                f"hidden_size {self.text.hidden_size}"
            )

    def with_token_ids(self, **token_ids: int) -> Qwen35VLConfig:
        """Copy with other special token ids (those of a local tokenizer)."""
        return dataclasses.replace(self, **token_ids)

    def with_mtp_layers(self, mtp_num_hidden_layers: int) -> Qwen35VLConfig:
        text = dataclasses.replace(self.text, mtp_num_hidden_layers=mtp_num_hidden_layers)
        return dataclasses.replace(self, text=text)

    # ---- megatron-core mapping -------------------------------------------------------------

    def hybrid_layer_pattern(self) -> str:
        """HybridModel pattern: each HF decoder layer is a mixer symbol followed by an MLP symbol
        (`G` Gated DeltaNet or `*` attention, then `-` dense MLP or `E` MoE); MTP depths follow
        `/` as one attention + MLP layer each, the released checkpoints' MTP layer."""
        mlp = "E" if self.text.is_moe else "-"
        main = "".join(("*" if t == FULL_ATTENTION else "G") + mlp for t in self.text.layer_types)
        mtp = "".join(f"/*{mlp}" for _ in range(self.text.mtp_num_hidden_layers))
        return main + mtp

    def language_transformer_fields(self) -> dict[str, Any]:
        """Architecture fields of the language `TransformerConfig` (parallelism, precision and
        fusions come from Megatron's arguments); with `spec.model_args` the one source of the
        architecture flags megatron is given (`arguments.architecture_argv`)."""
        import torch.nn.functional as F

        t = self.text
        fields: dict[str, Any] = dict(
            num_layers=2 * t.num_hidden_layers,
            hidden_size=t.hidden_size,
            num_attention_heads=t.num_attention_heads,
            num_query_groups=t.num_key_value_heads,
            kv_channels=t.head_dim,
            ffn_hidden_size=t.intermediate_size if not t.is_moe else t.moe_intermediate_size,
            normalization="RMSNorm",
            layernorm_epsilon=t.rms_norm_eps,
            layernorm_zero_centered_gamma=True,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            qk_layernorm=True,
            attention_output_gate=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            rotary_interleaved=False,
            mrope_section=list(t.mrope_section),
            linear_conv_kernel_dim=t.linear_conv_kernel_dim,
            linear_key_head_dim=t.linear_key_head_dim,
            linear_value_head_dim=t.linear_value_head_dim,
            linear_num_key_heads=t.linear_num_key_heads,
            linear_num_value_heads=t.linear_num_value_heads,
            is_hybrid_model=True,
            mtp_num_layers=t.mtp_num_hidden_layers or None,
        )
        if t.is_moe:
            fields.update(
                num_moe_experts=t.num_experts,
                moe_router_topk=t.num_experts_per_tok,
                moe_ffn_hidden_size=t.moe_intermediate_size,
                moe_shared_expert_intermediate_size=t.shared_expert_intermediate_size,
                moe_shared_expert_gate=True,
                moe_router_score_function="softmax",
                moe_router_pre_softmax=False,
                moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=t.router_aux_loss_coef,
                moe_grouped_gemm=True,
                moe_token_dispatcher_type="alltoall",
            )
        return fields

    def vision_transformer_fields(self) -> dict[str, Any]:
        """Architecture fields of the vision tower's `TransformerConfig`."""
        return vision_tower_fields(self.vision)

    def image_processor(self, min_pixels: int, max_pixels: int) -> Any:
        return qwen_vl_image_processor(self.vision, min_pixels, max_pixels)

    # ---- parameter counts (exact, equal to the HF model's without MTP) --------------------

    def parameter_counts(self) -> ParameterCounts:
        t, v = self.text, self.vision
        h = t.hidden_size
        attn = (
            h * t.num_attention_heads * t.head_dim * 2  # q_proj with the output gate rows
            + 2 * h * t.num_key_value_heads * t.head_dim  # k_proj, v_proj
            + t.num_attention_heads * t.head_dim * h  # o_proj
            + 2 * t.head_dim  # q_norm, k_norm
        )
        key_dim = t.linear_num_key_heads * t.linear_key_head_dim
        value_dim = t.linear_num_value_heads * t.linear_value_head_dim
        conv_dim = 2 * key_dim + value_dim
        gdn = (
            h * conv_dim  # in_proj_qkv
            + h * value_dim  # in_proj_z
            + 2 * h * t.linear_num_value_heads  # in_proj_b, in_proj_a
            + conv_dim * t.linear_conv_kernel_dim  # depthwise conv1d, no bias
            + 2 * t.linear_num_value_heads  # dt_bias, A_log
            + t.linear_value_head_dim  # gated RMSNorm
            + value_dim * h  # out_proj
        )
        expert = 3 * h * t.moe_intermediate_size
        if t.is_moe:
            mlp_total = (
                t.num_experts * expert
                + t.num_experts * h  # router
                + 3 * h * t.shared_expert_intermediate_size
                + h  # shared expert gate
            )
            mlp_inactive = (t.num_experts - t.num_experts_per_tok) * expert
        else:
            mlp_total = 3 * h * t.intermediate_size
            mlp_inactive = 0
        n_full = sum(1 for x in t.layer_types if x == FULL_ATTENTION)
        n_linear = t.num_hidden_layers - n_full
        layers = n_full * attn + n_linear * gdn + t.num_hidden_layers * (mlp_total + 2 * h)
        embeddings = t.vocab_size * h * (1 if t.tie_word_embeddings else 2)
        language = layers + embeddings + h  # + final norm

        vh = v.hidden_size
        merged = vh * v.spatial_merge_size**2
        block = (
            2 * 2 * vh  # two LayerNorms with bias
            + vh * 3 * vh
            + 3 * vh  # qkv
            + vh * vh
            + vh  # proj
            + vh * v.intermediate_size
            + v.intermediate_size
            + v.intermediate_size * vh
            + vh
        )
        vision = (
            v.in_channels * v.temporal_patch_size * v.patch_size**2 * vh
            + vh  # Conv3d
            + v.num_position_embeddings * vh
            + v.depth * block
            + 2 * vh  # merger LayerNorm
            + merged * merged
            + merged  # merger fc1
            + merged * v.out_hidden_size
            + v.out_hidden_size  # merger fc2
        )
        mtp_layer = attn + mlp_total + 2 * h
        mtp = t.mtp_num_hidden_layers * (mtp_layer + 2 * h * h + 3 * h)  # fc, 3 norms
        total = language + vision
        inactive = t.num_hidden_layers * mlp_inactive
        return ParameterCounts(
            total=total,
            active=total - inactive,
            language=language,
            vision=vision,
            mtp=mtp,
            mtp_active=mtp - t.mtp_num_hidden_layers * mlp_inactive,
            routed_experts=(t.num_hidden_layers + t.mtp_num_hidden_layers) * t.num_experts * expert,
            embeddings=embeddings,
        )

    # ---- Hugging Face interop --------------------------------------------------------------

    def to_hf_config(self, **overrides: Any):
        """The equivalent `transformers` config (`Qwen3_5Config` or `Qwen3_5MoeConfig`)."""
        from transformers import Qwen3_5Config, Qwen3_5MoeConfig

        t, v = self.text, self.vision
        text: dict[str, Any] = dict(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            head_dim=t.head_dim,
            linear_num_key_heads=t.linear_num_key_heads,
            linear_num_value_heads=t.linear_num_value_heads,
            linear_key_head_dim=t.linear_key_head_dim,
            linear_value_head_dim=t.linear_value_head_dim,
            linear_conv_kernel_dim=t.linear_conv_kernel_dim,
            layer_types=list(t.layer_types),
            rms_norm_eps=t.rms_norm_eps,
            tie_word_embeddings=t.tie_word_embeddings,
            max_position_embeddings=t.max_position_embeddings,
            mtp_num_hidden_layers=t.mtp_num_hidden_layers,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=t.rope_theta,
                partial_rotary_factor=t.partial_rotary_factor,
                mrope_section=list(t.mrope_section),
                mrope_interleaved=t.mrope_interleaved,
            ),
        )
        if t.is_moe:
            text.update(
                num_experts=t.num_experts,
                num_experts_per_tok=t.num_experts_per_tok,
                moe_intermediate_size=t.moe_intermediate_size,
                shared_expert_intermediate_size=t.shared_expert_intermediate_size,
                router_aux_loss_coef=t.router_aux_loss_coef,
            )
        else:
            text.update(intermediate_size=t.intermediate_size)
        vision = dict(
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            out_hidden_size=v.out_hidden_size,
            in_channels=v.in_channels,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            num_position_embeddings=v.num_position_embeddings,
            hidden_act=v.hidden_act,
        )
        config_cls = Qwen3_5MoeConfig if t.is_moe else Qwen3_5Config
        return config_cls(
            text_config=text,
            vision_config=vision,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=t.tie_word_embeddings,
            **overrides,
        )


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts; `total`/`active` match the HF model (which has no MTP weights)."""

    total: int
    active: int
    language: int
    vision: int
    mtp: int = 0
    mtp_active: int = 0
    routed_experts: int = 0  # routed expert weights, MTP layers included (sharded by EP)
    embeddings: int = 0  # input embedding + untied output layer


def gelu_tanh(x):
    """HF's `gelu_pytorch_tanh`, the vision MLP activation."""
    import torch.nn.functional as F

    return F.gelu(x, approximate="tanh")


def qwen_vl_image_processor(vision: VisionConfig, min_pixels: int, max_pixels: int) -> Any:
    """HF's Qwen2-VL image processor (PIL backend), which the Qwen3-VL and Qwen3.5 releases use,
    with the tower's patch geometry: images resized within [min_pixels, max_pixels] to multiples
    of patch x merge, normalised to [-1, 1], cut into flattened patches."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )


def vision_tower_fields(v: VisionConfig) -> dict[str, Any]:
    """Architecture fields of the vision tower's `TransformerConfig` (pre-norm ViT blocks with
    biases, LayerNorm, tanh-GELU MLP); Qwen3-VL's tower has the same blocks."""
    return dict(
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads,
        kv_channels=v.head_dim,
        ffn_hidden_size=v.intermediate_size,
        normalization="LayerNorm",
        layernorm_epsilon=1e-6,
        layernorm_zero_centered_gamma=False,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        add_bias_linear=True,
        add_qkv_bias=True,
        qk_layernorm=False,
        attention_output_gate=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_interleaved=False,
    )


def _rope_value(rope: dict[str, Any], hf_text: Any, key: str, default: Any) -> Any:
    if key in rope and rope[key] is not None:
        return rope[key]
    return getattr(hf_text, key, default)


def from_hf_config(hf_config: Any, name: str = "hf") -> Qwen35VLConfig:
    """Build our config from a `transformers` Qwen3.5 / Qwen3.5-MoE config object or dict."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(hf_config, dict):
        hf_config = AutoConfig.for_model(**hf_config)
    if not isinstance(hf_config, PretrainedConfig) or hf_config.model_type not in (
        "qwen3_5",
        "qwen3_5_moe",
    ):
        model_type = getattr(hf_config, "model_type", type(hf_config).__name__)
        raise ValueError(
            f"expected a Qwen3.5 or Qwen3.5-MoE config (model_type qwen3_5 / qwen3_5_moe), got "
            f"{model_type!r}"
        )
    ht, hv = hf_config.text_config, hf_config.vision_config
    rope = dict(getattr(ht, "rope_parameters", None) or {})
    is_moe = hf_config.model_type == "qwen3_5_moe"
    text = TextConfig(
        vocab_size=ht.vocab_size,
        hidden_size=ht.hidden_size,
        num_hidden_layers=ht.num_hidden_layers,
        num_attention_heads=ht.num_attention_heads,
        num_key_value_heads=ht.num_key_value_heads,
        head_dim=ht.head_dim,
        intermediate_size=None if is_moe else ht.intermediate_size,
        linear_num_key_heads=ht.linear_num_key_heads,
        linear_num_value_heads=ht.linear_num_value_heads,
        linear_key_head_dim=ht.linear_key_head_dim,
        linear_value_head_dim=ht.linear_value_head_dim,
        linear_conv_kernel_dim=ht.linear_conv_kernel_dim,
        layer_types=tuple(ht.layer_types),
        rms_norm_eps=ht.rms_norm_eps,
        rope_theta=float(_rope_value(rope, ht, "rope_theta", 10_000_000.0)),
        partial_rotary_factor=float(_rope_value(rope, ht, "partial_rotary_factor", 0.25)),
        mrope_section=tuple(_rope_value(rope, ht, "mrope_section", (11, 11, 10))),
        mrope_interleaved=bool(_rope_value(rope, ht, "mrope_interleaved", True)),
        tie_word_embeddings=bool(
            getattr(hf_config, "tie_word_embeddings", False) or ht.tie_word_embeddings
        ),
        max_position_embeddings=ht.max_position_embeddings,
        num_experts=ht.num_experts if is_moe else 0,
        num_experts_per_tok=ht.num_experts_per_tok if is_moe else 0,
        moe_intermediate_size=ht.moe_intermediate_size if is_moe else 0,
        shared_expert_intermediate_size=ht.shared_expert_intermediate_size if is_moe else 0,
        router_aux_loss_coef=getattr(ht, "router_aux_loss_coef", 0.001),
        mtp_num_hidden_layers=int(getattr(ht, "mtp_num_hidden_layers", 0) or 0),
    )
    vision = VisionConfig(
        depth=hv.depth,
        hidden_size=hv.hidden_size,
        intermediate_size=hv.intermediate_size,
        num_heads=hv.num_heads,
        out_hidden_size=hv.out_hidden_size,
        in_channels=hv.in_channels,
        patch_size=hv.patch_size,
        temporal_patch_size=hv.temporal_patch_size,
        spatial_merge_size=hv.spatial_merge_size,
        num_position_embeddings=hv.num_position_embeddings,
        hidden_act=hv.hidden_act,
    )
    return Qwen35VLConfig(
        name=name,
        text=text,
        vision=vision,
        image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id,
        vision_end_token_id=hf_config.vision_end_token_id,
        source="from_hf_config",
    )


def _vision(depth: int, hidden: int, ffn: int, heads: int, out: int) -> VisionConfig:
    return VisionConfig(
        depth=depth, hidden_size=hidden, intermediate_size=ffn, num_heads=heads, out_hidden_size=out
    )


_LARGE_VISION = dict(depth=27, hidden=1152, ffn=4304, heads=16)

_HF = "Hugging Face Hub config.json of"

VARIANTS: dict[str, Qwen35VLConfig] = {
    # Tiny proxies: the full 3:1 Gated DeltaNet / attention pattern and head_dim 256 (so the
    # MRoPE section layout is the real one) at small widths; real vocabulary and token ids.
    "proxy": Qwen35VLConfig(
        name="proxy",
        text=TextConfig(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=1024,
            linear_num_key_heads=4,
            linear_num_value_heads=8,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            tie_word_embeddings=True,
        ),
        vision=_vision(depth=2, hidden=256, ffn=512, heads=4, out=512),
        source="playground proxy (not a released model)",
    ),
    "proxy-moe": Qwen35VLConfig(
        name="proxy-moe",
        text=TextConfig(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            linear_num_key_heads=4,
            linear_num_value_heads=8,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
        ),
        vision=_vision(depth=2, hidden=256, ffn=512, heads=4, out=512),
        source="playground proxy with the 397b MoE structure (not a released model)",
    ),
    "0.8b": Qwen35VLConfig(
        name="0.8b",
        text=TextConfig(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=3584,
            linear_num_value_heads=16,
            tie_word_embeddings=True,
        ),
        vision=_vision(depth=12, hidden=768, ffn=3072, heads=12, out=1024),
        source=f"{_HF} Qwen/Qwen3.5-0.8B",
    ),
    "2b": Qwen35VLConfig(
        name="2b",
        text=TextConfig(
            hidden_size=2048,
            num_hidden_layers=24,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=6144,
            linear_num_value_heads=16,
            tie_word_embeddings=True,
        ),
        vision=_vision(depth=24, hidden=1024, ffn=4096, heads=16, out=2048),
        source=f"{_HF} Qwen/Qwen3.5-2B",
    ),
    "4b": Qwen35VLConfig(
        name="4b",
        text=TextConfig(
            hidden_size=2560,
            num_hidden_layers=32,
            num_attention_heads=16,
            num_key_value_heads=4,
            intermediate_size=9216,
            linear_num_value_heads=32,
            tie_word_embeddings=True,
        ),
        vision=_vision(depth=24, hidden=1024, ffn=4096, heads=16, out=2560),
        source=f"{_HF} Qwen/Qwen3.5-4B",
    ),
    "9b": Qwen35VLConfig(
        name="9b",
        text=TextConfig(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=16,
            num_key_value_heads=4,
            intermediate_size=12288,
            linear_num_value_heads=32,
        ),
        vision=_vision(**_LARGE_VISION, out=4096),
        source=f"{_HF} Qwen/Qwen3.5-9B",
    ),
    "27b": Qwen35VLConfig(
        name="27b",
        text=TextConfig(
            hidden_size=5120,
            num_hidden_layers=64,
            num_attention_heads=24,
            num_key_value_heads=4,
            intermediate_size=17408,
            linear_num_value_heads=48,
        ),
        vision=_vision(**_LARGE_VISION, out=5120),
        source=f"{_HF} Qwen/Qwen3.5-27B",
    ),
    "35b_a3b": Qwen35VLConfig(
        name="35b_a3b",
        text=TextConfig(
            hidden_size=2048,
            num_hidden_layers=40,
            num_attention_heads=16,
            num_key_value_heads=2,
            linear_num_value_heads=32,
            num_experts=256,
            num_experts_per_tok=8,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
        ),
        vision=_vision(**_LARGE_VISION, out=2048),
        source=f"{_HF} Qwen/Qwen3.5-35B-A3B",
    ),
    "122b_a10b": Qwen35VLConfig(
        name="122b_a10b",
        text=TextConfig(
            hidden_size=3072,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=2,
            linear_num_value_heads=64,
            num_experts=256,
            num_experts_per_tok=8,
            moe_intermediate_size=1024,
            shared_expert_intermediate_size=1024,
        ),
        vision=_vision(**_LARGE_VISION, out=3072),
        source=f"{_HF} Qwen/Qwen3.5-122B-A10B",
    ),
    "397b": Qwen35VLConfig(
        name="397b",
        text=TextConfig(
            hidden_size=4096,
            num_hidden_layers=60,
            num_attention_heads=32,
            num_key_value_heads=2,
            linear_num_value_heads=64,
            num_experts=512,
            num_experts_per_tok=10,
            moe_intermediate_size=1024,
            shared_expert_intermediate_size=1024,
        ),
        vision=_vision(**_LARGE_VISION, out=4096),
        source=f"{_HF} Qwen/Qwen3.5-397B-A17B",
    ),
}

VARIANT_ALIASES: dict[str, str] = {"397b_a17b": "397b"}


def get_variant(name: str) -> Qwen35VLConfig:
    """Look up a variant by name or alias; the error lists every valid name."""
    key = VARIANT_ALIASES.get(name, name)
    if key not in VARIANTS:
        valid = sorted([*VARIANTS, *VARIANT_ALIASES])
        raise ValueError(f"unknown Qwen3.5-VL variant {name!r}; valid variants: {', '.join(valid)}")
    return VARIANTS[key]


def human_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    if n == 0:
        return "0"
    exponent = min(int(math.log10(abs(n)) // 3), 4)
    suffix = ["", "K", "M", "B", "T"][exponent]
    return f"{n / 10 ** (3 * exponent):.3g}{suffix}"

"""Qwen3-VL configuration: frozen dataclasses mirroring the HF `qwen3_vl` / `qwen3_vl_moe` config
fields, the released sizes (2b ... 235b_a22b) plus tiny proxies, validation that names the bad
field, conversion from/to HF configs and exact parameter counts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Quoted as a valid value when a size field is not positive (the released 8B's settings).
_EXAMPLE_VALUES: dict[str, int | float] = dict(
    hidden_size=4096,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=12288,
    vocab_size=151936,
    head_dim=128,
    rope_theta=5_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=262144,
    decoder_sparse_step=1,
    depth=27,
    num_heads=16,
    out_hidden_size=4096,
    in_channels=3,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=2304,
)


def _require_positive(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(owner, name)
        if not value > 0:
            raise ValueError(
                f"{type(owner).__name__}.{name} must be positive, got {value!r} "
                f"(e.g. {_EXAMPLE_VALUES[name]})"
            )


def _mrope_section_for(num_frequencies: int) -> tuple[int, int, int]:
    """A valid (t, h, w) split of `num_frequencies`; the released (24, 20, 20) for 64."""
    spatial = 5 * num_frequencies // 16
    return (num_frequencies - 2 * spatial, spatial, spatial)


@dataclass(frozen=True)
class TextConfig:
    """Language model fields; names follow HF `Qwen3VLTextConfig` / `Qwen3VLMoeTextConfig`."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # Dense MLP width: every layer of a dense model and the dense layers of an MoE model (the
    # released MoE configs carry one although all their layers are sparse).
    intermediate_size: int
    vocab_size: int = 151936
    head_dim: int = 128
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    hidden_act: str = "silu"
    # Mixture of experts (num_experts == 0 means a dense model). Layer i is sparse when
    # (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers, as in HF.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        # HF configs hold lists; tuples keep the dataclass hashable and comparable.
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        _require_positive(
            self,
            (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
                "head_dim",
                "rope_theta",
                "rms_norm_eps",
                "max_position_embeddings",
                "decoder_sparse_step",
            ),
        )
        if self.num_attention_heads % self.num_key_value_heads:
            heads = self.num_attention_heads
            divisor = max(d for d in range(1, self.num_key_value_heads) if heads % d == 0)
            raise ValueError(
                f"TextConfig.num_key_value_heads {self.num_key_value_heads} must divide "
                f"num_attention_heads {self.num_attention_heads} (e.g. {divisor})"
            )
        if self.head_dim % 2:
            raise ValueError(f"TextConfig.head_dim must be even for RoPE, got {self.head_dim}")
        num_frequencies = self.head_dim // 2
        section = self.mrope_section
        if len(section) != 3 or min(section) < 0 or sum(section) != num_frequencies:
            example = list(_mrope_section_for(num_frequencies))
            raise ValueError(
                f"TextConfig.mrope_section {list(section)} must be 3 non-negative sizes summing "
                f"to head_dim / 2 = {num_frequencies} (e.g. {example})"
            )
        if not self.mrope_interleaved:
            raise ValueError(
                "TextConfig.mrope_interleaved must be True: HF Qwen3-VL always interleaves the "
                "t/h/w rotary frequencies"
            )
        if self.hidden_act != "silu":
            raise ValueError(
                f"TextConfig.hidden_act must be 'silu' (the SwiGLU MLP), got {self.hidden_act!r}"
            )
        self._check_experts()

    def _check_experts(self) -> None:
        if self.num_experts < 0:
            raise ValueError(
                f"TextConfig.num_experts must be >= 0, got {self.num_experts} (0 for a dense "
                "model, e.g. 128 for MoE)"
            )
        if not self.is_moe:
            for name in ("num_experts_per_tok", "moe_intermediate_size", "mlp_only_layers"):
                if getattr(self, name):
                    raise ValueError(
                        f"TextConfig.{name} is {getattr(self, name)!r} but num_experts is 0 (a "
                        f"dense model): leave {name} unset or set num_experts > 0 (e.g. 128)"
                    )
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"TextConfig.num_experts_per_tok must be in [1, num_experts = {self.num_experts}], "
                f"got {self.num_experts_per_tok} (e.g. {min(8, self.num_experts)})"
            )
        if self.moe_intermediate_size <= 0:
            raise ValueError(
                f"TextConfig.moe_intermediate_size must be positive for an MoE model, got "
                f"{self.moe_intermediate_size} (e.g. 768)"
            )
        layers = self.mlp_only_layers
        if len(set(layers)) != len(layers) or any(
            not 0 <= i < self.num_hidden_layers for i in layers
        ):
            raise ValueError(
                f"TextConfig.mlp_only_layers {list(layers)} must be distinct layer indexes in "
                f"[0, {self.num_hidden_layers}) (e.g. [] for all layers sparse)"
            )
        if not self.norm_topk_prob:
            raise ValueError(
                "TextConfig.norm_topk_prob must be True: HF Qwen3-VL-MoE always renormalizes the "
                "top-k router weights"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head: all of them (Qwen3-VL has no partial rotary)."""
        return self.head_dim

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per decoder layer: True where the MLP is the routed experts, False for a dense MLP."""
        return tuple(
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_hidden_layers)
        )


@dataclass(frozen=True)
class VisionConfig:
    """Vision tower fields; names follow HF `Qwen3VLVisionConfig`. The defaults are the 27-block
    tower of the 8B and larger models."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 4096
    # Blocks whose outputs (through their own patch merger) are added to the first
    # len(deepstack_visual_indexes) decoder layers' hidden states at the visual tokens.
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10_000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "deepstack_visual_indexes", tuple(self.deepstack_visual_indexes))
        _require_positive(
            self,
            (
                "depth",
                "hidden_size",
                "intermediate_size",
                "num_heads",
                "out_hidden_size",
                "in_channels",
                "patch_size",
                "temporal_patch_size",
                "spatial_merge_size",
                "num_position_embeddings",
            ),
        )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VisionConfig.num_heads {self.num_heads} must divide hidden_size "
                f"{self.hidden_size} (e.g. 16 for hidden_size 1152)"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"VisionConfig head_dim = hidden_size / num_heads = {self.head_dim} must be a "
                "multiple of 4 (the 2D rotary embedding splits it into h and w halves of "
                "cos/sin pairs), e.g. hidden_size 1152 with num_heads 16"
            )
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(
                f"VisionConfig.num_position_embeddings {self.num_position_embeddings} must be a "
                f"square (a side x side grid), e.g. {max(side, 1) ** 2}"
            )
        indexes = self.deepstack_visual_indexes
        if any(i < 0 or i >= self.depth for i in indexes) or list(indexes) != sorted(set(indexes)):
            raise ValueError(
                f"VisionConfig.deepstack_visual_indexes {list(indexes)} must be increasing block "
                f"indexes in [0, depth = {self.depth}) (e.g. [8, 16, 24] for depth 27)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ParameterCounts:
    """Exact parameter counts, equal to the HF model's (tied embeddings counted once)."""

    total: int
    active: int  # per token: only num_experts_per_tok routed experts of each sparse layer
    language: int
    vision: int
    embeddings: int  # input embedding + untied output layer
    routed_experts: int  # all routed expert weights (the part expert parallelism shards)


@dataclass(frozen=True)
class Qwen3VLConfig:
    """A whole Qwen3-VL model: text + vision + the special token ids the model reads."""

    name: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Chat-template tokens of the released tokenizer (<|im_start|>, <|im_end|>, <|endoftext|>),
    # which synthetic conversations use.
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    pad_token_id: int = 151643
    source: str = ""

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"VisionConfig.out_hidden_size {self.vision.out_hidden_size} must equal the text "
                f"hidden_size {self.text.hidden_size}"
            )
        if len(self.vision.deepstack_visual_indexes) > self.text.num_hidden_layers:
            raise ValueError(
                f"VisionConfig.deepstack_visual_indexes has "
                f"{len(self.vision.deepstack_visual_indexes)} entries but the text model has only "
                f"{self.text.num_hidden_layers} layers to add them to (use at most "
                f"{self.text.num_hidden_layers})"
            )
        token_ids = {
            name: getattr(self, name)
            for name in (
                "image_token_id",
                "video_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
            )
        }
        for name, token in token_ids.items():
            if not 0 <= token < self.text.vocab_size:
                raise ValueError(
                    f"Qwen3VLConfig.{name} {token} must be a token of the vocabulary "
                    f"[0, {self.text.vocab_size}) (e.g. the released {name} "
                    f"{getattr(Qwen3VLConfig, name)})"
                )
        if len(set(token_ids.values())) != len(token_ids):
            raise ValueError(f"Qwen3VLConfig special token ids must be distinct, got {token_ids}")

    def with_token_ids(self, **token_ids: int) -> Qwen3VLConfig:
        """Copy with other special token ids (those of a local tokenizer)."""
        return dataclasses.replace(self, **token_ids)

    def with_mtp_layers(self, mtp_num_hidden_layers: int) -> Qwen3VLConfig:
        if mtp_num_hidden_layers:
            raise ValueError(
                f"Qwen3-VL has no multi-token-prediction layers, but {mtp_num_hidden_layers} were "
                "asked for; set MTP_NUM_LAYERS=0 or leave it unset (--mtp-num-layers)"
            )
        return self

    # ---- megatron-core mapping -------------------------------------------------------------

    def hybrid_layer_pattern(self) -> str:
        """HybridModel pattern: each HF decoder layer is attention `*` followed by its dense MLP
        `-` or routed experts `E`."""
        return "".join("*E" if sparse else "*-" for sparse in self.text.sparse_layers)

    def language_transformer_fields(self) -> dict[str, Any]:
        """Architecture fields of the language `TransformerConfig`; with `spec.model_args` the
        one source of the architecture flags megatron is given."""
        import torch.nn.functional as F

        t = self.text
        if t.attention_bias:
            raise ValueError(
                "TextConfig.attention_bias is not supported: megatron's add_bias_linear would add "
                "biases to the MLPs too (no released Qwen3-VL has attention biases)"
            )
        fields: dict[str, Any] = dict(
            num_layers=2 * t.num_hidden_layers,
            hidden_size=t.hidden_size,
            num_attention_heads=t.num_attention_heads,
            num_query_groups=t.num_key_value_heads,
            kv_channels=t.head_dim,
            ffn_hidden_size=t.intermediate_size,
            normalization="RMSNorm",
            layernorm_epsilon=t.rms_norm_eps,
            layernorm_zero_centered_gamma=False,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            qk_layernorm=True,
            attention_output_gate=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            rotary_interleaved=False,
            mrope_section=list(t.mrope_section),
            is_hybrid_model=True,
        )
        if t.is_moe:
            fields.update(
                num_moe_experts=t.num_experts,
                moe_router_topk=t.num_experts_per_tok,
                moe_ffn_hidden_size=t.moe_intermediate_size,
                # Softmax over the top-k logits = HF's softmax, top-k, renormalised weights.
                moe_router_score_function="softmax",
                moe_router_pre_softmax=False,
                moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=t.router_aux_loss_coef,
                moe_grouped_gemm=True,
                moe_token_dispatcher_type="alltoall",
            )
        return fields

    def vision_transformer_fields(self) -> dict[str, Any]:
        """Architecture fields of the vision tower's `TransformerConfig`: Qwen3.5's blocks."""
        from models.qwen35_vl.configuration import vision_tower_fields

        return vision_tower_fields(self.vision)

    def image_processor(self, min_pixels: int, max_pixels: int) -> Any:
        """HF's Qwen2-VL image processor with this tower's patch geometry (Qwen3.5's too)."""
        from models.qwen35_vl.configuration import qwen_vl_image_processor

        return qwen_vl_image_processor(self.vision, min_pixels, max_pixels)

    # ---- parameter counts (by formula, equal to the HF model's) ----------------------------

    def parameter_counts(self) -> ParameterCounts:
        """Counts by formula; tests check them against HF models built on the meta device."""
        t, v = self.text, self.vision
        h = t.hidden_size
        q_width = t.num_attention_heads * t.head_dim
        kv_width = t.num_key_value_heads * t.head_dim
        attention = (
            h * q_width  # q_proj
            + 2 * h * kv_width  # k_proj, v_proj
            + q_width * h  # o_proj
            + 2 * t.head_dim  # q_norm, k_norm (per head dim)
        )
        if t.attention_bias:
            attention += q_width + 2 * kv_width + h
        dense_mlp = 3 * h * t.intermediate_size  # gate, up, down
        expert = 3 * h * t.moe_intermediate_size
        sparse_mlp = t.num_experts * expert + t.num_experts * h  # experts + router
        num_sparse = sum(t.sparse_layers)
        num_dense = t.num_hidden_layers - num_sparse
        layers = t.num_hidden_layers * (attention + 2 * h) + num_dense * dense_mlp
        layers += num_sparse * sparse_mlp
        embeddings = t.vocab_size * h * (1 if t.tie_word_embeddings else 2)
        language = layers + embeddings + h  # + final norm

        vh = v.hidden_size
        merged = vh * v.spatial_merge_size**2

        def merger(norm_width: int) -> int:
            fc1 = merged * merged + merged
            fc2 = merged * v.out_hidden_size + v.out_hidden_size
            return 2 * norm_width + fc1 + fc2  # LayerNorm with bias, then the two linears

        block = (
            2 * 2 * vh  # two LayerNorms with bias
            + vh * 3 * vh
            + 3 * vh  # qkv
            + vh * vh
            + vh  # proj
            + 2 * vh * v.intermediate_size
            + v.intermediate_size
            + vh  # fc1, fc2
        )
        vision = (
            v.in_channels * v.temporal_patch_size * v.patch_size**2 * vh
            + vh  # Conv3d patch embedding
            + v.num_position_embeddings * vh
            + v.depth * block
            + merger(vh)  # final merger: LayerNorm on each patch, before merging
            + len(v.deepstack_visual_indexes) * merger(merged)  # LayerNorm on the merged vector
        )
        routed = num_sparse * t.num_experts * expert
        inactive = num_sparse * (t.num_experts - t.num_experts_per_tok) * expert
        total = language + vision
        return ParameterCounts(
            total=total,
            active=total - inactive,
            language=language,
            vision=vision,
            embeddings=embeddings,
            routed_experts=routed,
        )

    # ---- Hugging Face interop --------------------------------------------------------------

    def to_hf_config(self, **overrides: Any):
        """The equivalent `transformers` config (`Qwen3VLConfig` or `Qwen3VLMoeConfig`)."""
        from transformers import Qwen3VLConfig as HFQwen3VLConfig
        from transformers import Qwen3VLMoeConfig as HFQwen3VLMoeConfig

        t, v = self.text, self.vision
        text: dict[str, Any] = dict(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            head_dim=t.head_dim,
            hidden_act=t.hidden_act,
            max_position_embeddings=t.max_position_embeddings,
            rms_norm_eps=t.rms_norm_eps,
            attention_bias=t.attention_bias,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=t.rope_theta,
                mrope_section=list(t.mrope_section),
                mrope_interleaved=t.mrope_interleaved,
            ),
        )
        if t.is_moe:
            text.update(
                num_experts=t.num_experts,
                num_experts_per_tok=t.num_experts_per_tok,
                moe_intermediate_size=t.moe_intermediate_size,
                decoder_sparse_step=t.decoder_sparse_step,
                mlp_only_layers=list(t.mlp_only_layers),
                norm_topk_prob=t.norm_topk_prob,
                router_aux_loss_coef=t.router_aux_loss_coef,
                # HF reads the top-level flag; keep the text one consistent with it.
                tie_word_embeddings=t.tie_word_embeddings,
            )
        vision = dict(
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            out_hidden_size=v.out_hidden_size,
            deepstack_visual_indexes=list(v.deepstack_visual_indexes),
            in_channels=v.in_channels,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            num_position_embeddings=v.num_position_embeddings,
            hidden_act=v.hidden_act,
            rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta),
        )
        config_cls = HFQwen3VLMoeConfig if t.is_moe else HFQwen3VLConfig
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


_HF_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


def _rope_value(hf_config: Any, key: str, default: Any) -> Any:
    """A rope setting from `rope_parameters` (transformers 5), else the legacy attribute."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get(key) is not None:
        return rope[key]
    value = getattr(hf_config, key, None)
    return default if value is None else value


def from_hf_config(hf_config: Any, name: str = "hf") -> Qwen3VLConfig:
    """Build our config from a `transformers` Qwen3-VL / Qwen3-VL-MoE config object or a
    config.json dict (legacy `rope_scaling` / `rope_theta` keys included)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(hf_config, dict):
        hf_config = AutoConfig.for_model(**hf_config)
    model_type = getattr(hf_config, "model_type", type(hf_config).__name__)
    if not isinstance(hf_config, PretrainedConfig) or model_type not in _HF_MODEL_TYPES:
        raise ValueError(
            f"expected a Qwen3-VL or Qwen3-VL-MoE config (model_type qwen3_vl / qwen3_vl_moe), "
            f"got {model_type!r}"
        )
    ht, hv = hf_config.text_config, hf_config.vision_config
    is_moe = model_type == "qwen3_vl_moe"
    moe: dict[str, Any] = {}
    if is_moe:
        moe = dict(
            num_experts=ht.num_experts,
            num_experts_per_tok=ht.num_experts_per_tok,
            moe_intermediate_size=ht.moe_intermediate_size,
            decoder_sparse_step=ht.decoder_sparse_step,
            mlp_only_layers=tuple(ht.mlp_only_layers or ()),
            norm_topk_prob=bool(getattr(ht, "norm_topk_prob", True)),
            router_aux_loss_coef=ht.router_aux_loss_coef,
        )
    text = TextConfig(
        vocab_size=ht.vocab_size,
        hidden_size=ht.hidden_size,
        intermediate_size=ht.intermediate_size,
        num_hidden_layers=ht.num_hidden_layers,
        num_attention_heads=ht.num_attention_heads,
        num_key_value_heads=ht.num_key_value_heads,
        head_dim=ht.head_dim or ht.hidden_size // ht.num_attention_heads,
        hidden_act=ht.hidden_act,
        max_position_embeddings=ht.max_position_embeddings,
        rms_norm_eps=ht.rms_norm_eps,
        attention_bias=ht.attention_bias,
        rope_theta=float(_rope_value(ht, "rope_theta", 5_000_000.0)),
        # HF's text rotary falls back to [24, 20, 20] and always interleaves.
        mrope_section=tuple(_rope_value(ht, "mrope_section", (24, 20, 20))),
        mrope_interleaved=bool(_rope_value(ht, "mrope_interleaved", True)),
        # The model ties lm_head by the top-level flag (the MoE text config's own defaults True).
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        **moe,
    )
    vision = VisionConfig(
        depth=hv.depth,
        hidden_size=hv.hidden_size,
        intermediate_size=hv.intermediate_size,
        num_heads=hv.num_heads,
        out_hidden_size=hv.out_hidden_size,
        deepstack_visual_indexes=tuple(hv.deepstack_visual_indexes),
        in_channels=hv.in_channels,
        patch_size=hv.patch_size,
        temporal_patch_size=hv.temporal_patch_size,
        spatial_merge_size=hv.spatial_merge_size,
        num_position_embeddings=hv.num_position_embeddings,
        hidden_act=hv.hidden_act,
        rope_theta=float(_rope_value(hv, "rope_theta", 10_000.0)),
    )
    return Qwen3VLConfig(
        name=name,
        text=text,
        vision=vision,
        image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id,
        vision_end_token_id=hf_config.vision_end_token_id,
        source="from_hf_config",
    )


def _small_vision(out_hidden_size: int) -> VisionConfig:
    """The 24-block tower of the 2B and 4B models."""
    return VisionConfig(
        depth=24,
        hidden_size=1024,
        intermediate_size=4096,
        num_heads=16,
        out_hidden_size=out_hidden_size,
        deepstack_visual_indexes=(5, 11, 17),
    )


def _large_vision(out_hidden_size: int) -> VisionConfig:
    """The 27-block tower of the 8B, 32B and MoE models (the VisionConfig defaults)."""
    return VisionConfig(out_hidden_size=out_hidden_size)


# The proxies' vision tower: 4 blocks, three of them feeding DeepStack levels like the releases.
_PROXY_VISION = VisionConfig(
    depth=4,
    hidden_size=256,
    intermediate_size=1024,
    num_heads=4,
    out_hidden_size=512,
    deepstack_visual_indexes=(0, 1, 2),
)

_HF = "Hugging Face Hub config.json of"

VARIANTS: dict[str, Qwen3VLConfig] = {
    # Tiny proxies (not released models): head_dim 128 so the MRoPE section layout is the real
    # one, three DeepStack levels like the releases, the real vocabulary and token ids, tied
    # embeddings so the vocabulary does not dominate (about 0.11B parameters each).
    "proxy": Qwen3VLConfig(
        name="proxy",
        text=TextConfig(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=1536,
            tie_word_embeddings=True,
        ),
        vision=_PROXY_VISION,
        source="playground proxy (not a released model)",
    ),
    "proxy-moe": Qwen3VLConfig(
        name="proxy-moe",
        text=TextConfig(
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=1536,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=128,
            tie_word_embeddings=True,
        ),
        vision=_PROXY_VISION,
        source="playground proxy with the 30B-A3B MoE structure (not a released model)",
    ),
    # Released models: text_config / vision_config values of the Instruct checkpoints (the
    # Thinking checkpoints share the architecture). Defaults not repeated here are the released
    # values of every size: vocab 151936, head_dim 128, rope_theta 5e6, mrope_section
    # [24, 20, 20] interleaved, rms_norm_eps 1e-6, max_position_embeddings 262144, no attention
    # bias, patch 16, temporal patch 2, merge 2, 2304 position embeddings; MoE: decoder_sparse_step
    # 1, mlp_only_layers [], norm_topk_prob true.
    "2b": Qwen3VLConfig(
        name="2b",
        text=TextConfig(
            hidden_size=2048,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            intermediate_size=6144,
            tie_word_embeddings=True,
        ),
        vision=_small_vision(out_hidden_size=2048),
        source=f"{_HF} Qwen/Qwen3-VL-2B-Instruct",
    ),
    "4b": Qwen3VLConfig(
        name="4b",
        text=TextConfig(
            hidden_size=2560,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=9728,
            tie_word_embeddings=True,
        ),
        vision=_small_vision(out_hidden_size=2560),
        source=f"{_HF} Qwen/Qwen3-VL-4B-Instruct",
    ),
    "8b": Qwen3VLConfig(
        name="8b",
        text=TextConfig(
            hidden_size=4096,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=12288,
        ),
        vision=_large_vision(out_hidden_size=4096),
        source=f"{_HF} Qwen/Qwen3-VL-8B-Instruct",
    ),
    "32b": Qwen3VLConfig(
        name="32b",
        text=TextConfig(
            hidden_size=5120,
            num_hidden_layers=64,
            num_attention_heads=64,
            num_key_value_heads=8,
            intermediate_size=25600,
        ),
        vision=_large_vision(out_hidden_size=5120),
        source=f"{_HF} Qwen/Qwen3-VL-32B-Instruct",
    ),
    "30b_a3b": Qwen3VLConfig(
        name="30b_a3b",
        text=TextConfig(
            hidden_size=2048,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=6144,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
        ),
        vision=_large_vision(out_hidden_size=2048),
        source=f"{_HF} Qwen/Qwen3-VL-30B-A3B-Instruct",
    ),
    "235b_a22b": Qwen3VLConfig(
        name="235b_a22b",
        text=TextConfig(
            hidden_size=4096,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            intermediate_size=12288,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=1536,
        ),
        vision=_large_vision(out_hidden_size=4096),
        source=f"{_HF} Qwen/Qwen3-VL-235B-A22B-Instruct",
    ),
}

VARIANT_ALIASES: dict[str, str] = {
    "30b": "30b_a3b",
    "30b-a3b": "30b_a3b",
    "235b": "235b_a22b",
    "235b-a22b": "235b_a22b",
    "proxy_moe": "proxy-moe",
}


def get_variant(name: str) -> Qwen3VLConfig:
    """Look up a variant by name or alias; the error lists every valid name."""
    key = VARIANT_ALIASES.get(name, name)
    if key not in VARIANTS:
        valid = sorted([*VARIANTS, *VARIANT_ALIASES])
        raise ValueError(f"unknown Qwen3-VL variant {name!r}; valid variants: {', '.join(valid)}")
    return VARIANTS[key]

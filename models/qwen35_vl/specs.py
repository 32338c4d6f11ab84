"""Transformer Engine module specs for Qwen3.5-VL on megatron-core 0.19.

The language spec is megatron's hybrid stack with Qwen3.5's attention (q/k RMSNorm, output gate)
and a Gated DeltaNet whose gated output norm keeps HF's uncentered weight; the vision layers use
megatron's ViT TE spec. Both attentions take per-token rotary angles, and the Gated DeltaNet its
boundaries, on packed sequences without host synchronisation. These need CUDA and Transformer
Engine.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from megatron.core.extensions.transformer_engine import (
    TEColumnParallelLinear,
    TEDotProductAttention,
    TELayerNormColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.jit import jit_fuser
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec
from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)
from torch import Tensor
from torch.distributed import ProcessGroup


class UncenteredTENorm:
    """TE RMSNorm whose weight is the scale itself (not 1 + weight), whatever the config says.

    HF's Gated DeltaNet output norm (`Qwen3_5RMSNormGated`) stores its scale uncentered while
    every other Qwen3.5 RMSNorm is zero-centered; keeping HF's convention here makes the weight
    mapping a plain copy (bit-exact both ways).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        uncentered = copy.copy(config)
        uncentered.layernorm_zero_centered_gamma = False
        return TENorm(config=uncentered, hidden_size=hidden_size, eps=eps)


class PackedRotarySelfAttention(SelfAttention):
    """SelfAttention that rotates a packed (THD) batch by its per-token angles in one pass.

    Our rotary angles hold one row per token of the pack (MRoPE positions restart per sequence;
    the vision tower's are per-patch (row, col)). megatron-core 0.19's THD RoPE reads the
    sequence boundaries back to the host (`tolist()`, `item()` per sequence) and rotates sequence
    by sequence, stalling the GPU in every attention layer; without context parallelism its
    result is the single-pass rotation of the [T, 1, heads, dim] tensor, computed here right after
    the q/k projections (and norms). With context parallelism megatron's path picks each rank's
    angles and is kept."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor, *args, **kwargs):
        packed = kwargs.get("packed_seq_params")
        rotary = kwargs.get("rotary_pos_emb")
        self._token_rotary = None
        if (
            rotary is not None
            and packed is not None
            and packed.qkv_format == "thd"
            and self.pg_collection.cp.size() == 1
        ):
            self._token_rotary = rotary if isinstance(rotary, tuple) else (rotary, rotary)
            kwargs["rotary_pos_emb"] = None
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self._token_rotary = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, **kwargs):
        outputs = super().get_query_key_value_tensors(hidden_states, key_value_states, **kwargs)
        if getattr(self, "_token_rotary", None) is None:
            return outputs
        query, key, *rest = outputs
        query_angles, key_angles = self._token_rotary
        if query_angles.shape[0] != query.shape[0]:
            raise ValueError(
                f"packed attention expects one rotary angle row per token: {query.shape[0]} "
                f"tokens, {query_angles.shape[0]} angle rows"
            )
        query, key = self.rotate(query, query_angles), self.rotate(key, key_angles)
        return (query, key, *rest)

    def rotate(self, tensor: Tensor, angles: Tensor) -> Tensor:
        """[T, 1, heads, dim] rotated by its [T, 1, 1, rotary dim] angles, one row per token, by
        megatron's unfused rotation: cos and sin rounded to the activations' dtype and each
        product rounded, as HF's language attention does."""
        return apply_rotary_pos_emb(
            tensor,
            angles,
            config=self.config,
            mscale=self._yarn_concentration_factor,
            cp_group=self.pg_collection.cp,
        )


class VisionRotarySelfAttention(PackedRotarySelfAttention):
    """The vision tower's attention: rotates in fp32 and rounds once, as HF's vision attention."""

    def rotate(self, tensor: Tensor, angles: Tensor) -> Tensor:
        return rotate_in_fp32(tensor, angles, self.config, self.pg_collection.cp)


def rotate_in_fp32(
    tensor: Tensor, angles: Tensor, config: TransformerConfig, cp_group: ProcessGroup
) -> Tensor:
    """[T, 1, heads, dim] rotated by per-token [T, 1, 1, rotary dim] angles with fp32 cos, sin
    and products, rounded once to the tensor's dtype (HF's `apply_rotary_pos_emb_vision`).

    On a GPU with Transformer Engine this is TE's fused RoPE kernel (its sbhd layout with batch 1
    gives each token its own angles): one kernel forward and one backward in place of megatron's
    chain of slices, cos, sin, casts and products, which the 27 host-bound vision blocks
    launch for query and key alike. Under megatron-core's per-layer CUDA graphs
    (VISION_CUDA_GRAPH=1) the same fp32 formula runs compiled by torch on cos and sin formed in
    the layer (`rotate_halves_in_fp32`): the fused kernel, and the compiled formula taking the
    angles, gave linear_qkv weight gradients 2-7% off the eager tower's there (docs/results.md,
    "The step after the vision CUDA graphs"). Elsewhere megatron's rotation of the fp32 tensor."""
    if tensor.is_cuda and config.cuda_graph_impl == "local":
        if angles.shape[-1] == tensor.shape[-1] and not config.rotary_interleaved:
            return rotate_halves_in_fp32(tensor, torch.cos(angles), torch.sin(angles))
    else:
        fused = rope_utils.fused_apply_rotary_pos_emb
        if fused is not None and tensor.is_cuda:
            return fused(tensor, angles, interleaved=config.rotary_interleaved)
    return apply_rotary_pos_emb(tensor.float(), angles, config=config, cp_group=cp_group).to(
        tensor.dtype
    )


def rotation_of_halves_in_fp32(tensor: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """megatron's rotation of the fp32 tensor (`_apply_rotary_pos_emb_bshd`, halves rotated, the
    angles spanning the whole head) in one expression on the angles' fp32 cos and sin, rounded
    once to the tensor's dtype."""
    x = tensor.float()
    first, second = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-second, first), dim=-1) * sin).to(tensor.dtype)


rotate_halves_in_fp32 = jit_fuser(rotation_of_halves_in_fp32)


class PackedGatedDeltaNet(GatedDeltaNet):
    """GatedDeltaNet that takes a packed (THD) batch's boundaries without reading them back.

    megatron-core 0.19 checks, in every Gated DeltaNet layer and for query and key alike, that
    the boundaries end at the pack's length and that each sequence divides by the CP size:
    `cu_seqlens[-1].cpu().item()` and `(lengths % cp).any()` stall the host until the GPU catches
    up (24 times per step in 6 such layers). Without context parallelism both hold by
    construction here: data/collate.py builds the padded boundaries from the pack's own rows, so
    the last one is its length. With context parallelism megatron's checks are kept."""

    def _resolve_cu_seqlens(
        self, cu_seqlens_padded, cu_seqlens_actual, total_seq_len, name, cp_size: int = 1
    ) -> Tensor:
        if cp_size == 1:
            return cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens_actual
        return super()._resolve_cu_seqlens(
            cu_seqlens_padded, cu_seqlens_actual, total_seq_len, name, cp_size
        )


def _attention_layer() -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=PackedRotarySelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=TENorm,
                    k_layernorm=TENorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )


def _gated_delta_net_layer() -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=PackedGatedDeltaNet,
                submodules=GatedDeltaNetSubmodules(
                    in_proj=TELayerNormColumnParallelLinear,
                    out_norm=UncenteredTENorm,
                    out_proj=TERowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )


def _mlp_layer() -> ModuleSpec:
    return ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            mlp=partial(
                MLP.as_mlp_submodule,
                submodules=MLPSubmodules(
                    linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _moe_layer(num_experts: int) -> ModuleSpec:
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=TENorm,
            mlp=get_moe_module_spec(use_te=True, num_experts=num_experts, moe_grouped_gemm=True),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _mtp_block() -> ModuleSpec:
    return ModuleSpec(
        module=MultiTokenPredictionBlock,
        submodules=MultiTokenPredictionBlockSubmodules(
            layer_specs=[
                ModuleSpec(
                    module=MultiTokenPredictionLayer,
                    submodules=MultiTokenPredictionLayerSubmodules(
                        enorm=TENorm,
                        hnorm=TENorm,
                        eh_proj=TEColumnParallelLinear,
                        mtp_model_layer=None,  # built by HybridModel from the MTP pattern
                        layer_norm=TENorm,
                    ),
                )
            ]
        ),
    )


def language_stack_spec(num_experts: int = 0) -> ModuleSpec:
    """HybridStack spec: `G` Gated DeltaNet, `*` gated attention, `-` MLP, `E` MoE, plus MTP."""
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            gdn_layer=_gated_delta_net_layer(),
            attention_layer=_attention_layer(),
            mlp_layer=_mlp_layer(),
            moe_layer=_moe_layer(num_experts) if num_experts else _mlp_layer(),
            mtp_block_spec=_mtp_block(),
        ),
    )


def vision_layer_spec() -> ModuleSpec:
    """Pre-norm ViT layer (LayerNorm fused into qkv / fc1, bidirectional attention) whose
    attention rotates each patch by its own angles in one pass."""
    spec = get_vit_layer_with_transformer_engine_spec()
    spec.submodules.self_attention.module = VisionRotarySelfAttention
    return spec

"""Transformer Engine module specs for Qwen3.5-VL on megatron-core 0.19.

The language spec is megatron's hybrid stack with Qwen3.5's attention (q/k RMSNorm, output gate)
and a Gated DeltaNet whose gated output norm keeps HF's uncentered weight; the vision layers use
megatron's ViT TE spec. These modules need CUDA and Transformer Engine.
"""

from __future__ import annotations

import copy
from functools import partial

from megatron.core.extensions.transformer_engine import (
    TEColumnParallelLinear,
    TEDotProductAttention,
    TELayerNormColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
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


def _attention_layer() -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
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
                module=GatedDeltaNet,
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
    """Pre-norm ViT layer (LayerNorm fused into qkv / fc1, bidirectional attention)."""
    return get_vit_layer_with_transformer_engine_spec()

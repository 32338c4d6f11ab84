"""Qwen3.5-VL's `ModelSpec`: the registry's one entry point into this folder. It binds the
configuration, the factory, the FLOPs model and the dataset providers to the callables the
generic entry points use; the other files of the folder depend on megatron-core, TE, torch and
transformers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.spec import ModelShape, ModelSpec, WeightConversion, data_module_provider

from . import checkpoint_layout, configuration, flops, hf_weights
from .configuration import FULL_ATTENTION, LINEAR_ATTENTION, Qwen35VLConfig, human_count
from .vision_inputs import SampleInputs


def build_model(config: Qwen35VLConfig, base: Any, pg_collection: Any, **options: Any) -> Any:
    """`factory.build_model`, imported on use: megatron-core's import prints library warnings,
    which the dry run keeps out of its plan."""
    from .factory import build_model as build

    return build(config, base, pg_collection, **options)


def transformer_configs(
    config: Qwen35VLConfig,
    base: Any,
    recompute_vision: bool = False,
    vision_cuda_graph: bool = False,
) -> Any:
    """`factory.transformer_configs`, imported on use (see `build_model`)."""
    from .factory import transformer_configs as configs

    return configs(config, base, recompute_vision, vision_cuda_graph)


def model_args(config: Qwen35VLConfig) -> dict[str, Any]:
    """Megatron arguments of the architecture that are not `TransformerConfig` fields, by dest:
    the layer pattern (it sets megatron's layer count and MTP depth), vocabulary, positions
    (MRoPE is applied by the model, so megatron adds none) and the untied output layer."""
    text = config.text
    return {
        "hybrid_layer_pattern": config.hybrid_layer_pattern(),
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "position_embedding_type": "none",
        "untie_embeddings_and_output_weights": not text.tie_word_embeddings,
    }


def shape(config: Qwen35VLConfig) -> ModelShape:
    counts, text = config.parameter_counts(), config.text
    gated_deltanet = LINEAR_ATTENTION in text.layer_types
    return ModelShape(
        dense=counts.total + counts.mtp - counts.routed_experts,
        experts=counts.routed_experts,
        hidden=text.hidden_size,
        layers=2 * text.num_hidden_layers,
        vocab=text.vocab_size,
        attention_heads=text.num_attention_heads,
        query_groups=text.num_key_value_heads,
        # megatron shards Gated DeltaNet heads over TP, then over CP in its all-to-all.
        tp_cp_heads={
            "Gated DeltaNet key": text.linear_num_key_heads,
            "Gated DeltaNet value": text.linear_num_value_heads,
        }
        if gated_deltanet
        else {},
        num_experts=text.num_experts or 0,
        mtp_layers=text.mtp_num_hidden_layers,
        max_positions=text.max_position_embeddings,
    )


def training_flops(
    config: Qwen35VLConfig,
    sequence_lengths: Sequence[int],
    image_grids: Sequence[tuple[int, int, int]],
) -> float:
    return flops.training_flops(config, list(sequence_lengths), list(image_grids)).total


def describe(config: Qwen35VLConfig) -> list[str]:
    """The dry run's lines about the architecture and its parameter counts."""
    text, vision, counts = config.text, config.vision, config.parameter_counts()
    mlp = (
        f"MoE {text.num_experts} experts top-{text.num_experts_per_tok}"
        if text.is_moe
        else f"dense MLP {text.intermediate_size}"
    )
    return [
        f"decoder: {text.num_hidden_layers} layers "
        f"({text.layer_types.count(LINEAR_ATTENTION)} Gated DeltaNet, "
        f"{text.layer_types.count(FULL_ATTENTION)} attention), hidden {text.hidden_size}, "
        f"{mlp}, MTP layers {text.mtp_num_hidden_layers}",
        f"vision: {vision.depth} layers, hidden {vision.hidden_size}",
        f"parameters (HF-equivalent): total {counts.total:,} ({human_count(counts.total)}), "
        f"active {counts.active:,} ({human_count(counts.active)}); vision "
        f"{human_count(counts.vision)}; MTP +{counts.mtp:,} ({human_count(counts.mtp)})",
    ]


def config_with_tensors(config: Qwen35VLConfig, names: set[str], megatron: bool) -> Qwen35VLConfig:
    """The MTP depth a checkpoint has: one layer when its MTP tensors are there (transformers'
    `save_pretrained` writes none; megatron keys may carry the FSDP prefix)."""
    marker = hf_weights.MEGATRON_TEXT + "mtp." if megatron else "mtp."
    has_mtp = any(name.startswith(marker) or ("." + marker) in name for name in names)
    return config.with_mtp_layers(1 if has_mtp else 0)


def unused_hf_tensors(config: Qwen35VLConfig) -> dict[str, str]:
    if config.text.tie_word_embeddings:
        return {"lm_head.weight": "the config ties the output layer to the embedding"}
    return {}


WEIGHTS = WeightConversion(
    rules=hf_weights.weight_rules,
    hf_tensor_shapes=hf_weights.hf_tensor_shapes,
    megatron_shape=checkpoint_layout.megatron_shape,
    shard_for_tensor_parallel=hf_weights.shard_for_tensor_parallel,
    torch_dist_chunks=checkpoint_layout.tensor_chunks,
    fsdp_dtensor_chunks=checkpoint_layout.fsdp_dtensor_chunks,
    extra_state_objects=checkpoint_layout.extra_state_objects,
    check_names=hf_weights.check_names,
    config_with_tensors=config_with_tensors,
    unused_hf_tensors=unused_hf_tensors,
    fsdp_dtensor_tp_note=(
        "megatron-core 0.19's FSDP checkpoints keep Gated DeltaNet's fused in_proj / conv1d in "
        "the TP layout of the run that wrote them"
    ),
)


SPEC = ModelSpec(
    name="qwen35_vl",
    variants=configuration.VARIANTS,
    variant_aliases=configuration.VARIANT_ALIASES,
    get_variant=configuration.get_variant,
    from_hf_config=configuration.from_hf_config,
    build_model=build_model,
    transformer_configs=transformer_configs,
    language_fields=Qwen35VLConfig.language_transformer_fields,
    model_args=model_args,
    shape=shape,
    model_inputs=SampleInputs.of,
    training_flops=training_flops,
    describe=describe,
    weights=WEIGHTS,
    dataset_providers={
        "mock": data_module_provider("mock"),
        "cord_v2": data_module_provider("cord_v2"),
    },
)

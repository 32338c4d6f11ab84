"""Qwen3-VL's `ModelSpec`: the registry's one entry point into this folder. It binds the
configuration, the factory, the FLOPs model, the weight conversion and the dataset providers to
the callables the generic entry points use. The TransformerConfigs, megatron arguments and
collate inputs (MRoPE ids, vision-tower inputs) are Qwen3.5's, which read them from the config:
the two families share those rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.qwen35_vl.configuration import human_count
from models.qwen35_vl.spec import model_args
from models.qwen35_vl.spec import transformer_configs as qwen35_transformer_configs
from models.qwen35_vl.vision_inputs import SampleInputs
from models.spec import ModelShape, ModelSpec, data_module_provider

from . import configuration, flops
from .checkpoint_layout import WEIGHTS
from .configuration import Qwen3VLConfig


def shape(config: Qwen3VLConfig) -> ModelShape:
    counts, text = config.parameter_counts(), config.text
    return ModelShape(
        dense=counts.total - counts.routed_experts,
        experts=counts.routed_experts,
        hidden=text.hidden_size,
        layers=2 * text.num_hidden_layers,
        vocab=text.vocab_size,
        attention_heads=text.num_attention_heads,
        query_groups=text.num_key_value_heads,
        tp_cp_heads={},
        num_experts=text.num_experts,
        mtp_layers=0,
        max_positions=text.max_position_embeddings,
        # DeepStack adds vision features inside the first decoder layers; recomputing those layers
        # in backward would send the vision tower's gradient a second time.
        full_recompute_problem="DeepStack feeds vision features into the recomputed decoder "
        "layers; use RECOMPUTE=0 (RECOMPUTE_VISION=1 still recomputes the vision tower)",
    )


def training_flops(
    config: Qwen3VLConfig,
    sequence_lengths: Sequence[int],
    image_grids: Sequence[tuple[int, int, int]],
) -> float:
    return flops.training_flops(config, list(sequence_lengths), list(image_grids)).total


def describe(config: Qwen3VLConfig) -> list[str]:
    """The dry run's lines about the architecture and its parameter counts."""
    text, vision, counts = config.text, config.vision, config.parameter_counts()
    mlp = (
        f"MoE {text.num_experts} experts top-{text.num_experts_per_tok} in "
        f"{sum(text.sparse_layers)} layers"
        if text.is_moe
        else f"dense MLP {text.intermediate_size}"
    )
    return [
        f"decoder: {text.num_hidden_layers} attention layers, hidden {text.hidden_size}, {mlp}",
        f"vision: {vision.depth} layers, hidden {vision.hidden_size}, DeepStack from blocks "
        f"{list(vision.deepstack_visual_indexes)} into decoder layers "
        f"0-{len(vision.deepstack_visual_indexes) - 1}",
        f"parameters (HF-equivalent): total {counts.total:,} ({human_count(counts.total)}), "
        f"active {counts.active:,} ({human_count(counts.active)}); vision "
        f"{human_count(counts.vision)}",
    ]


def refuse_vision_cuda_graph(enabled: bool) -> None:
    """DeepStack reads early blocks' outputs after the last block ran; under megatron-core's
    per-layer graphs those are graph output buffers, and that was never run on a GPU."""
    if enabled:
        raise ValueError(
            "VISION_CUDA_GRAPH=1 is verified with Qwen3.5-VL's vision tower only; Qwen3-VL's "
            "DeepStack reads intermediate block outputs, not yet run under CUDA graphs: set "
            "VISION_CUDA_GRAPH=0"
        )


def transformer_configs(
    config: Qwen3VLConfig,
    base: Any,
    recompute_vision: bool = False,
    vision_cuda_graph: bool = False,
) -> Any:
    """Qwen3.5's TransformerConfigs (the same rules), without the vision tower's CUDA graphs."""
    refuse_vision_cuda_graph(vision_cuda_graph)
    return qwen35_transformer_configs(config, base, recompute_vision)


def build_model(config: Qwen3VLConfig, base: Any, pg_collection: Any, **options: Any) -> Any:
    """`factory.build_model`, imported on use: megatron-core's import prints library warnings,
    which the dry run keeps out of its plan."""
    from .factory import build_model as build

    refuse_vision_cuda_graph(bool(options.get("vision_graph_patches")))
    return build(config, base, pg_collection, **options)


SPEC = ModelSpec(
    name="qwen3_vl",
    variants=configuration.VARIANTS,
    variant_aliases=configuration.VARIANT_ALIASES,
    get_variant=configuration.get_variant,
    from_hf_config=configuration.from_hf_config,
    build_model=build_model,
    transformer_configs=transformer_configs,
    language_fields=Qwen3VLConfig.language_transformer_fields,
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

"""Builds Qwen3.5-VL: the language and vision TransformerConfigs (architecture from our config
dataclass, parallelism / precision / fusions from a base TransformerConfig, e.g. the one megatron
derives from its arguments) and the model itself, refusing a process whose cuDNN is not the one
torch was built against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from .configuration import Qwen35VLConfig


def language_config(model_config: Qwen35VLConfig, base: TransformerConfig) -> TransformerConfig:
    """`base` (from Megatron's arguments) with Qwen3.5's language architecture.

    RoPE fusion stays off: TE's fused kernels index rotary angles by position within each
    sequence, while MRoPE needs each token's own (t, h, w) angles.
    """
    return dataclasses.replace(
        base, **model_config.language_transformer_fields(), apply_rope_fusion=False
    )


def vision_config(
    model_config: Qwen35VLConfig,
    base: TransformerConfig,
    recompute: bool = False,
    cuda_graph: bool = False,
) -> TransformerConfig:
    """The vision tower's config: same precision and TP as the language model, no sequence or
    context parallelism (each rank encodes its micro-batch's images whole), no MoE / MTP; with
    `cuda_graph` its layers run as megatron-core's per-layer CUDA graphs ("local")."""
    if cuda_graph and recompute:
        raise ValueError(
            "the vision tower's CUDA graphs and its recomputation exclude each other: "
            "set VISION_CUDA_GRAPH=0 or RECOMPUTE_VISION=0"
        )
    fields: dict[str, Any] = dict(
        model_config.vision_transformer_fields(),
        sequence_parallel=False,
        context_parallel_size=1,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        num_moe_experts=None,
        moe_shared_expert_intermediate_size=None,
        moe_ffn_hidden_size=None,
        expert_model_parallel_size=1,
        mtp_num_layers=None,
        is_hybrid_model=False,
        tp_comm_overlap=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        cuda_graph_impl="local" if cuda_graph else "none",
        inference_cuda_graph_scope=None,  # re-derived from cuda_graph_impl
        mrope_section=None,
        linear_num_key_heads=None,
        linear_num_value_heads=None,
    )
    return dataclasses.replace(base, **fields)


def transformer_configs(
    model_config: Qwen35VLConfig,
    base: TransformerConfig,
    recompute_vision: bool = False,
    vision_cuda_graph: bool = False,
) -> tuple[TransformerConfig, TransformerConfig]:
    """(language, vision) TransformerConfigs; constructing them runs megatron's validation."""
    return language_config(model_config, base), vision_config(
        model_config, base, recompute_vision, vision_cuda_graph
    )


def cudnn_version_tuple(encoded: int) -> tuple[int, int, int]:
    """torch's encoded cuDNN version (91900) as (9, 19, 0)."""
    return encoded // 10000, encoded // 100 % 100, encoded % 100


def require_matching_cudnn() -> None:
    """Raise unless torch and Transformer Engine run the cuDNN torch was built against. On an H100
    whose system cuDNN 9.14 was loaded under torch built for 9.19, TE's packed-sequence (THD)
    attention backward at head dim 256 returned non-finite dK / dV (docs/results.md), while the
    same processes trained unpacked batches normally, so the mismatch must stop the run."""
    import torch
    from transformer_engine.pytorch.utils import get_cudnn_version

    te_runtime = tuple(get_cudnn_version())
    advice = (
        "point both at torch's own cuDNN before Python starts: export CUDNN_HOME="
        "<site-packages>/nvidia/cudnn and prepend $CUDNN_HOME/lib to LD_LIBRARY_PATH "
        "(scripts/torch_cudnn.sh does this for the launchers)"
    )
    try:
        torch_runtime = torch.backends.cudnn.version()
    except RuntimeError as error:  # torch refuses a runtime older than its build
        reason = str(error).split(". ")[0]
        raise RuntimeError(
            f"{reason}; Transformer Engine loaded cuDNN {te_runtime}: {advice}"
        ) from error
    if torch_runtime is None:
        return
    torch_runtime = cudnn_version_tuple(torch_runtime)
    if torch_runtime != te_runtime:
        raise RuntimeError(
            f"torch runs cuDNN {torch_runtime} but Transformer Engine loaded {te_runtime}: {advice}"
        )


def build_model(
    model_config: Qwen35VLConfig,
    base: TransformerConfig,
    pg_collection: ProcessGroupCollection,
    pre_process: bool = True,
    post_process: bool = True,
    recompute_vision: bool = False,
    parallel_output: bool = True,
    vp_stage: int | None = None,
    model_class: type | None = None,
    vision_graph_patches: int = 0,
    vision_graph_images: int = 16,
):
    """The whole model on this rank (the registry's model factory); needs CUDA and TE.
    `model_class`: `Qwen35VLModel` or a subclass sharing its structure (Qwen3-VL's).
    `vision_graph_patches` > 0: the vision tower's layers run as CUDA graphs on each micro-batch's
    patches padded to that many rows in `vision_graph_images` attention segments."""
    from .model import Qwen35VLModel
    from .vision import PatchBudget

    require_matching_cudnn()
    budget = (
        PatchBudget(vision_graph_patches, vision_graph_images) if vision_graph_patches else None
    )
    language, vision = transformer_configs(model_config, base, recompute_vision, budget is not None)
    return (model_class or Qwen35VLModel)(
        model_config,
        language,
        vision,
        pg_collection=pg_collection,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        vp_stage=vp_stage,
        vision_patch_budget=budget,
    )

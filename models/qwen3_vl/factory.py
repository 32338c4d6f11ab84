"""Builds Qwen3-VL on this rank. Its TransformerConfigs come from Qwen3.5's factory, which reads
the architecture from the config dataclass (`language_transformer_fields`,
`vision_transformer_fields`) and parallelism, precision and fusions from megatron's arguments.
"""

from __future__ import annotations

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from models.qwen35_vl.factory import require_matching_cudnn, transformer_configs

from .configuration import Qwen3VLConfig


def build_model(
    model_config: Qwen3VLConfig,
    base: TransformerConfig,
    pg_collection: ProcessGroupCollection,
    pre_process: bool = True,
    post_process: bool = True,
    recompute_vision: bool = False,
    parallel_output: bool = True,
    vp_stage: int | None = None,
):
    """The whole model on this rank (the registry's model factory); needs CUDA and TE."""
    from .model import Qwen3VLModel

    require_matching_cudnn()
    language, vision = transformer_configs(model_config, base, recompute_vision)
    return Qwen3VLModel(
        model_config,
        language,
        vision,
        pg_collection=pg_collection,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        vp_stage=vp_stage,
    )

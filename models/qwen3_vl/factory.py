"""Builds Qwen3-VL on this rank with Qwen3.5's factory, which reads the architecture from the
config dataclass (`language_transformer_fields`, `vision_transformer_fields`) and parallelism,
precision and fusions from megatron's arguments.
"""

from __future__ import annotations

from typing import Any

from models.qwen35_vl.factory import build_model as build_vision_language_model

from .configuration import Qwen3VLConfig


def build_model(model_config: Qwen3VLConfig, base: Any, pg_collection: Any, **options: Any):
    """The whole model on this rank (the registry's model factory); needs CUDA and TE."""
    from .model import Qwen3VLModel

    return build_vision_language_model(
        model_config, base, pg_collection, model_class=Qwen3VLModel, **options
    )

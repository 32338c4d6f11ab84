"""Model registry: a model name maps to the `ModelSpec` its folder's `spec.py` exposes (variants,
factory, megatron architecture, layout facts, FLOPs, dry-run description, dataset providers).
Adding an architecture = one folder with a `spec.py` + one line here.
"""

from __future__ import annotations

from models.qwen3_vl.spec import SPEC as QWEN3_VL
from models.qwen35_vl.spec import SPEC as QWEN35_VL
from models.spec import ModelSpec

MODEL_REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (QWEN35_VL, QWEN3_VL)}


def get_model_spec(name: str) -> ModelSpec:
    """Registry lookup; the error lists every registered model."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name]

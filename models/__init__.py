"""Model registry: a model name maps to its variants, its model factory (called by the model
provider in `pretrain_multimodal.py`) and its dataset providers. Adding an architecture = one
entry here + one folder.

Providers are given as "module:function" strings and imported on use, so looking up names and
variants stays cheap (no CUDA, no Transformer Engine).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.qwen35_vl import configuration as qwen35_vl_configuration


@dataclass(frozen=True)
class ModelEntry:
    """What the entry points need to know about one architecture."""

    variants: dict[str, Any]
    variant_aliases: dict[str, str]
    get_variant: Callable[[str], Any]
    from_hf_config: Callable[..., Any]
    model_factory: str
    transformer_configs_factory: str
    dataset_providers: dict[str, str] = field(default_factory=dict)

    def variant_names(self) -> list[str]:
        return sorted([*self.variants, *self.variant_aliases])

    def dataset_provider(self, name: str) -> Callable[..., Any]:
        if name not in self.dataset_providers:
            valid = ", ".join(sorted(self.dataset_providers))
            raise ValueError(f"unknown dataset provider {name!r}; valid providers: {valid}")
        return resolve(self.dataset_providers[name])

    def describe_dataset(self, name: str, args: Any, config: Any) -> list[str]:
        """The dry run's lines about dataset `name`: its provider module's `describe_dataset`
        (files, rows, tokenizer) when it has one."""
        module = importlib.import_module(self.dataset_providers[name].partition(":")[0])
        describe = getattr(module, "describe_dataset", None)
        return describe(args, config) if describe else []

    def build_model(self, *args: Any, **kwargs: Any) -> Any:
        return resolve(self.model_factory)(*args, **kwargs)

    def transformer_configs(self, *args: Any, **kwargs: Any) -> Any:
        """The model's megatron TransformerConfigs (built and validated on the CPU)."""
        return resolve(self.transformer_configs_factory)(*args, **kwargs)


def resolve(path: str) -> Callable[..., Any]:
    """Import "package.module:function"."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


MODEL_REGISTRY: dict[str, ModelEntry] = {
    "qwen35_vl": ModelEntry(
        variants=qwen35_vl_configuration.VARIANTS,
        variant_aliases=qwen35_vl_configuration.VARIANT_ALIASES,
        get_variant=qwen35_vl_configuration.get_variant,
        from_hf_config=qwen35_vl_configuration.from_hf_config,
        model_factory="models.qwen35_vl.factory:build_model",
        transformer_configs_factory="models.qwen35_vl.factory:transformer_configs",
        dataset_providers={
            "mock": "data.mock:build_datasets",
            "cord_v2": "data.cord_v2:build_datasets",
        },
    ),
}


def get_model_entry(name: str) -> ModelEntry:
    """Registry lookup; the error lists every registered model."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name]

"""`ModelSpec`: everything the generic entry points (training entry, arguments, planner, data,
converter, benchmark) may know of one architecture, as typed callables its model folder provides
in `models/<name>/spec.py`. The generic files import no model module: they look a spec up in
`models.MODEL_REGISTRY` and call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor


class ModelInputs(Protocol):
    """What `data.collate` asks a model for: its image placeholder token, one sample's position
    ids ([rows, L], e.g. MRoPE's t/h/w) and a micro-batch's vision-tower inputs."""

    image_token_id: int

    def positions(self, input_ids: Tensor, image_grid_thw: Tensor | None) -> Tensor: ...

    def vision_inputs(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Any: ...


@dataclass(frozen=True)
class ModelShape:
    """What the generic checks and the memory planner need of a model: parameter counts by how
    they shard and the sizes parallel layouts must divide."""

    dense: int  # parameters outside the routed experts: vision, embeddings, MTP included
    experts: int  # routed expert parameters, MTP layers included
    hidden: int
    layers: int  # decoder sub-layers as megatron counts them (--num-layers)
    vocab: int
    attention_heads: int
    query_groups: int
    tp_cp_heads: dict[str, int]  # head counts TP x CP must divide, by name ("Gated DeltaNet key")
    num_experts: int  # routed experts; 0 for a dense model
    mtp_layers: int  # multi-token-prediction depths
    max_positions: int


@dataclass(frozen=True)
class DatasetProvider:
    """`build(args, model_config, (train, valid, test) sample counts)` returns the splits;
    `describe(args, model_config)` the dry run's lines about the data (files, rows, tokenizer);
    `check(args)` raises ValueError, naming the flag, for missing local data before any run."""

    build: Callable[[Any, Any, tuple[int, int, int]], Any]
    describe: Callable[[Any, Any], list[str]] = lambda args, config: []
    check: Callable[[Any], None] = lambda args: None


@dataclass(frozen=True)
class ModelSpec:
    """One architecture. `config` below is the model's own configuration dataclass (a variant,
    or one read from an HF config); the generic code passes it along without reading it.

    - `language_fields(config)`: the language `TransformerConfig`'s architecture fields, the one
      source of megatron's architecture flags (`arguments.architecture_argv`) and of the config
      the factory builds; `model_args(config)`: the architecture's megatron arguments that are not
      `TransformerConfig` fields (vocabulary, positions, hybrid layer pattern, ...), by `dest`.
    - `shape(config)`: the `ModelShape` the generic layout rules (`planner.layout_problem`) and
      the memory plan work from.
    - `model_inputs(config)`: the `ModelInputs` the collate builds batches with.
    - `training_flops(config, sequence_lengths, image_grids)`: model FLOPs of one training step
      (3 x forward) for the throughput log.
    - `describe(config)`: the dry run's lines about the architecture.
    """

    name: str
    variants: Mapping[str, Any]
    variant_aliases: Mapping[str, str]
    get_variant: Callable[[str], Any]
    from_hf_config: Callable[..., Any]
    build_model: Callable[..., Any]
    transformer_configs: Callable[..., Any]
    language_fields: Callable[[Any], dict[str, Any]]
    model_args: Callable[[Any], dict[str, Any]]
    shape: Callable[[Any], ModelShape]
    model_inputs: Callable[[Any], ModelInputs]
    training_flops: Callable[[Any, Sequence[int], Sequence[tuple[int, int, int]]], float]
    describe: Callable[[Any], list[str]]
    dataset_providers: Mapping[str, DatasetProvider] = field(default_factory=dict)

    def variant_names(self) -> list[str]:
        return sorted([*self.variants, *self.variant_aliases])

    def dataset_provider(self, name: str) -> DatasetProvider:
        if name not in self.dataset_providers:
            valid = ", ".join(sorted(self.dataset_providers))
            raise ValueError(f"unknown dataset provider {name!r}; valid providers: {valid}")
        return self.dataset_providers[name]

"""`ModelSpec`: everything the generic entry points (training entry, arguments, planner, data,
converter, benchmark) may know of one architecture, as typed callables its model folder provides
in `models/<name>/spec.py`. The generic files import no model module: they look a spec up in
`models.MODEL_REGISTRY` and call it.
"""

from __future__ import annotations

import importlib
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


class VisionLanguageConfig(Protocol):
    """What the data path reads of a model's configuration (each model folder's config
    dataclass provides it): the vocabulary (`text.vocab_size`), the image placeholder and
    chat-template token ids, the vision patch geometry (`vision.patch_size`,
    `vision.temporal_patch_size`, `vision.spatial_merge_size`) and the image processor that cuts
    images into it."""

    name: str
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    im_start_token_id: int
    im_end_token_id: int
    pad_token_id: int

    @property
    def text(self) -> Any: ...

    @property
    def vision(self) -> Any: ...

    def image_processor(self, min_pixels: int, max_pixels: int) -> Any: ...


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
    # Why megatron's full-layer recompute (--recompute-granularity full) cannot train this model;
    # "" when it can.
    full_recompute_problem: str = ""


@dataclass(frozen=True)
class DatasetProvider:
    """`build(args, model_config, (train, valid, test) sample counts)` returns the splits;
    `describe(args, model_config)` the dry run's lines about the data (files, rows, tokenizer);
    `check(args)` raises ValueError, naming the flag, for missing local data before any run."""

    build: Callable[[Any, Any, tuple[int, int, int]], Any]
    describe: Callable[[Any, Any], list[str]] = lambda args, config: []
    check: Callable[[Any], None] = lambda args: None


@dataclass(frozen=True)
class WeightConversion:
    """How one model's weights move between an HF checkpoint and megatron's distributed checkpoint
    (`scripts/convert_hf_checkpoint.py`). A rule maps HF tensors to one megatron tensor (`.hf`,
    `.megatron`, `.expert`, `.to_hf(tensor, hf_shapes)`); chunks are the DCP entries of a megatron
    tensor in the `torch_dist` or `fsdp_dtensor` layout.

    - `config_with_tensors(config, names, megatron)`: the config of a checkpoint whose tensor
      names (HF names, or megatron keys when `megatron`) are `names` (e.g. its MTP depth).
    - `unused_hf_tensors(config)`: HF tensors a checkpoint may hold that the model does not use,
      with the reason (a tied output layer stored anyway).
    - `fsdp_dtensor_tp_note`: why `fsdp_dtensor` checkpoints must be TP=1, or '' when any TP fits.
    """

    rules: Callable[[Any], list[Any]]
    hf_tensor_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    megatron_shape: Callable[[Any, dict[str, tuple[int, ...]]], tuple[int, ...]]
    shard_for_tensor_parallel: Callable[[Any, Tensor, int, int], Tensor]
    torch_dist_chunks: Callable[[Any, tuple[int, ...], Any], list[Any]]
    fsdp_dtensor_chunks: Callable[[Any, tuple[int, ...]], list[Any]]
    extra_state_objects: Callable[[list[Any], Any], list[Any]]
    check_names: Callable[[str, set[str], set[str]], None]  # KeyError listing missing / unexpected
    config_with_tensors: Callable[[Any, set[str], bool], Any]
    unused_hf_tensors: Callable[[Any], dict[str, str]]
    fsdp_dtensor_tp_note: str = ""


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
    - `weights`: the `WeightConversion` of the HF checkpoint converter.
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
    weights: WeightConversion
    dataset_providers: Mapping[str, DatasetProvider] = field(default_factory=dict)

    def variant_names(self) -> list[str]:
        return sorted([*self.variants, *self.variant_aliases])

    def dataset_provider(self, name: str) -> DatasetProvider:
        if name not in self.dataset_providers:
            valid = ", ".join(sorted(self.dataset_providers))
            raise ValueError(f"unknown dataset provider {name!r}; valid providers: {valid}")
        return self.dataset_providers[name]


def data_module_provider(module: str) -> DatasetProvider:
    """`data.<module>`'s `build_datasets`, `describe_dataset` and `check_args` (when it has one),
    imported on use: the data modules pull in image and parquet libraries (seconds) that a
    registry lookup does not need."""

    def build(args: Any, config: Any, samples: tuple[int, int, int]) -> Any:
        return importlib.import_module(f"data.{module}").build_datasets(args, config, samples)

    def describe(args: Any, config: Any) -> list[str]:
        return importlib.import_module(f"data.{module}").describe_dataset(args, config)

    def check(args: Any) -> None:
        check_args = getattr(importlib.import_module(f"data.{module}"), "check_args", None)
        if check_args is not None:
            check_args(args)

    return DatasetProvider(build, describe, check)

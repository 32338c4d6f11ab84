"""Data loaders for `--dataloader-type external`: megatron's random sampler (data-parallel sharding,
resume from `consumed_samples`, a reshuffle every epoch) feeding our collate, cycled over epochs;
the samples' load notes (truncations, skipped rows) are counted and logged in the main process.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .collate import CollateConfig, pack_or_pad_batch
from .load_report import LoadReport


@dataclass(frozen=True)
class DatasetSplits:
    """What a dataset provider returns: the three splits and the label ids never trained."""

    train: Dataset
    valid: Dataset
    test: Dataset
    pad_token_id: int
    ignored_label_ids: frozenset[int]


def cycle_epochs(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """Iterate `loader` forever; its sampler starts each pass where the previous one ended."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


def reported(
    batches: Iterator[dict[str, Any]], micro_batch_size: int, report: LoadReport
) -> Iterator[dict[str, Any]]:
    """`batches` with their load notes taken off and counted in `report`."""
    for batch in batches:
        report.add(micro_batch_size, batch.pop("load_notes", None))
        yield batch


def build_loader(
    dataset: Dataset,
    collate: CollateConfig,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int,
    report: LoadReport | None = None,
) -> Iterator[dict[str, Any]]:
    """An endless iterator of collated micro-batches for this data-parallel rank. `report`
    counts the samples' load notes (default: one named after the dataset's `label`, reporting
    once per epoch of this rank)."""
    # Imported here: megatron.training takes seconds to import, and the launcher's early checks
    # import the data modules (for DatasetSplits) without building a loader.
    from megatron.training.datasets.data_samplers import MegatronPretrainingRandomSampler

    if len(dataset) < micro_batch_size * data_parallel_size:
        raise ValueError(
            f"dataset has {len(dataset)} samples, fewer than one global step of micro-batch "
            f"{micro_batch_size} x data-parallel {data_parallel_size}"
        )
    sampler = MegatronPretrainingRandomSampler(
        dataset,
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        # One permutation shared by all DP ranks (rank r takes every DP-th sample): a global
        # batch holds the same samples whatever the DP size, so layouts can be compared.
        data_sharding=False,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=partial(pack_or_pad_batch, config=collate),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    if report is None:
        label = getattr(dataset, "label", type(dataset).__name__)
        report = LoadReport(label, every=len(dataset) // data_parallel_size)
    return reported(cycle_epochs(loader), micro_batch_size, report)

"""What a dataset did while loading samples (end-truncations, unreadable rows skipped), carried
with the samples and their micro-batch to the main process and counted there: DataLoader
workers load with their own copies of the dataset, so counters kept on the dataset never reach
the process that logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadNotes:
    """Notes of one sample or micro-batch: `truncated` holds (where, tokens before, tokens kept)
    per end-truncated sample, `skipped` (where, reason) per unreadable row passed over."""

    truncated: tuple[tuple[str, int, int], ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.truncated or self.skipped)

    @staticmethod
    def merge(notes: Iterable[LoadNotes]) -> LoadNotes:
        notes = list(notes)
        return LoadNotes(
            truncated=tuple(t for n in notes for t in n.truncated),
            skipped=tuple(s for n in notes for s in n.skipped),
        )


def log_on_rank0(message: str) -> None:
    """Warning from global rank 0 only (every process when not distributed)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    logger.warning(message)


class LoadReport:
    """Counts, in the process that iterates the loader, the samples loaded, those end-truncated
    and the distinct unreadable rows skipped (a row skipped again in a later epoch, or by
    another worker, counts once). Logs the first truncation when it arrives and a summary every
    `every` samples; the counts are this data-parallel rank's."""

    def __init__(self, label: str, every: int, log: Callable[[str], None] = log_on_rank0) -> None:
        self.label = label
        self.every = max(1, every)
        self.log = log
        self.samples = 0
        self.truncated = 0
        self.skipped: dict[str, str] = {}  # where -> reason, in the order first seen

    def add(self, samples: int, notes: LoadNotes | None) -> None:
        """Count one micro-batch of `samples` samples and its notes."""
        before = self.samples
        self.samples += samples
        if notes:
            if notes.truncated and not self.truncated:
                where, tokens, kept = notes.truncated[0]
                self.log(
                    f"{self.label}: {where} has {tokens} tokens; end-truncated to {kept} "
                    f"(--total-seq-length); further truncations are counted and reported every "
                    f"{self.every} samples"
                )
            self.truncated += len(notes.truncated)
            for where, reason in notes.skipped:
                self.skipped.setdefault(where, reason)
        if self.samples // self.every > before // self.every:
            self.report()

    def counts(self) -> dict[str, int]:
        return {"loaded": self.samples, "truncated": self.truncated, "skipped": len(self.skipped)}

    def report(self) -> dict[str, int]:
        """Log how many samples were truncated and how many distinct rows skipped so far."""
        if self.truncated:
            self.log(
                f"{self.label}: {self.truncated} of {self.samples} samples loaded on this rank so "
                "far were end-truncated to --total-seq-length"
            )
        if self.skipped:
            where, reason = next(iter(self.skipped.items()))
            self.log(
                f"{self.label}: {len(self.skipped)} distinct unreadable rows were skipped so far "
                f"({self.samples} samples loaded on this rank; first: {where}: {reason})"
            )
        return self.counts()

"""Tokens per second per GPU for megatron's training log: the training loader is wrapped so every
micro-batch's real (non-padding) tokens are counted on the CPU, with no GPU sync, and the wall
clock between iteration starts gives the rate. Intervals that contain an evaluation are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

# (iteration as megatron logs it, tokens/s/GPU, first and last iteration of the interval)
Report = Callable[[int, float, int, int], None]


class TokenThroughput:
    """Counts one data-parallel rank's tokens per iteration and reports tokens/s/GPU every
    `log_interval` iterations. Each model-parallel group (TP x CP x PP GPUs) shares one
    micro-batch stream, so a rank's rate per GPU is its tokens over time over that group size."""

    def __init__(
        self,
        log_interval: int,
        model_parallel_gpus: int,
        current_iteration: Callable[[], int],
        report: Report,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.log_interval = log_interval
        self.model_parallel_gpus = model_parallel_gpus
        self.current_iteration = current_iteration
        self.report = report
        self.clock = clock
        self.iteration: int | None = None
        self.interval_start: tuple[int, float] | None = None
        self.interval_tokens = 0
        self.pending_tokens = 0

    def count_batch(self, batch: dict[str, Any]) -> None:
        """Called for every training micro-batch, before it reaches the GPU."""
        iteration = self.current_iteration()
        if iteration != self.iteration:
            self._start_iteration(iteration)
        self.pending_tokens += int(batch["padding_mask"].numel() - batch["padding_mask"].sum())

    def interrupt(self) -> None:
        """Evaluation ran: the interval in progress no longer measures training alone."""
        self.interval_start = None
        self.interval_tokens = 0

    def _start_iteration(self, iteration: int) -> None:
        now = self.clock()
        if self.interval_start is not None:
            self.interval_tokens += self.pending_tokens
            first, started = self.interval_start
            done = iteration - first
            if done >= self.log_interval:
                rate = self.interval_tokens / (now - started) / self.model_parallel_gpus
                # megatron's 0-based `curr_iteration` k is the iteration its log calls k + 1.
                self.report(iteration, rate, first + 1, iteration)
                self.interval_start, self.interval_tokens = None, 0
        if self.interval_start is None:
            self.interval_start, self.interval_tokens = (iteration, now), 0
        self.iteration, self.pending_tokens = iteration, 0


def counted(loader: Iterator[dict[str, Any]], on_batch: Callable[[dict[str, Any]], None]):
    """Pass `loader`'s batches through, calling `on_batch` on each first."""
    for batch in loader:
        on_batch(batch)
        yield batch

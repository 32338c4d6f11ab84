"""Tokens and model FLOP/s per GPU for megatron's training log: the training loader is wrapped so
every micro-batch's real (non-padding) tokens and model FLOPs are counted on the CPU, with no GPU
sync, and the wall clock between iteration starts gives the rates. Intervals that contain an
evaluation are dropped. Also the GPUs' bf16 peaks and MFU, shared with the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

# Dense (no sparsity) bf16 peaks, TFLOP/s.
PEAK_BF16_TFLOPS: dict[str, float] = {"H100 SXM": 989.0, "H200": 989.0}

# (iteration as megatron logs it, tokens/s/GPU, FLOP/s/GPU, first and last iteration)
Report = Callable[[int, float, float, int, int], None]


class TokenThroughput:
    """Counts one data-parallel rank's tokens and FLOPs per iteration and reports them per second
    and GPU every `log_interval` iterations. Each model-parallel group (TP x CP x PP GPUs) shares
    one micro-batch stream, so a rank's rate per GPU is its count over time over that group size.
    `flops_of_batch` gives a micro-batch's training FLOPs (forward + backward)."""

    def __init__(
        self,
        log_interval: int,
        model_parallel_gpus: int,
        current_iteration: Callable[[], int],
        report: Report,
        flops_of_batch: Callable[[dict[str, Any]], float],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.log_interval = log_interval
        self.model_parallel_gpus = model_parallel_gpus
        self.current_iteration = current_iteration
        self.report = report
        self.flops_of_batch = flops_of_batch
        self.clock = clock
        self.iteration: int | None = None
        self.interval_start: tuple[int, float] | None = None
        self.interval_tokens, self.interval_flops = 0, 0.0
        self.pending_tokens, self.pending_flops = 0, 0.0  # of the iteration in progress

    def count_batch(self, batch: dict[str, Any]) -> None:
        """Called for every training micro-batch, before it reaches the GPU."""
        iteration = self.current_iteration()
        if iteration != self.iteration:
            self._start_iteration(iteration)
        self.pending_tokens += int(batch["padding_mask"].numel() - batch["padding_mask"].sum())
        self.pending_flops += self.flops_of_batch(batch)

    def interrupt(self) -> None:
        """Evaluation ran: the interval in progress no longer measures training alone."""
        self.interval_start = None

    def _start_iteration(self, iteration: int) -> None:
        now = self.clock()
        if self.interval_start is not None:
            self.interval_tokens += self.pending_tokens
            self.interval_flops += self.pending_flops
            first, started = self.interval_start
            if iteration - first >= self.log_interval:
                gpu_seconds = (now - started) * self.model_parallel_gpus
                # megatron's 0-based `curr_iteration` k is the iteration its log calls k + 1.
                self.report(
                    iteration,
                    self.interval_tokens / gpu_seconds,
                    self.interval_flops / gpu_seconds,
                    first + 1,
                    iteration,
                )
                self.interval_start = None
        if self.interval_start is None:
            self.interval_start = (iteration, now)
            self.interval_tokens, self.interval_flops = 0, 0.0
        self.iteration = iteration
        self.pending_tokens, self.pending_flops = 0, 0.0


def counted(loader: Iterator[dict[str, Any]], on_batch: Callable[[dict[str, Any]], None]):
    """Pass `loader`'s batches through, calling `on_batch` on each first."""
    for batch in loader:
        on_batch(batch)
        yield batch


def peak_tflops_of(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named like `torch.cuda.get_device_name()`, if listed (the H100
    SXM reports itself as "NVIDIA H100 80GB HBM3"; PCIe and NVL boards have lower peaks)."""
    if "H200" in device_name:
        return PEAK_BF16_TFLOPS["H200"]
    if "H100" in device_name and "HBM3" in device_name:
        return PEAK_BF16_TFLOPS["H100 SXM"]
    return None


def mfu(
    flops_per_step: float, step_seconds: float, num_gpus: int, peak_tflops: float = 989.0
) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over `num_gpus` x `peak_tflops` TFLOP/s."""
    if step_seconds <= 0 or num_gpus <= 0 or peak_tflops <= 0:
        raise ValueError("step_seconds, num_gpus and peak_tflops must be positive")
    return flops_per_step / (step_seconds * num_gpus * peak_tflops * 1e12)


def batch_lengths_and_grids(
    batch: dict[str, Any],
) -> tuple[list[int], list[tuple[int, int, int]]]:
    """A collated micro-batch's real (unpadded) sequence lengths, from `cu_seqlens` (THD) or the
    padding mask (BSHD), and its images' patch grids: what a model's `training_flops` takes."""
    if batch.get("cu_seqlens") is not None:
        lengths = batch["cu_seqlens"].diff().tolist()
    else:
        lengths = (~batch["padding_mask"]).sum(dim=1).tolist()
    vision = batch.get("vision")
    grids = [] if vision is None else [tuple(grid) for grid in vision.grid_thw.tolist()]
    return lengths, grids

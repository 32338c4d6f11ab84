"""The tokens/s/GPU and FLOP/s/GPU meter of the training log: counts real tokens and FLOPs per
iteration, reports once per log interval in megatron's iteration numbering, divides by the
model-parallel group, and drops intervals that contain an evaluation."""

from __future__ import annotations

import torch

from data.throughput import TokenThroughput, counted


class FakeRun:
    """megatron's iteration counter and a wall clock this test moves by hand."""

    def __init__(self) -> None:
        self.iteration = 0
        self.now = 0.0
        self.reports: list[tuple[int, float, float, int, int]] = []

    def meter(self, log_interval: int, model_parallel_gpus: int = 1) -> TokenThroughput:
        return TokenThroughput(
            log_interval,
            model_parallel_gpus,
            lambda: self.iteration,
            lambda *report: self.reports.append(report),
            flops_of_batch=lambda batch: 10.0 * int((~batch["padding_mask"]).sum()),
            clock=lambda: self.now,
        )


def batch(real: int, padding: int) -> dict[str, torch.Tensor]:
    return {"padding_mask": torch.tensor([[False] * real + [True] * padding])}


def test_rate_per_log_interval_counts_real_tokens_only():
    run = FakeRun()
    meter = run.meter(log_interval=2)
    for iteration, seconds in enumerate([1.0, 2.0, 2.0, 4.0, 4.0]):
        run.iteration = iteration
        for _ in range(2):  # two micro-batches per iteration
            meter.count_batch(batch(real=300, padding=100))
        run.now += seconds
    run.iteration = 5
    meter.count_batch(batch(real=300, padding=100))
    # Iterations 1-2 (0-based 0, 1): 1200 tokens in 3 s; 3-4: 1200 tokens in 6 s; 5 is pending.
    assert run.reports == [(2, 400.0, 4000.0, 1, 2), (4, 200.0, 2000.0, 3, 4)]


def test_rate_is_per_gpu_of_the_model_parallel_group():
    run = FakeRun()
    meter = run.meter(log_interval=1, model_parallel_gpus=4)
    meter.count_batch(batch(real=800, padding=0))
    run.now, run.iteration = 2.0, 1
    meter.count_batch(batch(real=800, padding=0))
    assert run.reports == [(1, 100.0, 1000.0, 1, 1)]


def test_evaluation_drops_the_interval_it_falls_in():
    run = FakeRun()
    meter = run.meter(log_interval=1)
    validation = list(counted(iter([batch(5, 0)]), lambda _: meter.interrupt()))
    training = counted(iter([batch(100, 0)] * 4), meter.count_batch)
    next(training)  # iteration 1
    run.now, run.iteration = 1.0, 1
    next(training)  # iteration 2; iteration 1 is reported
    run.now = 11.0
    meter.interrupt()  # evaluation after iteration 2 took 10 s
    run.iteration = 2
    next(training)  # iteration 3: the interval with the evaluation is not reported
    run.now, run.iteration = 12.0, 3
    next(training)
    assert len(validation) == 1
    assert run.reports == [(1, 100.0, 1000.0, 1, 1), (3, 100.0, 1000.0, 3, 3)]

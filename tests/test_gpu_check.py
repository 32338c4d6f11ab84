"""The GPU self-test's report of where its training step spent the time, read from megatron's log
lines (the checks themselves need a GPU: scripts/gpu_check.py runs them there)."""

from __future__ import annotations

from scripts.gpu_check import phases

MEGATRON_LOG = """\
[after megatron is initialized] datetime: 2026-11-30 06:40:01
time to initialize megatron (seconds): 21.734
(min, max) time across ranks (ms):
    model-and-optimizer-setup ......................: (3120.55, 3120.55)
    train/valid/test-data-iterators-setup ..........: (840.10, 840.10)
 [2026-11-30 06:40:20] iteration        1/       2 | elapsed time per iteration (ms): 15712.3 |
 [2026-11-30 06:40:29] iteration        2/       2 | elapsed time per iteration (ms): 8301.9 |
"""


def test_phases_name_initialisation_setup_and_each_iteration():
    assert phases(MEGATRON_LOG) == (
        "megatron initialisation 22 s, model-and-optimizer-setup 3.1 s, "
        "train/valid/test-data-iterators-setup 0.8 s, iterations 15.7 s / 8.3 s"
    )


def test_phases_say_when_the_log_has_none():
    assert phases("Traceback (most recent call last):") == "no megatron timings in the log"

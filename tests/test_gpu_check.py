"""The GPU self-test's report of where its training step spent the time, read from the arrival
times of the launcher's output lines (the checks themselves need a GPU: scripts/gpu_check.py runs
them there)."""

from __future__ import annotations

from scripts.gpu_check import timeline

LAUNCHER_OUTPUT = [
    (0.4, "run_qwen35_vl.sh: stdout and stderr also go to /tmp/run/logs/node0.log\n"),
    (2.3, "run_qwen35_vl.sh: python3 -m torch.distributed.run --nnodes 1 pretrain_multimodal.py\n"),
    (9.0, "UserWarning: Apex is not installed. Falling back to Torch Norm\n"),
    (21.5, "using world size: 1, data-parallel size: 1, context-parallel size: 1\n"),
    (24.8, "time to initialize megatron (seconds): 3.345\n"),
    (25.0, "[after megatron is initialized] datetime: 2026-11-30 08:40:16.090846\n"),
    (25.3, "training ...\n"),
    (35.0, " [2026-11-30 08:40:24.514062] iteration        1/       2 | elapsed time ...\n"),
    (39.9, " [2026-11-30 08:40:29.412345] iteration        2/       2 | elapsed time ...\n"),
    (40.0, "[after training is done] datetime: 2026-11-30 08:40:29.5\n"),
]


def test_timeline_names_every_interval_from_launch_to_exit():
    assert timeline(LAUNCHER_OUTPUT, 42.0, 42.5) == (
        "launcher checks 2.3 s, torchrun start and imports 19.2 s, megatron initialisation 3.3 s, "
        "model, optimizer and data setup 0.5 s, iteration 1 9.7 s, iteration 2 4.9 s, exit 2.1 s"
    )


def test_timeline_skips_intervals_whose_line_never_came():
    without_setup_line = [item for item in LAUNCHER_OUTPUT if item[1] != "training ...\n"]
    assert timeline(without_setup_line, 42.0, 42.0).endswith(
        "megatron initialisation 3.3 s, iteration 1 10.2 s, iteration 2 4.9 s, exit 2.1 s"
    )


def test_timeline_says_when_the_output_has_none():
    assert timeline([(1.0, "Traceback (most recent call last):\n")], 1.5, 1.5) == (
        "no launcher or megatron lines in the output"
    )


def test_timeline_names_children_that_keep_the_output_open():
    assert timeline(LAUNCHER_OUTPUT, 42.0, 110.0).endswith(
        "exit 2.1 s, output held open 68.0 s more by its children"
    )

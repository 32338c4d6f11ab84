"""Training through `scripts/run_qwen35_vl.sh` / megatron's `pretrain()` on one GPU: the loss falls
over 300 iterations, a run resumed from the iteration-100 checkpoint reproduces the uninterrupted
one, and a run killed with SIGKILL resumes from its last checkpoint. Run directly
(python tests/test_training_resume.py [OUT_DIR]); pytest skips it without CUDA.

Exactness: with DETERMINISTIC=1 (megatron's deterministic mode: torch Gated DeltaNet rule,
deterministic TE / cuBLAS / NCCL) resumed losses must equal the uninterrupted ones bit for bit
(float32 TensorBoard scalars; a 40-iteration pair resumed at 20). The default fast path uses fla's
Gated DeltaNet kernels, whose backward accumulates with atomics, so the same step can differ in
the last bits: there the resumed losses must agree to 1e-4 relative.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.gpu_harness import Check, print_table  # noqa: E402

ITERS = int(os.environ.get("VERIFY_TRAIN_ITERS", "300"))
SAVE_AT = int(os.environ.get("VERIFY_SAVE_AT", "100"))
KILL_ITERS, KILL_SAVE, KILL_AT = 60, 20, 50
COMMON = {
    "MODEL_VARIANT": "proxy",
    "SEQ_LEN": "2048",
    "GBS": "8",
    "MBS": "1",
    "EVAL_INTERVAL": "100",
}


def launch(out: str, name: str, extra_args: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    run_env = dict(os.environ, **COMMON, RUN_DIR=os.path.join(out, name), **env)
    log = open(os.path.join(out, f"{name}.log"), "w")  # noqa: SIM115 - closed by the caller's wait
    return subprocess.Popen(
        ["bash", os.path.join(REPO, "scripts", "run_qwen35_vl.sh"), *extra_args],
        env=run_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )


def run(out: str, name: str, extra_args: tuple[str, ...] = (), **env: str) -> str:
    process = launch(out, name, extra_args, **env)
    if process.wait() != 0:
        raise RuntimeError(f"{name} failed; see {out}/{name}.log")
    return os.path.join(out, name, "tensorboard")


def scalars(tensorboard_dir: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for root, _, files in os.walk(tensorboard_dir):
        for name in sorted(files):
            if name.startswith("events.out.tfevents"):
                events = EventAccumulator(os.path.join(root, name), size_guidance={"scalars": 0})
                events.Reload()
                if tag in events.Tags()["scalars"]:
                    values.update({e.step: e.value for e in events.Scalars(tag)})
    return values


def wait_for_iteration(log_path: str, iteration: int, process: subprocess.Popen) -> None:
    pattern = re.compile(rf"iteration\s+{iteration}/")
    while process.poll() is None:
        with open(log_path) as log:
            if pattern.search(log.read()):
                return
        time.sleep(0.5)
    raise RuntimeError(f"run ended before iteration {iteration}; see {log_path}")


def main(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    checks: list[Check] = []
    ckpt = os.path.join(out, "ckpt")
    full = scalars(
        run(out, "full", CKPT_SAVE=ckpt, TRAIN_ITERS=str(ITERS), SAVE_INTERVAL=str(SAVE_AT)),
        "lm loss",
    )
    first, last = full[1], sum(full[i] for i in range(ITERS - 9, ITERS + 1)) / 10
    ratio = last / first
    checks.append(Check("loss: mean of last 10 / first", ratio, 0.7, f"{first:.3f} -> {last:.3f}"))

    stop = SAVE_AT + 50
    resumed = scalars(
        run(
            out,
            "resumed",
            ("--ckpt-step", str(SAVE_AT), "--exit-interval", str(stop)),
            CKPT_LOAD=ckpt,
            TRAIN_ITERS=str(ITERS),
        ),
        "lm loss",
    )
    steps = range(SAVE_AT + 1, stop + 1)
    worst = max(abs(resumed[i] - full[i]) / abs(full[i]) for i in steps)
    exact = sum(resumed[i] == full[i] for i in steps)
    checks.append(
        Check(
            f"fla path, resume at {SAVE_AT}: max rel loss difference",
            worst,
            1e-4,
            f"iterations {SAVE_AT + 1}-{stop}, {exact}/{len(steps)} bitwise equal",
        )
    )

    det = dict(DETERMINISTIC="1", TRAIN_ITERS="40", SAVE_INTERVAL="20")
    det_ckpt = os.path.join(out, "det_ckpt")
    det_full = scalars(run(out, "det_full", CKPT_SAVE=det_ckpt, **det), "lm loss")
    det_resumed = scalars(
        run(out, "det_resumed", ("--ckpt-step", "20"), CKPT_LOAD=det_ckpt, **det), "lm loss"
    )
    mismatched = [i for i in range(21, 41) if det_resumed.get(i) != det_full[i]]
    checks.append(
        Check(
            "deterministic, resume at 20: iterations not bitwise equal",
            len(mismatched),
            0,
            f"20 compared; first differing: {mismatched[:3]}",
        )
    )

    kill_dir = os.path.join(out, "kill_ckpt")
    env = dict(TRAIN_ITERS=str(KILL_ITERS), SAVE_INTERVAL=str(KILL_SAVE), CKPT_SAVE=kill_dir)
    process = launch(out, "killed", **env)
    wait_for_iteration(os.path.join(out, "killed.log"), KILL_AT, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    after = scalars(run(out, "after_kill", CKPT_LOAD=kill_dir, **env), "lm loss")
    restart = min(after) - 1
    checks.append(
        Check(
            "after kill -9: restarted from last checkpoint",
            abs(restart - (KILL_AT // KILL_SAVE) * KILL_SAVE),
            0,
            f"killed at {KILL_AT}, resumed at {restart + 1}, reached {max(after)}/{KILL_ITERS}",
        )
    )
    checks.append(Check("after kill -9: reached the last iteration", KILL_ITERS - max(after), 0))
    return 0 if print_table("Training: loss, resume, kill -9 (proxy, 1 GPU)", checks) else 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_resume(tmp_path):
    assert main(str(tmp_path)) == 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="train_verify_")))

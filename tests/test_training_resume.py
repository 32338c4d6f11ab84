"""Training through `scripts/run_qwen35_vl.sh` / megatron's `pretrain()` on one GPU: the loss falls
over 300 iterations, a run resumed from the iteration-100 checkpoint reproduces the uninterrupted
one, and a run killed with SIGKILL resumes from its last checkpoint. Run directly
(python tests/test_training_resume.py [OUT_DIR]); pytest skips it without CUDA.

Exactness: with DETERMINISTIC=1 (megatron's deterministic mode: torch Gated DeltaNet rule,
deterministic TE / cuBLAS / NCCL) resumed losses must equal the uninterrupted ones bit for bit
(float32 TensorBoard scalars; a 40-iteration pair resumed at 20). The default fast path uses fla's
Gated DeltaNet kernels, whose backward accumulates with atomics, so two runs of the same steps
part in the last bits and the gap grows: there the resumed run may differ from the uninterrupted
one by no more than a second uninterrupted run does over the same iterations (mean relative
difference; the second run has drifted since iteration 1, the resumed one only since the resume).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from scripts.plot_training import read_scalars  # noqa: E402
from tests.gpu_harness import Check, free_port, print_table  # noqa: E402

ITERS = int(os.environ.get("VERIFY_TRAIN_ITERS", "300"))
SAVE_AT = int(os.environ.get("VERIFY_SAVE_AT", "100"))
KILL_ITERS, KILL_SAVE, KILL_AT = 80, 20, 50
COMMON = {
    "MODEL_VARIANT": "proxy",
    "SEQ_LEN": "1024",  # keeps the whole check inside one 10-minute device call
    "GBS": "8",
    "MBS": "1",
    "EVAL_INTERVAL": "100",
}


def launch(out: str, name: str, extra_args: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    run_env = dict(os.environ, **COMMON, RUN_DIR=os.path.join(out, name), **env)
    run_env["MASTER_PORT"] = str(free_port())  # runs share the machine concurrently
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


def wait_for_iteration(log_path: str, iteration: int, process: subprocess.Popen) -> None:
    pattern = re.compile(rf"iteration\s+{iteration}/")
    while process.poll() is None:
        with open(log_path) as log:
            if pattern.search(log.read()):
                return
        time.sleep(0.5)
    raise RuntimeError(f"run ended before iteration {iteration}; see {log_path}")


def kill_process_tree(pid: int) -> None:
    """SIGKILL a launcher and everything below it: torchrun starts each worker in a session of its
    own, so killing the launcher's process group alone leaves the training process running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we listed
            children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    for member in reversed(tree):  # the workers first, so no launcher restarts them
        with contextlib.suppress(ProcessLookupError):  # it ended by itself meanwhile
            os.kill(member, signal.SIGKILL)


def relative_differences(one: dict[int, float], two: dict[int, float], steps: range) -> list[float]:
    return [abs(two[i] - one[i]) / abs(one[i]) for i in steps]


def check_resume(out: str, ckpt: str, full: dict[int, float]) -> list[Check]:
    stop = SAVE_AT + 50
    window = ("--exit-interval", str(stop))
    resumed = read_scalars(
        run(
            out,
            "resumed",
            ("--ckpt-step", str(SAVE_AT), *window),
            CKPT_LOAD=ckpt,
            TRAIN_ITERS=str(ITERS),
        ),
        "lm loss",
    )
    again = read_scalars(run(out, "full_again", window, TRAIN_ITERS=str(ITERS)), "lm loss")
    steps = range(SAVE_AT + 1, stop + 1)
    resumed_rel = relative_differences(full, resumed, steps)
    noise_rel = relative_differences(full, again, steps)
    exact = sum(resumed[i] == full[i] for i in steps)
    return [
        Check(
            f"fla path, resume at {SAVE_AT}: mean rel loss difference to the uninterrupted run",
            sum(resumed_rel) / len(steps),
            sum(noise_rel) / len(steps),
            f"iterations {SAVE_AT + 1}-{stop}; limit: a second uninterrupted run's; max "
            f"{max(resumed_rel):.2e} (second run {max(noise_rel):.2e}); "
            f"{exact}/{len(steps)} bitwise equal",
        )
    ]


def check_deterministic_resume(out: str) -> list[Check]:
    det = dict(DETERMINISTIC="1", TRAIN_ITERS="40", SAVE_INTERVAL="20")
    det_ckpt = os.path.join(out, "det_ckpt")
    det_full = read_scalars(run(out, "det_full", CKPT_SAVE=det_ckpt, **det), "lm loss")
    det_resumed = read_scalars(
        run(out, "det_resumed", ("--ckpt-step", "20"), CKPT_LOAD=det_ckpt, **det), "lm loss"
    )
    mismatched = [i for i in range(21, 41) if det_resumed.get(i) != det_full[i]]
    return [
        Check(
            "deterministic, resume at 20: iterations not bitwise equal",
            len(mismatched),
            0,
            f"20 compared; first differing: {mismatched[:3]}",
        )
    ]


def check_kill_and_resume(out: str) -> list[Check]:
    kill_dir = os.path.join(out, "kill_ckpt")
    env = dict(TRAIN_ITERS=str(KILL_ITERS), SAVE_INTERVAL=str(KILL_SAVE), CKPT_SAVE=kill_dir)
    process = launch(out, "killed", **env)
    killed_log = os.path.join(out, "killed.log")
    wait_for_iteration(killed_log, KILL_AT, process)
    kill_process_tree(process.pid)
    process.wait()
    time.sleep(2)  # anything that survived the kill would log further iterations meanwhile
    with open(killed_log) as log:
        last_logged = max(int(i) for i in re.findall(r"iteration\s+(\d+)/", log.read()))
    after = read_scalars(run(out, "after_kill", CKPT_LOAD=kill_dir, **env), "lm loss")
    restart = min(after) - 1
    return [
        Check(
            "kill -9: iterations logged after the kill",
            max(0, last_logged - KILL_AT - 1),
            0,
            f"killed on seeing iteration {KILL_AT} of {KILL_ITERS}; last logged {last_logged}",
        ),
        Check(
            "after kill -9: restarted from last checkpoint",
            abs(restart - (last_logged // KILL_SAVE) * KILL_SAVE),
            0,
            f"resumed at {restart + 1}, reached {max(after)}/{KILL_ITERS}",
        ),
        Check("after kill -9: reached the last iteration", KILL_ITERS - max(after), 0),
    ]


def main(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    checks: list[Check] = []
    ckpt = os.path.join(out, "ckpt")
    full_dir = run(out, "full", CKPT_SAVE=ckpt, TRAIN_ITERS=str(ITERS), SAVE_INTERVAL=str(SAVE_AT))
    full = read_scalars(full_dir, "lm loss")
    first, last = full[1], sum(full[i] for i in range(ITERS - 9, ITERS + 1)) / 10
    ratio = last / first
    checks.append(Check("loss: mean of last 10 / first", ratio, 0.7, f"{first:.3f} -> {last:.3f}"))
    # Reported now, so that a device call cut short during the resume checks keeps them.
    print_table("Training: uninterrupted run (proxy, 1 GPU)", checks)
    print_throughput(full_dir)
    sys.stdout.flush()

    # The checks below are independent of each other and short, so they share the GPU
    # concurrently; only the uninterrupted run above (whose throughput is reported) runs alone.
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [
            pool.submit(check_resume, out, ckpt, full),
            pool.submit(check_deterministic_resume, out),
            pool.submit(check_kill_and_resume, out),
        ]
        resume_checks = [check for future in futures for check in future.result()]
    passed = print_table("Training: resume, kill -9 (proxy, 1 GPU)", resume_checks)
    return 0 if passed and all(check.passed for check in checks) else 1


def print_throughput(tensorboard_dir: str) -> None:
    """The uninterrupted run's speed (measured alone on the GPU), for the results table."""
    tags = ("tokens-per-sec-per-gpu", "model-tflops-per-gpu", "iteration-time")
    rates, tflops, times = (read_scalars(tensorboard_dir, tag) for tag in tags)

    def median_after_warmup(values: dict[int, float]) -> float:
        steady = sorted(v for i, v in values.items() if i > 10)
        return steady[len(steady) // 2] if steady else float("nan")

    print(
        f"| throughput of the uninterrupted run | {median_after_warmup(rates):,.0f} tokens/s/GPU, "
        f"{median_after_warmup(tflops):.1f} model TFLOP/s/GPU | median of iterations 11-"
        f"{max(rates, default=0)}, {1000 * median_after_warmup(times):.0f} ms/iteration |"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_resume(tmp_path):
    assert main(str(tmp_path)) == 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="train_verify_")))

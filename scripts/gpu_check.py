"""GPU self-test after setup: prints the stack (torch, CUDA, cuDNN of torch and of Transformer
Engine, TE, fla and its Gated DeltaNet backend, Triton, megatron-core, transformers), then runs on
this GPU a Gated DeltaNet forward + backward against HF's torch reference, TE's packed (THD)
attention backward at head dim 256 against fp32, and one proxy training step through the launcher.
Exits non-zero, naming the fix, when something is wrong.

    .venv/bin/python -m scripts.gpu_check        (source scripts/torch_cudnn.sh first)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# bf16 kernels against fp32 references: bf16 rounding gives ~4e-3 per element, products in the
# backward a few times that (the same bound as tests/test_te_thd_attention.py).
BF16_LIMIT = 2e-2
# fla 0.6 refuses Gated DeltaNet backward on Hopper with these Triton versions (they compute wrong
# gradients there, fla issue 640) unless its tilelang backend is installed.
TRITON_WRONG_ON_HOPPER = ((3, 4), (3, 7, 1))


def version_of(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as error:
        return f"MISSING ({type(error).__name__}: {error})"


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def stack_report() -> list[str]:
    """Versions, and the problems found among them (each naming its fix)."""
    from models.qwen35_vl.factory import cudnn_version_tuple

    problems = []
    print(f"GPU: {torch.cuda.get_device_name()} (compute {torch.cuda.get_device_capability()})")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    try:
        print(f"cuDNN (torch): {cudnn_version_tuple(torch.backends.cudnn.version())}")
    except RuntimeError as error:
        print(f"cuDNN (torch): {str(error).split('. ')[0]}")
    for module in ("transformer_engine", "megatron.core", "transformers", "fla", "triton"):
        print(f"{module}: {version_of(module)}")
    have_tilelang = importlib.util.find_spec("tilelang") is not None
    triton = version_tuple(version_of("triton"))
    hopper = torch.cuda.get_device_capability()[0] == 9
    wrong_triton = TRITON_WRONG_ON_HOPPER[0] <= triton < TRITON_WRONG_ON_HOPPER[1]
    backend = "tilelang" if have_tilelang and hopper and wrong_triton else "triton"
    print(f"Gated DeltaNet backward backend: {backend} (tilelang {version_of('tilelang')})")
    if hopper and wrong_triton and not have_tilelang:
        problems.append(
            f"Triton {'.'.join(map(str, triton))} on Hopper needs fla's tilelang backend for Gated "
            "DeltaNet backward: pip install tilelang==0.1.15 (see requirements-gpu.txt)"
        )
    try:
        from transformer_engine.pytorch.utils import get_cudnn_version

        from models.qwen35_vl.factory import require_matching_cudnn

        print(f"cuDNN (Transformer Engine): {tuple(get_cudnn_version())}")
        require_matching_cudnn()
    except RuntimeError as error:
        problems.append(str(error))
    except ImportError as error:
        problems.append(f"Transformer Engine does not import ({error}): WITH_GPU=1 bash setup.sh")
    return problems


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).norm() / reference.norm())


def gated_deltanet_check() -> list[str]:
    """fla's chunked kernel (bf16) against HF's torch reference (fp32), forward and backward."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from models.qwen35_vl.configuration import get_variant

    # The proxy's Gated DeltaNet shape (value heads, head dim) and sequence: fla and tilelang
    # compile and autotune per shape, so a machine that trained the proxy has these kernels.
    text = get_variant("proxy").text
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, tokens, heads, dim = 1, 1024, text.linear_num_value_heads, text.linear_key_head_dim

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator)

    inputs = {
        "q": randn(batch, tokens, heads, dim),
        "k": randn(batch, tokens, heads, dim),
        "v": randn(batch, tokens, heads, dim),
        "g": -torch.nn.functional.softplus(randn(batch, tokens, heads)),
        "beta": torch.sigmoid(randn(batch, tokens, heads)),
    }
    upstream = randn(batch, tokens, heads, dim)
    results = {}
    for side in ("fla", "torch"):
        leaves = {
            name: (x.bfloat16() if side == "fla" and name != "g" else x).clone().requires_grad_()
            for name, x in inputs.items()
        }
        kernel = chunk_gated_delta_rule if side == "fla" else torch_chunk_gated_delta_rule
        output, _ = kernel(
            leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"],
            use_qk_l2norm_in_kernel=True,
        )  # fmt: skip
        (output.float() * upstream).sum().backward()
        results[side] = {"output": output, **{f"d{n}": leaf.grad for n, leaf in leaves.items()}}
    problems = []
    for name, reference in results["torch"].items():
        error = relative(results["fla"][name], reference)
        ok = error <= BF16_LIMIT
        print(f"  Gated DeltaNet {name:7s} fla bf16 vs torch fp32: rel {error:.2e} "
              f"(limit {BF16_LIMIT:g}) {'ok' if ok else 'FAIL'}")  # fmt: skip
        if not ok:
            problems.append(
                f"Gated DeltaNet {name} differs from the torch reference by {error:.2e}: check "
                "fla's backend above (tilelang on Hopper with Triton < 3.7.1)"
            )
    return problems


def te_thd_attention_check() -> list[str]:
    """TE's THD attention backward at head dim 256 on a pack of three, against fp32."""
    from tests.test_te_thd_attention import pack_checks

    problems = []
    for check in pack_checks((440, 272, 632), grad_scale=1.0, strided_value=True):
        print(f"  TE THD attention {check.name}: {check.measured:.2e} (limit {check.limit:g}) "
              f"{'ok' if check.passed else 'FAIL'}")  # fmt: skip
        if not check.passed:
            problems.append(
                f"TE THD attention: {check.name} = {check.measured:.2e}; run TE on torch's cuDNN "
                "(source scripts/torch_cudnn.sh) and see README's GPU machines section"
            )
    return problems


class TrainingStep:
    """Two proxy iterations through scripts/run_qwen35_vl.sh, started in the background: most of
    its time is start-up on the CPU, which the in-process checks overlap. Each output line is
    stamped on arrival, so the report says where the time went."""

    def __init__(self) -> None:
        from tests.gpu_harness import free_port

        self.run_dir = tempfile.TemporaryDirectory(prefix="gpu_check_")
        env = dict(
            os.environ,
            MODEL_VARIANT="proxy", TRAIN_ITERS="2", WARMUP_ITERS="1", SEQ_LEN="1024",
            MBS="1", GBS="1", GPUS_PER_NODE="1", NUM_WORKERS="1", EVAL_ITERS="0",
            EVAL_INTERVAL="1000", RUN_DIR=self.run_dir.name, MASTER_PORT=str(free_port()),
            PYTHONUNBUFFERED="1",
        )  # fmt: skip
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["bash", os.path.join(REPO, "scripts", "run_qwen35_vl.sh")],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.exited = self.closed = 0.0
        # Stamped as they happen, whatever the main thread is checking meanwhile.
        self.watchers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._wait, daemon=True),
        ]
        for watcher in self.watchers:
            watcher.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic() - self.started, line))
        self.closed = time.monotonic() - self.started  # every holder of the pipe is gone

    def _wait(self) -> None:
        self.process.wait()
        self.exited = time.monotonic() - self.started

    def check(self) -> list[str]:
        """Wait for the run; the losses must be finite."""
        for watcher in self.watchers:
            watcher.join()
        code, seconds = self.process.returncode, max(self.exited, self.closed)
        self.run_dir.cleanup()
        log = "".join(line for _, line in self.lines)
        losses = [float(x) for x in re.findall(r"\| lm loss: ([0-9.eE+-]+|nan|inf)", log)]
        print(f"  proxy training: exit {code}, lm loss {losses}, {seconds:.0f} s")
        print(f"  where its time went: {timeline(self.lines, self.exited, self.closed)}")
        if code != 0 or len(losses) != 2 or not all(map(_finite, losses)):
            tail = "\n    ".join(log.strip().splitlines()[-8:])
            return [f"the proxy training step failed (exit {code}):\n    {tail}"]
        return []


# Each interval of a launcher run, named by what happens in it, ends at the first line matching
# its pattern (megatron prints 'using world size' when it parses its arguments, right after the
# imports); every iteration line ends one more interval.
START_UP_INTERVALS = (
    ("launcher checks", r"^run_qwen35_vl\.sh: \S*python\S* -m torch\.distributed\.run"),
    ("torchrun start and imports", r"^using world size:"),
    ("megatron initialisation", r"^time to initialize megatron"),
    ("model, optimizer and data setup", r"^training \.\.\.$"),
)
ITERATION_LINE = re.compile(r"\] iteration +(\d+)/")


def timeline(lines: list[tuple[float, str]], exit_seconds: float, closed_seconds: float) -> str:
    """'name 1.2 s, ...' for each interval of the run found in its stamped output lines; the
    output can close after the launcher exits, while processes it started still hold it."""
    found, previous, intervals = [], 0.0, iter(START_UP_INTERVALS)
    name, pattern = next(intervals)
    for seconds, line in lines:
        iteration = ITERATION_LINE.search(line)
        if pattern and re.search(pattern, line.strip()):
            found.append(f"{name} {seconds - previous:.1f} s")
            previous = seconds
            name, pattern = next(intervals, (None, None))
        elif iteration:
            found.append(f"iteration {iteration.group(1)} {seconds - previous:.1f} s")
            previous, pattern = seconds, None
    if not found:
        return "no launcher or megatron lines in the output"
    found.append(f"exit {exit_seconds - previous:.1f} s")
    if closed_seconds - exit_seconds >= 1.0:
        found.append(f"output held open {closed_seconds - exit_seconds:.1f} s more by its children")
    return ", ".join(found)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch; this self-test runs on a GPU machine")
        return 1
    started = time.monotonic()
    problems = stack_report()
    # The training step, mostly start-up on the CPU, runs while this process checks kernels. It
    # starts after the stack report: started before it, the self-test took 58 s once and ran
    # past 100 s the next time, stuck in this process's Gated DeltaNet kernel compilation
    # (2 x H200, 2026-11-30).
    training = TrainingStep()
    for title, check in (
        ("Gated DeltaNet forward + backward", gated_deltanet_check),
        ("TE THD attention backward, head dim 256", te_thd_attention_check),
        ("one proxy training step (in the background)", training.check),
    ):
        print(f"{title}:")
        check_started = time.monotonic()
        try:
            problems += check()
        except Exception as error:
            problems.append(f"{title} raised {type(error).__name__}: {error}")
        print(f"  ({title}: {time.monotonic() - check_started:.1f} s)")
    print(f"gpu_check: {time.monotonic() - started:.0f} s")
    for problem in problems:
        print(f"FAIL: {problem}")
    print("gpu_check: all checks passed" if not problems else f"gpu_check: {len(problems)} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

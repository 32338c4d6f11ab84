"""The launcher matrix: every documented configuration of `scripts/run_qwen35_vl.sh` trains for a
few iterations on the local GPUs, and one markdown table reports, per configuration, the
iteration-1 lm loss against the 1-GPU run of the same data, the last loss, NaN / skipped
iterations, the median step time, peak memory, and `pass`, `refused: <message>` or `FAIL`.

    python scripts/launcher_matrix.py OUT_DIR [--jobs 8] [--only NAME ...] [--ckpt-dir DIR]
    python scripts/launcher_matrix.py OUT_DIR --table-only    # the table of what OUT_DIR holds

Runs share the GPUs concurrently (`--jobs` at once; one-GPU runs alternate between GPUs), so
step times are not performance figures. Finished runs (OUT_DIR/NAME.rc) are not run again;
checkpoints go to --ckpt-dir (default OUT_DIR/checkpoints).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from scripts.plot_training import read_scalars  # noqa: E402

# bf16 logits sit within 7.6e-3 of fp32 (docs/results.md, HF parity), so the same first batch
# through another layout or batch format must agree to 1e-2 relative.
FIRST_LOSS_LIMIT = 1e-2
COMMON = {
    "TRAIN_ITERS": "20",
    "WARMUP_ITERS": "5",
    "SEQ_LEN": "1024",
    "MBS": "1",
    "GBS": "4",
    "EVAL_INTERVAL": "1000",
    "EVAL_ITERS": "0",
}


@dataclass(frozen=True)
class Run:
    """One launcher invocation. `reference`: the run whose iteration-1 loss this one must match;
    `equal_to`: a run whose losses this one must reproduce bit for bit on their common
    iterations; `after`: a run that must finish first (a resume reads its checkpoint)."""

    name: str
    env: dict[str, str]
    gpus: int = 1
    reference: str | None = None
    equal_to: str | None = None
    after: str | None = None
    args: tuple[str, ...] = ()
    expect_refusal: bool = False
    profile: bool = False
    uses_cord: bool = False


def model_runs(variant: str, prefix: str) -> list[Run]:
    """The layouts both models train in, each BSHD and packed (THD)."""
    base = {"MODEL_VARIANT": variant}
    reference = f"{prefix}_1gpu"
    runs = []
    layouts: list[tuple[str, int, dict[str, str]]] = [
        ("1gpu", 1, {}),
        ("tp2", 2, {"TP": "2"}),
        ("cp2_p2p", 2, {"CP": "2"}),
        ("cp2_a2a", 2, {"CP": "2", "CP_COMM_TYPE": "a2a"}),
        ("cp2_allgather", 2, {"CP": "2", "CP_COMM_TYPE": "allgather"}),
        ("fsdp", 2, {"FSDP": "1"}),
    ]
    if variant.endswith("moe"):
        layouts += [("ep2", 2, {"EP": "2"}), ("cp2_ep2", 2, {"CP": "2", "EP": "2"})]
    for (layout, gpus, env), packed in itertools.product(layouts, ("0", "1")):
        name = f"{prefix}_{layout}" + ("_packed" if packed == "1" else "")
        runs.append(
            Run(
                name,
                {**base, **env, "PACKED": packed},
                gpus=gpus,
                reference=None if name == reference else reference,
            )
        )
    return runs


def feature_runs() -> list[Run]:
    """Launcher features on the proxies, each against its model's 1-GPU BSHD run."""
    proxy = {"MODEL_VARIANT": "proxy"}
    torch_experts = {"MODEL_VARIANT": "proxy-moe", "EXPERT_GEMM": "torch"}
    deterministic = {**proxy, "DETERMINISTIC": "1"}
    checkpoint = os.path.join("{ckpt}", "proxy_det")
    checkpoint_tp2 = os.path.join("{ckpt}", "proxy_tp2_det")
    checkpoint_experts = os.path.join("{ckpt}", "moe_ep2_torch_experts_det")
    # Mock samples give at most half of their 1,024 tokens (2,048 patches) to 1-3 images.
    vision_graphs = {
        "VISION_CUDA_GRAPH": "1",
        "VISION_GRAPH_PATCHES": "2048",
        "VISION_GRAPH_IMAGES": "3",
    }
    return [
        Run("proxy_recompute", {**proxy, "RECOMPUTE": "1"}, reference="proxy_1gpu"),
        Run("proxy_recompute_vision", {**proxy, "RECOMPUTE_VISION": "1"}, reference="proxy_1gpu"),
        Run("proxy_vision_cuda_graph", {**proxy, **vision_graphs}, reference="proxy_1gpu"),
        # The graphs under data parallelism (2 ranks) and with the MoE's expert parallelism.
        Run(
            "proxy_dp2_vision_cuda_graph",
            {**proxy, **vision_graphs},
            gpus=2,
            reference="proxy_1gpu",
        ),
        Run(
            "moe_ep2_vision_cuda_graph_packed",
            {"MODEL_VARIANT": "proxy-moe", "EP": "2", "PACKED": "1", **vision_graphs},
            gpus=2,
            reference="moe_1gpu",
        ),
        Run("proxy_mtp0", {**proxy, "MTP_NUM_LAYERS": "0"}, reference="proxy_1gpu"),
        Run("proxy_mtp2", {**proxy, "MTP_NUM_LAYERS": "2"}, reference="proxy_1gpu"),
        Run("moe_torch_experts", torch_experts, reference="moe_1gpu"),
        # The MoE rows take the stacked experts by default (EXPERT_GEMM=auto); TE's layers here.
        Run(
            "moe_te_experts",
            {"MODEL_VARIANT": "proxy-moe", "EXPERT_GEMM": "te"},
            reference="moe_1gpu",
        ),
        Run(
            "moe_ep2_torch_experts_packed",
            {**torch_experts, "EP": "2", "PACKED": "1"},
            gpus=2,
            reference="moe_1gpu",
        ),
        # The stacked expert weights through a distributed checkpoint (one tensor per global
        # expert index across EP=2) and back: the resumed run must repeat the saved one bitwise.
        Run(
            "moe_ep2_torch_experts_det",
            {
                **torch_experts,
                "EP": "2",
                "DETERMINISTIC": "1",
                "CKPT_SAVE": checkpoint_experts,
                "SAVE_INTERVAL": "10",
            },
            gpus=2,
            reference="moe_1gpu",
        ),
        Run(
            "moe_ep2_torch_experts_det_resume10",
            {**torch_experts, "EP": "2", "DETERMINISTIC": "1", "CKPT_LOAD": checkpoint_experts},
            gpus=2,
            args=("--ckpt-step", "10"),
            after="moe_ep2_torch_experts_det",
            equal_to="moe_ep2_torch_experts_det",
        ),
        # The deterministic pair; the first also saves at 10 and 20 for the resume below.
        Run(
            "proxy_det",
            {**deterministic, "CKPT_SAVE": checkpoint, "SAVE_INTERVAL": "10"},
            reference="proxy_1gpu",
        ),
        Run("proxy_det_again", deterministic, reference="proxy_1gpu", equal_to="proxy_det"),
        Run(
            "proxy_det_resume10",
            {**deterministic, "CKPT_LOAD": checkpoint},
            args=("--ckpt-step", "10"),
            after="proxy_det",
            equal_to="proxy_det",
        ),
        Run(
            "proxy_tp2_det",
            {**deterministic, "TP": "2", "CKPT_SAVE": checkpoint_tp2, "SAVE_INTERVAL": "10"},
            gpus=2,
            reference="proxy_1gpu",
        ),
        Run(
            "proxy_tp2_det_resume10",
            {**deterministic, "TP": "2", "CKPT_LOAD": checkpoint_tp2},
            gpus=2,
            args=("--ckpt-step", "10"),
            after="proxy_tp2_det",
            equal_to="proxy_tp2_det",
        ),
        Run(
            "proxy_profile_torch",
            {**proxy, "PROFILE": "torch", "PROFILE_STEPS": "5:7"},
            reference="proxy_1gpu",
            profile=True,
        ),
        Run("proxy_cord", {**proxy, "DATASET": "cord_v2", "PACKED": "0"}, uses_cord=True),
        Run(
            "proxy_cord_packed",
            {**proxy, "DATASET": "cord_v2", "PACKED": "1"},
            reference="proxy_cord",
            uses_cord=True,
        ),
        # Layouts the launcher must refuse, with its message.
        Run("refuse_det_packed", {**deterministic, "PACKED": "1"}, expect_refusal=True),
        Run("refuse_ep2_dense", {**proxy, "EP": "2"}, gpus=2, expect_refusal=True),
        Run("refuse_pp2", {**proxy, "PP": "2"}, gpus=2, expect_refusal=True),
    ]


def qwen3_vl_runs() -> list[Run]:
    """The second model family (`MODEL=qwen3_vl`): both batch formats, every kind of layout and
    the vision recompute, against its own 1-GPU BSHD runs; full-layer recompute is refused."""
    dense = {"MODEL": "qwen3_vl", "MODEL_VARIANT": "proxy"}
    moe = {**dense, "MODEL_VARIANT": "proxy-moe"}
    layouts = [
        ("1gpu", 1, dense, {"PACKED": "0"}),
        ("1gpu_packed", 1, dense, {"PACKED": "1"}),
        ("tp2_packed", 2, dense, {"TP": "2", "PACKED": "1"}),
        ("cp2_p2p", 2, dense, {"CP": "2", "PACKED": "0"}),
        ("cp2_p2p_packed", 2, dense, {"CP": "2", "PACKED": "1"}),
        ("fsdp_packed", 2, dense, {"FSDP": "1", "PACKED": "1"}),
        ("recompute_vision", 1, dense, {"RECOMPUTE_VISION": "1", "PACKED": "0"}),
        ("moe_1gpu", 1, moe, {"PACKED": "0"}),
        ("moe_ep2_packed", 2, moe, {"EP": "2", "PACKED": "1"}),
        ("moe_cp2_ep2", 2, moe, {"CP": "2", "EP": "2", "PACKED": "0"}),
    ]
    runs = []
    for layout, gpus, model, env in layouts:
        reference = "qwen3vl_moe_1gpu" if model is moe else "qwen3vl_1gpu"
        name = f"qwen3vl_{layout}"
        runs.append(
            Run(name, {**model, **env}, gpus, reference=None if name == reference else reference)
        )
    runs.append(Run("refuse_qwen3vl_recompute", {**dense, "RECOMPUTE": "1"}, expect_refusal=True))
    return runs


def all_runs() -> list[Run]:
    return [
        *model_runs("proxy", "proxy"),
        *model_runs("proxy-moe", "moe"),
        *feature_runs(),
        *qwen3_vl_runs(),
    ]


@dataclass
class Outcome:
    run: Run
    returncode: int
    log: str
    tensorboard: str
    extra_failures: list[str] = field(default_factory=list)


class Scheduler:
    """Starts runs as their prerequisites finish, `jobs` at a time; one-GPU runs alternate GPUs."""

    def __init__(self, out: str, ckpt: str, gpus: int, jobs: int) -> None:
        self.out, self.ckpt, self.gpus, self.jobs = out, ckpt, gpus, jobs
        self.next_gpu = itertools.cycle(range(gpus))
        self.lock = threading.Lock()
        self.started = time.monotonic()

    def launch(self, run: Run) -> int:
        from tests.gpu_harness import free_port

        with self.lock:
            devices = (
                str(next(self.next_gpu)) if run.gpus == 1 else ",".join(map(str, range(run.gpus)))
            )
        env = dict(os.environ, **COMMON)
        env.update({key: value.format(ckpt=self.ckpt) for key, value in run.env.items()})
        env.update(
            RUN_DIR=os.path.join(self.out, run.name),
            MASTER_PORT=str(free_port()),
            CUDA_VISIBLE_DEVICES=devices,
            GPUS_PER_NODE=str(run.gpus),
        )
        if run.uses_cord:
            env.update(
                DATA_PATH=os.path.join(self.out, "cord_data"),
                HF_TOKENIZER_PATH=os.path.join(self.out, "cord_data", "tokenizer"),
            )
        log_path = os.path.join(self.out, f"{run.name}.log")
        with open(log_path, "w") as log:
            code = subprocess.call(
                ["bash", os.path.join(REPO, "scripts", "run_qwen35_vl.sh"), *run.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        with open(os.path.join(self.out, f"{run.name}.rc"), "w") as marker:
            marker.write(str(code))
        print(f"[{time.monotonic() - self.started:6.0f} s] {run.name}: exit {code}", flush=True)
        return code

    def run_all(self, runs: list[Run]) -> None:
        done: dict[str, threading.Event] = {run.name: threading.Event() for run in runs}
        for run in runs:
            if os.path.exists(os.path.join(self.out, f"{run.name}.rc")):
                done[run.name].set()

        def worker(run: Run) -> None:
            if run.after and run.after in done:
                done[run.after].wait()
            try:
                self.launch(run)
            finally:
                done[run.name].set()

        # Prerequisites first, so a waiting resume never holds a slot its checkpoint needs.
        pending = [run for run in runs if not done[run.name].is_set()]
        pending.sort(key=lambda run: run.after is not None)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            list(pool.map(worker, pending))


def logged_counts(log: str) -> tuple[int, int]:
    """Total skipped and NaN iterations over megatron's iteration lines."""
    skipped = sum(int(n) for n in re.findall(r"number of skipped iterations:\s+(\d+)", log))
    nan = sum(int(n) for n in re.findall(r"number of nan iterations:\s+(\d+)", log))
    return skipped, nan


def refusal_message(log: str) -> str:
    """The launcher's (or our argument checks') one-line refusal, if the run stopped with one."""
    for line in log.splitlines():
        match = re.match(r"(run_qwen35_vl\.sh: error: .*|error: .*)", line.strip())
        if match:
            return match.group(1)
    return ""


def failure_line(log: str) -> str:
    """The last exception line of a crashed run (e.g. `ValueError: ...`), else its last line."""
    lines = log.strip().splitlines() or ["no output"]
    # torchrun's own ChildFailedError only says that a rank failed; the rank's error says why.
    raised = [
        line
        for line in lines
        if re.search(r"\b\w+(Error|Exception): ", line) and "ChildFailedError" not in line
    ]
    return (raised or lines)[-1].strip()[:200]


def profile_check(run_dir: str) -> str:
    """'' when megatron's torch-profiler trace exists and profile_summary reads its kernels."""
    from scripts.bench.profile_summary import load_trace, summary_markdown

    traces = glob.glob(os.path.join(run_dir, "**", "*.json*"), recursive=True)
    traces = [path for path in traces if "torch_profile" in path or "pt.trace" in path]
    if not traces:
        return "no torch-profiler trace written"
    try:
        summary_markdown(load_trace(traces[0]))
    except ValueError as error:
        return f"profile_summary: {error}"
    return ""


def evaluate(outcome: Outcome, outcomes: dict[str, Outcome]) -> list[str]:
    """One table row for a finished run."""
    run = outcome.run
    refusal = refusal_message(outcome.log)
    losses = (
        read_scalars(outcome.tensorboard, "lm loss") if os.path.isdir(outcome.tensorboard) else {}
    )
    if outcome.returncode != 0 and not losses:
        if refusal:
            result = f"refused: {refusal}" if run.expect_refusal else f"FAIL (refused: {refusal})"
        else:
            result = f"FAIL (exit {outcome.returncode}: {failure_line(outcome.log)})"
        return [run.name, str(run.gpus), "-", "-", "-", "-", "-", "-", result]
    failures = []
    if run.expect_refusal:
        failures.append("expected a refusal")
    if outcome.returncode != 0:
        failures.append(f"exit {outcome.returncode}")
    first = losses.get(1, float("nan")) if losses else float("nan")
    versus = "-"
    reference = outcomes.get(run.reference) if run.reference else None
    if reference is not None:
        reference_losses = read_scalars(reference.tensorboard, "lm loss")
        if 1 in reference_losses and losses:
            relative = abs(first - reference_losses[1]) / abs(reference_losses[1])
            versus = f"{relative:.1e} vs {run.reference}"
            if not relative <= FIRST_LOSS_LIMIT:
                failures.append(f"iteration-1 loss {relative:.1e} from {run.reference}")
        else:
            failures.append(f"no iteration-1 loss of {run.reference} to compare")
    if run.equal_to:
        other = read_scalars(outcomes[run.equal_to].tensorboard, "lm loss")
        common = sorted(set(losses) & set(other))
        differing = [i for i in common if losses[i] != other[i]]
        versus += (
            f"; {len(common) - len(differing)}/{len(common)} iterations bit-equal to {run.equal_to}"
        )
        if differing or not common:
            failures.append(f"not bit-equal to {run.equal_to} at {differing[:3]}")
    skipped, nan = logged_counts(outcome.log)
    if skipped or nan:
        failures.append(f"{nan} NaN / {skipped} skipped iterations")
    last_step = max(losses) if losses else 0
    if last_step < int(COMMON["TRAIN_ITERS"]):
        failures.append(f"stopped at iteration {last_step}")
    if run.profile:
        problem = profile_check(os.path.dirname(outcome.tensorboard))
        if problem:
            failures.append(problem)
    times = read_scalars(outcome.tensorboard, "iteration-time")
    steady = [seconds for step, seconds in times.items() if step >= 3]
    memory = read_scalars(outcome.tensorboard, "mem-max-allocated-bytes")
    return [
        run.name,
        str(run.gpus),
        f"{first:.5f}",
        versus,
        f"{losses[last_step]:.4f} @ {last_step}" if losses else "-",
        f"{nan} / {skipped}",
        f"{1000 * statistics.median(steady):.0f}" if steady else "-",
        f"{max(memory.values()) / 2**30:.1f}" if memory else "-",
        "pass" if not failures else "FAIL: " + "; ".join(failures),
    ]


HEADER = (
    "configuration",
    "GPUs",
    "iteration-1 lm loss",
    "vs reference (rel., limit 1e-2)",
    "last lm loss",
    "NaN / skipped",
    "step ms (median, shared GPUs)",
    "peak GiB",
    "result",
)


def table(out: str, runs: list[Run]) -> tuple[str, bool]:
    outcomes = {}
    for run in runs:
        marker = os.path.join(out, f"{run.name}.rc")
        if os.path.exists(marker):
            with open(marker) as handle, open(os.path.join(out, f"{run.name}.log")) as log:
                outcomes[run.name] = Outcome(
                    run, int(handle.read()), log.read(), os.path.join(out, run.name, "tensorboard")
                )
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    ok = True
    for run in runs:
        if run.name not in outcomes:
            lines.append(f"| {run.name} | {run.gpus} |" + " - |" * 6 + " not run |")
            ok = False
            continue
        row = evaluate(outcomes[run.name], outcomes)
        ok &= row[-1] == "pass" or row[-1].startswith("refused")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), ok


def with_prerequisites(names: set[str], runs: list[Run]) -> list[Run]:
    """The runs named, and every run they are judged against or wait for, transitively."""
    by_name = {run.name: run for run in runs}
    wanted, pending = set(), list(names)
    while pending:
        name = pending.pop()
        if name in wanted:
            continue
        wanted.add(name)
        run = by_name[name]
        pending += [other for other in (run.after, run.reference, run.equal_to) if other]
    return [run for run in runs if run.name in wanted]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="runs/launcher_matrix")
    parser.add_argument("--jobs", type=int, default=8, help="runs at once")
    parser.add_argument("--only", nargs="*", help="run names (with their prerequisites)")
    parser.add_argument("--ckpt-dir", help="checkpoints of the resume runs (OUT/checkpoints)")
    parser.add_argument("--table-only", action="store_true", help="only tabulate OUT's runs")
    parser.add_argument("--list", action="store_true", help="print the run names and exit")
    args = parser.parse_args()
    runs = all_runs()
    if args.list:
        print("\n".join(f"{run.name} ({run.gpus} GPU)" for run in runs))
        return 0
    if args.only:
        unknown = set(args.only) - {run.name for run in runs}
        if unknown:
            parser.error(f"unknown runs {sorted(unknown)}; see --list")
        runs = with_prerequisites(set(args.only), runs)
    out = os.path.abspath(args.out)
    if args.table_only and not os.path.isdir(out):
        parser.error(f"{out} holds no matrix runs")
    if not args.table_only:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise SystemExit("launcher_matrix: no GPU found; the matrix trains on GPUs")
        runnable = [run for run in runs if run.gpus <= gpus]
        os.makedirs(out, exist_ok=True)
        if any(run.uses_cord for run in runnable) and not os.path.isdir(f"{out}/cord_data"):
            subprocess.check_call(
                [sys.executable, "-m", "scripts.cord_fixture", "--out", f"{out}/cord_data"],
                cwd=REPO,
            )
        ckpt = os.path.abspath(args.ckpt_dir or os.path.join(out, "checkpoints"))
        Scheduler(out, ckpt, gpus, args.jobs).run_all(runnable)
    text, ok = table(out, runs)
    print(text)
    with open(os.path.join(out, "matrix.md"), "w") as handle:
        handle.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

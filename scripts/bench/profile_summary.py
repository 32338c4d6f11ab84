"""Where the GPU time of a profiled training step goes: reads a torch-profiler Chrome trace (from
`bench_vs_hf.py --profile` or `PROFILE=torch ./scripts/run_qwen35_vl.sh`, `*.pt.trace.json`) and
prints the top kernels (with the operator that launched them) and the split of the profiled window
into GEMM, attention, Gated DeltaNet, MoE dispatch, communication, optimizer, other kernels and
idle (no kernel running on any stream), and what the host was doing while the GPU was idle.

    python scripts/bench/profile_summary.py TRACE.json [--top 15] [--min-python-us 20]
        [--within "models/qwen35_vl/vision.py(143): encode"]

Kernels are classified by name, first matching rule wins (`CATEGORY_RULES`); time per category
sums kernel durations, so kernels overlapping on two streams count twice while idle is measured
on the union of all kernel intervals. Idle time is charged to the innermost host event (operator,
annotation, CUDA API call or, in traces recorded with Python stacks, Python function; on any
thread) under way at each instant of it; time under no recorded event is Python between operators.
A trace with Python stacks holds millions of short Python-function events (600 MB for four MoE
layers); `--min-python-us` leaves out those shorter than that, charging their time to the caller.
`--within NAME` compares, for each host event whose name starts with NAME (a module's forward in a
stack trace), the host time it took with the GPU time of the kernels launched inside it (matched
to their launches by the trace's correlation ids): a region whose kernels run in a small part of
its host time is bound by the host.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import re
from collections import defaultdict
from dataclasses import dataclass

# (category, pattern on the kernel name). Order matters: the optimizer's multi-tensor l2norm
# must not count as Gated DeltaNet's l2norm, and TE's fused attention kernels contain "gemm".
CATEGORY_RULES: tuple[tuple[str, str], ...] = (
    ("communication", r"nccl"),
    ("optimizer", r"multi_tensor|adam|Adam"),
    ("attention", r"flash|fmha|fused_attn|cudnn.*(attn|sdpa)|attention"),
    (
        "Gated DeltaNet",
        r"chunk_|gated_delta|delta_rule|kkt|solve_tril|recompute_w_u|conv1d|l2norm|"
        r"fused_recurrent|tilelang|fla_",
    ),
    ("MoE dispatch", r"permute|moe|topk|sort_chunks|histogram|token_dispatch|router"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|matmul"),
)
CATEGORIES = (*(name for name, _ in CATEGORY_RULES), "other kernels", "idle")
HOST_EVENT_CATEGORIES = (
    "cpu_op",
    "user_annotation",
    "cuda_runtime",
    "cuda_driver",
    "python_function",  # present when the profiler recorded stacks (with_stack=True)
)
OUTSIDE_HOST_EVENTS = "(no recorded host event: Python between operators)"


@dataclass(frozen=True)
class Event:
    """A timed trace event: a GPU kernel or a host-side operator, annotation or API call."""

    name: str
    start_us: float
    duration_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.duration_us


def load_trace(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        return json.load(handle)


def event_categories(trace: dict) -> dict[str, int]:
    """How many events of each `cat` the trace holds: tells an empty CUDA trace from a mislabelled
    one when no kernel events are found."""
    counts: dict[str, int] = defaultdict(int)
    for event in trace.get("traceEvents", []):
        counts[str(event.get("cat"))] += 1
    return dict(counts)


def events_of(trace: dict, categories: tuple[str, ...], min_python_us: float = 0.0) -> list[Event]:
    """The trace's complete events of those categories (`cat`); ProfilerStep ranges left out
    (they cover everything), and Python-function events shorter than `min_python_us`."""
    return [
        Event(str(event["name"]), float(event["ts"]), float(event["dur"]))
        for event in trace.get("traceEvents", [])
        if event.get("ph") == "X"
        and event.get("cat") in categories
        and not str(event.get("name", "")).startswith("ProfilerStep#")
        and (event.get("cat") != "python_function" or float(event["dur"]) >= min_python_us)
    ]


def kernels_of(trace: dict) -> list[Event]:
    """GPU kernel events of the trace (memcpy / memset and CPU events are left out)."""
    return events_of(trace, ("kernel",))


def profiled_steps(trace: dict) -> int:
    """Number of `ProfilerStep#N` ranges (1 when the trace has none)."""
    names = {
        event["name"]
        for event in trace.get("traceEvents", [])
        if event.get("ph") == "X" and str(event.get("name", "")).startswith("ProfilerStep#")
    }
    return max(1, len(names))


def classify(name: str) -> str:
    for category, pattern in CATEGORY_RULES:
        if re.search(pattern, name):
            return category
    return "other kernels"


def busy_intervals(kernels: list[Event]) -> list[tuple[float, float]]:
    """The union of the kernels' intervals as sorted, disjoint (start, end) pairs."""
    merged: list[list[float]] = []
    for kernel in sorted(kernels, key=lambda k: k.start_us):
        if merged and kernel.start_us <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], kernel.end_us)
        else:
            merged.append([kernel.start_us, kernel.end_us])
    return [(start, stop) for start, stop in merged]


def busy_time(kernels: list[Event]) -> float:
    """Length of the union of the kernels' intervals (time with at least one kernel running)."""
    return sum(stop - start for start, stop in busy_intervals(kernels))


def idle_by_host_event(trace: dict, min_python_us: float = 0.0) -> dict[str, float]:
    """Microseconds of idle time (no kernel on any stream, as in `time_split`) charged to the
    innermost host event under way, by name (Python functions shorter than `min_python_us`
    left out)."""
    busy = busy_intervals(kernels_of(trace))
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
    host_events = events_of(trace, HOST_EVENT_CATEGORIES, min_python_us)
    events = sorted(host_events, key=lambda e: e.start_us)
    charged: dict[str, float] = defaultdict(float)
    # One sweep: gaps come in time order, so an event that ended before a gap ends before all
    # later ones; what stays active is the few events nested around the current instant.
    active: list[Event] = []
    upcoming = 0
    for gap_start, gap_end in gaps:
        while upcoming < len(events) and events[upcoming].start_us < gap_end:
            active.append(events[upcoming])
            upcoming += 1
        active = [e for e in active if e.end_us > gap_start]
        cuts = {gap_start, gap_end}
        for event in active:
            cuts.update(t for t in (event.start_us, event.end_us) if gap_start < t < gap_end)
        for left, right in itertools.pairwise(sorted(cuts)):
            covering = [e for e in active if e.start_us <= left and right <= e.end_us]
            name = min(covering, key=lambda e: e.duration_us).name if covering else None
            charged[name or OUTSIDE_HOST_EVENTS] += right - left
    return dict(charged)


@dataclass(frozen=True)
class IssuedWork:
    """A host event and the GPU work launched while it was under way."""

    name: str
    host_us: float
    kernels: int
    kernel_busy_us: float


def kernel_launches(trace: dict) -> list[tuple[float, object, Event]]:
    """(launch time, launching thread, kernel) for each kernel whose launch (CUDA runtime or
    driver call) the trace ties to it by correlation id, in launch order."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = {
        e["args"]["correlation"]: Event(str(e["name"]), float(e["ts"]), float(e["dur"]))
        for e in events
        if e.get("cat") == "kernel" and "correlation" in e.get("args", {})
    }
    return sorted(
        (
            (float(e["ts"]), e.get("tid"), kernels[e["args"]["correlation"]])
            for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver")
            and e.get("args", {}).get("correlation") in kernels
        ),
        key=lambda launch: launch[0],
    )


def work_issued_within(trace: dict, name_prefix: str) -> list[IssuedWork]:
    """For each complete host event whose name starts with `name_prefix`: its duration, the
    kernels whose launch (CUDA runtime or driver call, by correlation id) lies inside it, and the
    length of the union of those kernels' intervals."""
    launches = kernel_launches(trace)
    regions = [
        Event(str(e["name"]), float(e["ts"]), float(e["dur"]))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X"
        and e.get("cat") in HOST_EVENT_CATEGORIES
        and str(e.get("name", "")).startswith(name_prefix)
    ]
    issued = []
    for region in sorted(regions, key=lambda e: e.start_us):
        launched = [
            kernel
            for launch_at, _, kernel in launches
            if region.start_us <= launch_at <= region.end_us
        ]
        issued.append(
            IssuedWork(region.name, region.duration_us, len(launched), busy_time(launched))
        )
    return issued


def launching_operators(trace: dict) -> dict[str, dict[str, int]]:
    """For each kernel name: how many of its launches (CUDA runtime or driver call, matched by
    correlation id) each operator made, the operator being the innermost `cpu_op` under way on
    the launching thread (so a kernel named by its template alone gets its aten operator)."""
    launches: dict[object, list[tuple[float, str]]] = defaultdict(list)
    for launch_at, thread, kernel in kernel_launches(trace):
        launches[thread].append((launch_at, kernel.name))
    operators: dict[object, list[Event]] = defaultdict(list)
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            operators[e.get("tid")].append(Event(str(e["name"]), float(e["ts"]), float(e["dur"])))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for thread, thread_launches in launches.items():
        # One sweep per thread, as in idle_by_host_event: what stays open is the nest of
        # operators around the current launch (the launches come in time order).
        ordered = sorted(operators[thread], key=lambda op: op.start_us)
        open_operators: list[Event] = []
        upcoming = 0
        for launch_at, kernel in thread_launches:
            while upcoming < len(ordered) and ordered[upcoming].start_us <= launch_at:
                open_operators.append(ordered[upcoming])
                upcoming += 1
            open_operators = [op for op in open_operators if op.end_us >= launch_at]
            innermost = min(open_operators, key=lambda op: op.duration_us, default=None)
            counts[kernel][innermost.name if innermost else "(no operator)"] += 1
    return {kernel: dict(by_operator) for kernel, by_operator in counts.items()}


def main_operator(by_operator: dict[str, int] | None) -> str:
    """'`aten::copy_` (12 of 12)': the operator behind most launches of a kernel."""
    if not by_operator:
        return "-"
    name, launched = max(by_operator.items(), key=lambda item: item[1])
    return f"`{shorten(name, 40)}` ({launched} of {sum(by_operator.values())})"


def time_split(kernels: list[Event]) -> dict[str, float]:
    """Microseconds per category over the window from the first kernel start to the last end."""
    if not kernels:
        raise ValueError("the trace has no GPU kernel events (was CUDA activity profiled?)")
    split = dict.fromkeys(CATEGORIES, 0.0)
    for kernel in kernels:
        split[classify(kernel.name)] += kernel.duration_us
    window = max(k.end_us for k in kernels) - min(k.start_us for k in kernels)
    split["idle"] = window - busy_time(kernels)
    return split


def top_kernels(kernels: list[Event], count: int) -> list[tuple[str, float, int]]:
    """(name, total microseconds, calls) of the `count` kernels with the most total time."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for kernel in kernels:
        totals[kernel.name][0] += kernel.duration_us
        totals[kernel.name][1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return [(name, total, int(calls)) for name, (total, calls) in ranked]


def shorten(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def summary_markdown(trace: dict, top: int = 15, min_python_us: float = 0.0) -> str:
    kernels = kernels_of(trace)
    if not kernels:
        raise ValueError(
            "the trace has no GPU kernel events (was CUDA activity profiled?); its event "
            f"categories: {event_categories(trace)}"
        )
    steps = profiled_steps(trace)
    split = time_split(kernels)
    window = split["idle"] + busy_time(kernels)
    lines = [
        f"{len(kernels)} kernels over {steps} step(s); window {window / 1e3 / steps:.1f} ms "
        "per step",
        "",
        "| category | ms per step | share of window |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {split[name] / 1e3 / steps:.2f} | {100 * split[name] / window:.1f}% |"
        for name in CATEGORIES
    ]
    lines += [
        "",
        "| kernel | category | ms per step | calls per step | launched by (innermost operator) |",
        "|---|---|---|---|---|",
    ]
    operators = launching_operators(trace)
    for name, total, calls in top_kernels(kernels, top):
        lines.append(
            f"| `{shorten(name)}` | {classify(name)} | {total / 1e3 / steps:.2f} | "
            f"{calls / steps:g} | {main_operator(operators.get(name))} |"
        )
    charged = idle_by_host_event(trace, min_python_us)
    if charged:
        lines += [
            "",
            "| host event under way while the GPU was idle (innermost) | ms per step |",
            "|---|---|",
        ]
        for name, total in sorted(charged.items(), key=lambda item: -item[1])[:top]:
            lines.append(f"| `{shorten(name)}` | {total / 1e3 / steps:.2f} |")
    return "\n".join(lines)


def within_markdown(issued: list[IssuedWork]) -> str:
    if not issued:
        return "\nno host event of that name in the trace"
    lines = [
        "",
        "| host event | host ms | kernels launched in it | their GPU ms (union) | GPU share |",
        "|---|---|---|---|---|",
    ]
    for work in issued:
        share = work.kernel_busy_us / work.host_us if work.host_us else 0.0
        lines.append(
            f"| `{shorten(work.name)}` | {work.host_us / 1e3:.1f} | {work.kernels} | "
            f"{work.kernel_busy_us / 1e3:.1f} | {100 * share:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="torch-profiler Chrome trace (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=15, help="how many kernels to list")
    parser.add_argument(
        "--min-python-us",
        type=float,
        default=0.0,
        help="leave out Python-function events shorter than this (their time goes to the "
        "caller); 20 makes a stack trace of a few layers readable in under a minute",
    )
    parser.add_argument(
        "--within",
        default="",
        metavar="NAME",
        help="also compare the host time of each event whose name starts with NAME with the GPU "
        "time of the kernels it launched",
    )
    args = parser.parse_args()
    trace = load_trace(args.trace)
    print(summary_markdown(trace, args.top, args.min_python_us))
    if args.within:
        print(within_markdown(work_issued_within(trace, args.within)))


if __name__ == "__main__":
    main()

"""scripts/bench/profile_summary.py on a hand-made Chrome trace: kernel names go to the right
category, overlapping kernels on two streams count once for idle, per-step figures divide by the
ProfilerStep ranges, GPU idle time goes to the innermost host event under way, the kernels a
host event launched are matched to it by correlation id (and each kernel to the innermost operator
that launched it, on its own thread), and a trace without kernels is an error."""

from __future__ import annotations

import json

import pytest

from scripts.bench.profile_summary import (
    OUTSIDE_HOST_EVENTS,
    busy_time,
    classify,
    idle_by_host_event,
    kernels_of,
    launching_operators,
    load_trace,
    summary_markdown,
    time_split,
    within_markdown,
    work_issued_within,
)


def kernel(name: str, start: float, duration: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": duration}


TRACE = {
    "traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#5", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#6", "ts": 100, "dur": 100},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 0, "dur": 5},
        kernel("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 0, 40),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 40, 10),
        kernel("chunk_gated_delta_rule_fwd_kernel_h_blockdim64", 50, 20),
        kernel("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", 60, 30),  # overlaps on a stream
        kernel("multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", 120, 20),
        kernel("_permute_kernel", 140, 5),
        kernel("vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", 150, 10),
    ]
}


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
        ("flash_fwd_kernel<Flash_fwd_kernel_traits<256, 64>>", "attention"),
        ("l2norm_fwd_kernel", "Gated DeltaNet"),
        ("multi_tensor_apply_kernel<TensorListMetadata<1>, L2NormFunctor<float>>", "optimizer"),
        ("causal_conv1d_fwd_kernel", "Gated DeltaNet"),
        ("moe_unpermute_kernel", "MoE dispatch"),
        ("ncclDevKernel_AllGather_RING_LL", "communication"),
        ("triton_poi_fused_mul_silu_0", "other kernels"),
    ],
)
def test_kernel_names_are_classified(name, category):
    assert classify(name) == category


def test_split_counts_idle_on_the_union_of_streams():
    kernels = kernels_of(TRACE)
    assert len(kernels) == 7  # memcpy and CPU events are not kernels
    # Busy: [0, 90) from the first four (the NCCL kernel overlaps), [120, 145), [150, 160).
    assert busy_time(kernels) == 125
    split = time_split(kernels)
    assert split["GEMM"] == 40 and split["attention"] == 10 and split["Gated DeltaNet"] == 20
    assert split["communication"] == 30 and split["optimizer"] == 20
    assert split["MoE dispatch"] == 5 and split["other kernels"] == 10
    assert split["idle"] == 160 - 125


def test_markdown_reports_per_step(tmp_path):
    path = tmp_path / "rank0.pt.trace.json"
    path.write_text(json.dumps(TRACE))
    text = summary_markdown(load_trace(str(path)), top=3)
    assert "7 kernels over 2 step(s); window 0.1 ms per step" in text
    assert "| GEMM | 0.02 | 25.0% |" in text  # 40 us of a 160 us window, over 2 steps
    assert "| idle | 0.02 | 21.9% |" in text
    kernel_table = text.split("| host event")[0]
    assert kernel_table.count("| `") == 3


def test_trace_without_kernels_is_an_error():
    with pytest.raises(ValueError, match="no GPU kernel events"):
        time_split(kernels_of({"traceEvents": []}))


def host(name: str, start: float, duration: float, category: str = "cpu_op", thread: int = 1):
    return {"ph": "X", "cat": category, "name": name, "ts": start, "dur": duration, "tid": thread}


def test_idle_time_goes_to_the_innermost_host_event():
    trace = {
        "traceEvents": [
            host("ProfilerStep#1", 0, 40, "user_annotation"),  # covers all: never charged
            kernel("nvjet_a", 0, 10),
            # A copy is not a kernel: idle here means no kernel, as in the category split.
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 28, "dur": 2},
            kernel("nvjet_b", 30, 10),
            host("forward", 5, 20),
            host("aten::mm", 12, 6),
            host("cudaLaunchKernel", 20, 2, "cuda_runtime", thread=2),
        ]
    }
    charged = idle_by_host_event(trace)
    assert charged == {
        "forward": (12 - 10) + (20 - 18) + (25 - 22),
        "aten::mm": 6,
        "cudaLaunchKernel": 2,
        OUTSIDE_HOST_EVENTS: 30 - 25,
    }
    assert sum(charged.values()) == time_split(kernels_of(trace))["idle"]


def test_markdown_lists_the_host_events_behind_idle_time():
    text = summary_markdown(TRACE, top=3)
    # Idle from 90 to 120 and from 145 to 150 falls under no host event (aten::mm ended at 50,
    # the ProfilerStep ranges are not charged): 35 us over 2 steps.
    assert "| `(no recorded host event: Python between operators)` | 0.02 |" in text
    assert text.count("| `aten::mm` |") == 0


def stack_trace() -> dict:
    """Two kernels around a 20 us gap, with a Python function (and a shorter one inside it)
    and an operator under way in the gap."""
    return {
        "traceEvents": [
            kernel("nvjet_a", 0, 10),
            kernel("nvjet_b", 30, 10),
            host("moe_layer.py(120): forward", 8, 20, "python_function"),
            host("dispatcher.py(40): permute", 12, 4, "python_function"),
            host("aten::empty", 13, 1),
        ]
    }


def test_python_functions_of_a_stack_trace_take_the_idle_time():
    # With Python stacks recorded, time between operators goes to the function under way.
    trace = stack_trace()
    assert idle_by_host_event(trace) == {
        "moe_layer.py(120): forward": (12 - 10) + (28 - 16),
        "dispatcher.py(40): permute": 3,
        "aten::empty": 1,
        OUTSIDE_HOST_EVENTS: 30 - 28,
    }


def test_short_python_functions_can_be_left_to_their_caller():
    # --min-python-us 5: the 4 us `permute` is dropped and its idle time goes to `forward`;
    # operators are kept whatever their length.
    trace = stack_trace()
    assert idle_by_host_event(trace, min_python_us=5) == {
        "moe_layer.py(120): forward": (13 - 10) + (28 - 14),
        "aten::empty": 1,
        OUTSIDE_HOST_EVENTS: 30 - 28,
    }


def launched(name: str, launch_at: float, start: float, duration: float, correlation: int):
    """A kernel and the CUDA call that launched it, tied by their correlation id."""
    link = {"args": {"correlation": correlation}}
    return [
        {**host("cudaLaunchKernel", launch_at, 1, "cuda_runtime"), **link},
        {**kernel(name, start, duration), **link},
    ]


def test_work_issued_within_a_host_event_is_matched_by_correlation():
    # `encode` runs on the host from 0 to 100 us and launches two kernels (one through the
    # driver API, as Triton does) that overlap on the GPU; the third kernel is launched after it.
    trace = {
        "traceEvents": [
            host("vision.py(143): encode", 0, 100, "python_function"),
            *launched("gemm", 10, 20, 10, correlation=1),
            *launched("triton_rope", 50, 25, 10, correlation=2),
            *launched("decoder_gemm", 120, 130, 40, correlation=3),
        ]
    }
    trace["traceEvents"][3]["cat"] = "cuda_driver"
    (work,) = work_issued_within(trace, "vision.py(143)")
    assert (work.host_us, work.kernels, work.kernel_busy_us) == (100, 2, 15)
    assert "| `vision.py(143): encode` | 0.1 | 2 | 0.0 | 15% |" in within_markdown([work])
    assert "no host event" in within_markdown(work_issued_within(trace, "decoder.py"))


def test_each_kernel_is_charged_to_the_innermost_operator_that_launched_it():
    # Thread 1: aten::add_ (0-40 us) nests aten::copy_ (10-20); thread 2 (autograd's) launches
    # while only its own aten::mul is open, though thread 1's add_ spans that instant too.
    trace = {
        "traceEvents": [
            host("aten::add_", 0, 40),
            host("aten::copy_", 10, 10),
            host("aten::mul", 25, 10, thread=2),
            *launched("elementwise_kernel", 15, 50, 5, correlation=1),
            *launched("elementwise_kernel", 30, 60, 5, correlation=2),
            *launched("elementwise_kernel", 32, 70, 5, correlation=3),
            *launched("vectorized_add", 45, 80, 5, correlation=4),
        ]
    }
    for event in trace["traceEvents"]:
        if event.get("args", {}).get("correlation") == 3 and event["cat"] == "cuda_runtime":
            event["tid"] = 2
    assert launching_operators(trace) == {
        "elementwise_kernel": {"aten::copy_": 1, "aten::add_": 1, "aten::mul": 1},
        "vectorized_add": {"(no operator)": 1},
    }
    assert "| `elementwise_kernel` | other kernels | 0.01 | 3 | `aten::copy_` (1 of 3) |" in (
        summary_markdown(trace)
    )

"""The dry-run planner (planner.py): MoE memory with expert tensor parallelism, the planned GPU
(PLAN_GPU), the layouts megatron and the model accept, the smallest changes that fit, and, through
pretrain_multimodal.py in a subprocess, a plan printed on its own (megatron's output in the run
directory, no TensorBoard file) that exits 1 with the changes when the layout does not fit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from models import get_model_spec
from models.qwen35_vl.configuration import get_variant
from models.spec import ModelShape
from planner import (
    DRY_RUN_LOG,
    GIB,
    GPUS,
    Layout,
    dry_run_log_path,
    layout_problem,
    memory_plan,
    output_to,
    planned_gpu,
    suggest_layouts,
    usable_bytes,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = usable_bytes(GPUS["h100"])


def shape(variant: str) -> ModelShape:
    return get_model_spec("qwen35_vl").shape(get_variant(variant))


def test_moe_experts_split_over_ep_times_etp():
    # 35b_a3b at TP=2 EP=4 on 8 GPUs, by hand (ETP = TP = 2, megatron's default):
    #   routed experts 33,017,561,088 (41 layers with MTP x 256 x 3 x 2048 x 512)
    #   dense = 35,107,181,936 + 844,640,768 (MTP) - 33,017,561,088 = 2,934,261,616
    #   per GPU: dense / TP = 1,467,130,808; experts / (EP 4 x ETP 2) = 4,127,195,136
    #   weights 2 B x 5,594,325,944 = 10.42 GiB; gradients 4 B x that = 20.84 GiB
    #   optimizer 12 B x (dense / (DP 4 x CP 1) + experts / expert-DP (8 / (2 x 4 x 1) = 1))
    #     = 12 x 4,493,977,838 = 50.22 GiB
    #   activations 2048 tokens per TP rank x 2048 hidden x 18 B x 80 sub-layers = 5.63 GiB,
    #     + fp32 logits 4096 tokens x 248,320 / TP 2 x 4 B = 1.89 GiB
    #   total 89.0 GiB (the issue's ~88 GiB, plus the logits of the whole gathered sequence);
    #   dividing the experts by EP alone gave 157 GiB.
    model = shape("35b_a3b")
    assert model.experts == 41 * 256 * 3 * 2048 * 512
    assert model.dense == 2_934_261_616
    layout = Layout(nnodes=1, gpus_per_node=8, tp=2, ep=4)
    assert (layout.dp, layout.expert_tp, layout.expert_dp) == (4, 2, 1)
    plan = memory_plan(layout, model)
    expected = {
        "weights (bf16)": 2 * 5_594_325_944 / GIB,
        "gradients (fp32)": 4 * 5_594_325_944 / GIB,
        "optimizer (fp32 master + Adam m, v)": 12 * 4_493_977_838 / GIB,
        "activations (rough)": (2048 * 2048 * 18 * 80 + 4096 * 248_320 / 2 * 4) / GIB,
    }
    assert plan == pytest.approx(expected, abs=0.01)
    assert sum(plan.values()) == pytest.approx(89.0, abs=0.05)
    # An explicit expert tensor parallel size of 1 keeps twice the experts on each GPU, and
    # shards their optimizer state over twice the expert data-parallel ranks.
    narrow = Layout(nnodes=1, gpus_per_node=8, tp=2, ep=4, etp=1)
    assert narrow.expert_dp == 2
    assert memory_plan(narrow, model)["weights (bf16)"] > 1.7 * plan["weights (bf16)"]


def test_fsdp_shards_weights_and_gradients_and_recompute_keeps_layer_inputs():
    model = shape("9b")
    base = Layout(gpus_per_node=8)
    plain, fsdp = memory_plan(base, model), memory_plan(Layout(gpus_per_node=8, fsdp=True), model)
    assert fsdp["weights (bf16)"] == pytest.approx(plain["weights (bf16)"] / 8)
    assert fsdp["gradients (fp32)"] == pytest.approx(plain["gradients (fp32)"] / 8)
    assert (
        fsdp["optimizer (fp32 master + Adam m, v)"] == plain["optimizer (fp32 master + Adam m, v)"]
    )
    recompute = memory_plan(Layout(gpus_per_node=8, recompute=True), model)
    logits = 4096 * 248_320 * 4 / GIB
    stored = (plain["activations (rough)"] - logits) * (2 * 64 + 18) / (18 * 64)
    assert recompute["activations (rough)"] == pytest.approx(stored + logits)


def test_planned_gpu_is_named_by_plan_gpu():
    assert planned_gpu({"PLAN_GPU": "h200"}).total_memory == 141 * GIB
    assert planned_gpu({"PLAN_GPU": "B200"}).name == "NVIDIA B200"
    assert planned_gpu({"PLAN_GPU": "b200"}).major == 10
    with pytest.raises(ValueError, match="PLAN_GPU=a100: use one of h100, h200, b200"):
        planned_gpu({"PLAN_GPU": "a100"})
    import torch

    if not torch.cuda.is_available():
        assert planned_gpu({}) == GPUS["h100"]


@pytest.mark.parametrize(
    ("variant", "layout", "problem"),
    [
        ("35b_a3b", Layout(gpus_per_node=4, tp=4), "TP 4 does not divide"),  # 2 query groups
        ("9b", Layout(gpus_per_node=32, tp=2, cp=16), "TP 2 x CP 16 does not divide them"),
        ("35b_a3b", Layout(gpus_per_node=8, ep=3), "world 8 is not divisible by ETP x EP"),
        ("35b_a3b", Layout(gpus_per_node=512, ep=512), "the 256 experts of the model do not split"),
        ("9b", Layout(gpus_per_node=2, ep=2), "needs a mixture-of-experts model"),
        ("9b", Layout(gpus_per_node=6, tp=4), "world 6 is not divisible by TP x CP x PP"),
        ("9b", Layout(gpus_per_node=2, cp=2, seq_length=4094), "not a multiple of 2 x CP"),
        ("9b", Layout(gpus_per_node=2, tp=2, seq_length=4095), "not a multiple of 2"),
        ("9b", Layout(gpus_per_node=4, tp=2, cp=2), ""),
        ("35b_a3b", Layout(gpus_per_node=8, tp=2, cp=2, ep=4), ""),
    ],
)
def test_layout_problems(variant, layout, problem):
    found = layout_problem(layout, shape(variant))
    assert (problem in found) if problem else found == ""
    assert bool(found) == bool(problem)


def test_global_batch_set_by_the_user_must_divide():
    layout = Layout(gpus_per_node=4, mbs=2)
    assert "GBS 12 is not a multiple of MBS x DP" in layout_problem(layout, shape("9b"), 12)
    assert layout_problem(layout, shape("9b"), 16) == ""


def assert_valid_and_ordered(suggestions, layout, model, budget):
    assert suggestions
    for suggestion in suggestions:
        assert layout_problem(suggestion.layout, model) == ""
        assert sum(memory_plan(suggestion.layout, model).values()) * GIB <= budget
        assert suggestion.gib * GIB <= budget
    sizes = [len(s.changes) for s in suggestions]
    assert sizes == sorted(sizes)


def test_readme_397b_example_is_told_what_fits():
    # README: DRY_RUN=1 MODEL_VARIANT=397b EP=64 NNODES=16 GPUS_PER_NODE=8
    model, layout = shape("397b"), Layout(nnodes=16, gpus_per_node=8, ep=64)
    assert sum(memory_plan(layout, model).values()) * GIB > H100
    suggestions = suggest_layouts(layout, model, H100)
    assert_valid_and_ordered(suggestions, layout, model, H100)
    assert suggestions[0].assignments() == "FSDP=1 RECOMPUTE=1"
    assert len(suggestions) == 3
    # On a B200 one change is enough.
    b200 = suggest_layouts(layout, model, usable_bytes(GPUS["b200"]))
    assert b200[0].assignments() == "FSDP=1"


def test_readme_9b_fine_tune_keeps_the_checkpoint_format():
    # README: CKPT_LOAD=CKPT CKPT_RESUME=0 MODEL_VARIANT=9b (a torch_dist import: FSDP stays 0),
    # planned on one GPU and on a node of 8.
    model = shape("9b")
    one = suggest_layouts(Layout(), model, H100, fixed=frozenset({"FSDP"}))
    assert_valid_and_ordered(one, Layout(), model, H100)
    assert all("FSDP" not in s.changes and "GPUS_PER_NODE" in s.changes for s in one)
    node = suggest_layouts(Layout(gpus_per_node=8), model, H100, fixed=frozenset({"FSDP"}))
    assert node[0].assignments() == "TP=2"
    # Smaller changes first: TP=4 also fits but TP=2 already does on as many GPUs.
    assert all(s.assignments() != "TP=4" for s in node)


def test_more_gpus_fill_a_node_before_adding_nodes():
    suggestions = suggest_layouts(Layout(), shape("4b"), H100)
    assert suggestions[0].assignments() == "GPUS_PER_NODE=2"
    assert all("NNODES" not in s.changes for s in suggestions)


def test_nothing_fits_gives_no_suggestion():
    assert suggest_layouts(Layout(seq_length=2**22), shape("9b"), 8 * GIB) == []


def test_layout_from_megatron_arguments():
    args = argparse.Namespace(
        world_size=16,
        tensor_model_parallel_size=2,
        context_parallel_size=2,
        expert_model_parallel_size=4,
        pipeline_model_parallel_size=1,
        expert_tensor_parallel_size=2,
        micro_batch_size=1,
        total_seq_length=4096,
        packed_sequence=True,
        use_megatron_fsdp=False,
        data_parallel_sharding_strategy="no_shard",
        recompute_granularity="full",
        use_distributed_optimizer=True,
        sequence_parallel=True,
    )
    layout = Layout.from_args(args, {"NNODES": "2", "GPUS_PER_NODE": "8"})
    assert (layout.nnodes, layout.gpus_per_node, layout.etp, layout.recompute) == (2, 8, None, True)
    assert (layout.dp, layout.expert_dp) == (4, 2)
    # Node counts that do not multiply to the world (or none at all): one node.
    assert Layout.from_args(args, {"NNODES": "3", "GPUS_PER_NODE": "8"}).gpus_per_node == 16
    assert Layout.from_args(args, {"NNODES": "x"}).nnodes == 1


def test_dry_run_log_goes_to_the_run_directory(tmp_path):
    run = tmp_path / "run"
    assert dry_run_log_path([], {"RUN_DIR": str(run)}) == str(run / DRY_RUN_LOG)
    argv = ["--tensorboard-dir", str(tmp_path / "other" / "tensorboard")]
    assert dry_run_log_path(argv, {}) == str(tmp_path / "other" / DRY_RUN_LOG)
    assert (tmp_path / "other").is_dir() and not (tmp_path / "other" / "tensorboard").exists()


def test_output_to_catches_file_descriptor_writes(tmp_path, capfd):
    log = tmp_path / "log.txt"
    with pytest.raises(RuntimeError), output_to(str(log), mode="w"):
        print("python print", flush=True)
        os.write(2, b"C-level stderr\n")
        raise RuntimeError("restored on errors too")
    print("after")
    assert log.read_text() == "python print\nC-level stderr\n"
    assert capfd.readouterr().out == "after\n"


# ---- through pretrain_multimodal.py --------------------------------------------------------------

DRY_RUN_ARGS = [
    "--micro-batch-size", "1", "--global-batch-size", "8", "--seq-length", "4096",
    "--train-iters", "300", "--lr", "3e-4", "--lr-warmup-iters", "10", "--bf16",
    "--tokenizer-type", "NullTokenizer", "--dataloader-type", "external",
    "--calculate-per-token-loss", "--use-distributed-optimizer",
    "--no-gradient-accumulation-fusion", "--dry-run",
]  # fmt: skip


def dry_run(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """pretrain_multimodal.py as the launcher's DRY_RUN=1 starts it, on one GPU's worth."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RUN_DIR", "PLAN_GPU", "GBS")}
    environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")
    environ.update(env)
    command = [sys.executable, "pretrain_multimodal.py", *DRY_RUN_ARGS, *args]
    command += ["--tensorboard-dir", str(tmp_path / "run" / "tensorboard")]
    return subprocess.run(
        command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300
    )


def test_plan_that_does_not_fit_exits_1_with_the_changes(tmp_path):
    result = dry_run(tmp_path, "--model-variant", "9b")
    assert result.returncode == 1, result.stderr[-3000:]
    out = result.stdout
    # The plan alone on stdout; megatron's argument dump and the warnings in the run directory.
    assert out.startswith("DRY RUN qwen35_vl / 9b"), out[:500]
    assert "--- arguments ---" not in out and "UserWarning" not in result.stderr
    log = (tmp_path / "run" / DRY_RUN_LOG).read_text()
    assert "------------------------ arguments ------------------------" in log
    assert "does NOT fit in NVIDIA H100 80GB HBM3: 72.0 of its 80 GiB usable (10% kept" in out
    assert "smallest changes that fit" in out
    assert "    GPUS_PER_NODE=4 FSDP=1 " in out
    [error] = result.stderr.strip().splitlines()
    assert error.startswith("error: the layout needs 183.6 GiB per GPU, more than the 72.0 GiB")
    assert "set one of: GPUS_PER_NODE=4 FSDP=1;" in error
    # megatron would open a TensorBoard writer at world size 1; a dry run writes none.
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_plan_that_fits_on_the_named_gpu_exits_0(tmp_path):
    result = dry_run(tmp_path, "--model-variant", "proxy", PLAN_GPU="h200")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fits in NVIDIA H200: 126.9 of its 141 GiB usable" in result.stdout
    assert "exiting (DRY_RUN)" in result.stdout and result.stderr == ""
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_megatron_usage_error_is_one_line(tmp_path):
    result = dry_run(tmp_path, "--lr", "abc")
    assert result.returncode == 1
    [error] = result.stderr.strip().splitlines()
    assert "argument --lr: invalid float value: 'abc'" in error
    assert f"megatron's output: {tmp_path / 'run' / DRY_RUN_LOG}" in error

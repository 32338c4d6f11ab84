"""The launcher `scripts/run_qwen35_vl.sh` in DRY_RUN mode (megatron's own argument validation on
the CPU): every variant plans, parallel layouts that should work do, and bad settings fail with a
message naming the fix. Each dry run is a subprocess of ~5-20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from arguments import (
    add_multimodal_args,
    architecture_dests,
    launcher_facts,
    megatron_flags,
    validate_multimodal_args,
)
from models import get_model_spec
from models.qwen35_vl.configuration import get_variant

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "run_qwen35_vl.sh")
PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable

VARIANTS = get_model_spec("qwen35_vl").variant_names()
# Every knob the launcher reads (`NAME=${NAME:-default}`), cleared from the inherited
# environment so each run sees only the knobs its test sets.
with open(SCRIPT) as script:
    KNOBS = set(re.findall(r"\b([A-Z_]+)=\$\{\1:-", script.read())) | {"GPUS_PER_NODE", "PLAN_GPU"}


def dry_run(tmp_path, *argv: str, **knobs: str) -> subprocess.CompletedProcess:
    """The launcher in DRY_RUN with only `knobs` set and `argv` after the script name."""
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(
        DRY_RUN="1",
        PYTHON=PYTHON,
        GPUS_PER_NODE="1",
        TB_DIR=str(tmp_path / "tensorboard"),
        RUN_DIR=str(tmp_path / "run"),
    )
    env.update(knobs)
    return subprocess.run(
        ["bash", SCRIPT, *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DRY RUN qwen35_vl" in result.stdout
    assert "exiting (DRY_RUN)" in result.stdout
    return result.stdout


def assert_fails(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "DRY RUN qwen35_vl" not in result.stdout
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr[-3000:]}"
    return result.stderr


def test_knobs_found_in_script():
    assert {"MODEL_VARIANT", "TP", "CP", "EP", "PP", "SEQ_LEN", "DATASET", "DRY_RUN"} <= KNOBS


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_dry_runs(tmp_path, variant):
    result = dry_run(tmp_path, MODEL_VARIANT=variant)
    out = result.stdout
    assert "exiting (DRY_RUN)" in out and not (tmp_path / "tensorboard").exists()
    if "    fits in NVIDIA H100" in out:
        assert result.returncode == 0, result.stderr
    else:  # one H100 is too small: the plan names the smallest layouts that fit
        assert result.returncode == 1
        assert "smallest changes that fit" in out
        assert result.stderr.startswith("error: the layout needs")
    config = get_variant(variant)
    counts = config.parameter_counts()
    assert f"DRY RUN qwen35_vl / {config.name} " in out
    assert f"parameters (HF-equivalent): total {counts.total:,} " in out
    assert f"active {counts.active:,} " in out
    assert "world 1 = TP 1 x CP 1 x PP 1 x DP 1" in out
    t = config.text
    assert f"decoder: {t.num_hidden_layers} layers" in out
    if t.is_moe:
        assert f"MoE {t.num_experts} experts top-{t.num_experts_per_tok}" in out
    else:
        assert f"dense MLP {t.intermediate_size}" in out


def test_397b_on_128_gpus(tmp_path):
    layout = dict(MODEL_VARIANT="397b", EP="64", NNODES="16", GPUS_PER_NODE="8")
    out = assert_ok(dry_run(tmp_path, **layout, FSDP="1", RECOMPUTE="1"))
    assert "world 128 = TP 1 x CP 1 x PP 1 x DP 128; EP 64" in out
    assert "torchrun would start 128 processes (16 node(s) x 8 GPU(s))" in out
    assert "global 128," in out


def test_fsdp(tmp_path):
    out = assert_ok(dry_run(tmp_path, FSDP="1", GPUS_PER_NODE="2"))
    assert "world 2 = TP 1 x CP 1 x PP 1 x DP 2" in out
    assert "megatron-fsdp (optim_grads_params)" in out
    # megatron's output layer is no TE layer: without APEX it refuses fused grad accumulation.
    assert "--no-gradient-accumulation-fusion" in out


def test_logging_and_loader_knobs(tmp_path):
    out = assert_ok(dry_run(tmp_path, TIMING_LOG_LEVEL="2", NUM_WORKERS="5"))
    assert "--timing-log-level 2" in out and "--num-workers 5" in out


def test_nan_check_stops_cleanly_without_a_save_directory(tmp_path):
    assert "--rerun-mode disabled" in assert_ok(dry_run(tmp_path))
    out = assert_ok(dry_run(tmp_path, CKPT_SAVE=str(tmp_path / "ckpt")))
    assert "--rerun-mode" not in out


def test_min_lr_follows_a_low_peak(tmp_path):
    # Fine-tuning peaks are often below the pretraining floor: MIN_LR defaults to LR / 10.
    out = assert_ok(dry_run(tmp_path, LR="1e-5"))
    assert "--lr 1e-5 --min-lr 1e-06" in out


def test_te_cross_entropy_is_the_default_outside_deterministic_mode(tmp_path):
    # TE's fused cross entropy: 5x faster and 15 GiB less than megatron's native one at 8k tokens
    # (docs/results.md); megatron-core 0.19.2's validation accepts it through megatron_compat.
    out = assert_ok(dry_run(tmp_path))
    assert "--cross-entropy-loss-fusion --cross-entropy-fusion-impl te" in out
    deterministic = assert_ok(dry_run(tmp_path, DETERMINISTIC="1"))
    assert "--cross-entropy-loss-fusion" not in deterministic


def test_vision_cuda_graph_reaches_megatron_with_te_rng_tracker(tmp_path):
    out = assert_ok(dry_run(tmp_path, VISION_CUDA_GRAPH="1", VISION_GRAPH_PATCHES="4096"))
    assert "--vision-cuda-graph-patches 4096 --vision-cuda-graph-images 16 --te-rng-tracker" in out
    assert "--vision-cuda-graph" not in assert_ok(dry_run(tmp_path))
    graphs = {"VISION_CUDA_GRAPH": "1", "VISION_GRAPH_PATCHES": "4096"}
    # Data and expert parallelism keep the graphs (verified on two GPUs); TP, CP, PP, FSDP do not.
    for knobs in (
        {"GPUS_PER_NODE": "2"},
        {"MODEL_VARIANT": "proxy-moe", "EP": "2", "GPUS_PER_NODE": "2"},
    ):
        parallel = assert_ok(dry_run(tmp_path, **graphs, **knobs))
        assert "--vision-cuda-graph-patches 4096" in parallel
    for knobs in ({"TP": "2"}, {"FSDP": "1"}):
        assert_fails(
            dry_run(tmp_path, **graphs, GPUS_PER_NODE="2", **knobs), "set VISION_CUDA_GRAPH=0"
        )


def test_vision_cuda_graph_needs_te_rng_tracker():
    args = megatron_like_args(
        vision_cuda_graph_patches=4096, tensor_model_parallel_size=1, sequence_parallel=False
    )
    args.world_size = 1
    with pytest.raises(ValueError, match="needs --te-rng-tracker"):
        validate_multimodal_args(args)
    args.te_rng_tracker = True
    validate_multimodal_args(args)


def test_tp_cp_packed(tmp_path):
    out = assert_ok(dry_run(tmp_path, TP="2", CP="2", GPUS_PER_NODE="4", PACKED="1"))
    assert "world 4 = TP 2 x CP 2 x PP 1 x DP 1" in out
    assert "sequence parallel on" in out
    assert "THD packed, pad multiple 8" in out


def test_moe_expert_parallel(tmp_path):
    out = assert_ok(dry_run(tmp_path, MODEL_VARIANT="proxy-moe", EP="2", GPUS_PER_NODE="2"))
    assert "world 2 = TP 1 x CP 1 x PP 1 x DP 2; EP 2" in out
    assert "MoE 16 experts top-4" in out
    # EXPERT_GEMM=auto: the stacked experts serve this run, and not megatron-fsdp's.
    assert "--expert-gemm auto" in out
    assert "routed experts' GEMMs: one torch grouped GEMM over all experts" in out
    sharded = assert_ok(
        dry_run(tmp_path, MODEL_VARIANT="proxy-moe", EP="2", GPUS_PER_NODE="2", FSDP="1")
    )
    assert "routed experts' GEMMs: TE grouped linear layers" in sharded


def test_torch_expert_gemm_reaches_megatron_and_the_plan(tmp_path):
    out = assert_ok(dry_run(tmp_path, MODEL_VARIANT="proxy-moe", EXPERT_GEMM="torch"))
    assert "--expert-gemm torch" in out
    assert (
        "routed experts' GEMMs: one torch grouped GEMM over all experts, their weights stacked"
        in out
    )


def test_expert_parallelism_spans_context_parallel_ranks(tmp_path):
    # megatron lays experts out over TP x EP x expert-DP, independent of CP.
    out = assert_ok(dry_run(tmp_path, MODEL_VARIANT="proxy-moe", CP="2", EP="2", GPUS_PER_NODE="2"))
    assert "world 2 = TP 1 x CP 2 x PP 1 x DP 1; EP 2" in out


def test_allgather_context_parallelism_uses_te_spelling(tmp_path):
    out = assert_ok(dry_run(tmp_path, CP="2", CP_COMM_TYPE="allgather", GPUS_PER_NODE="2"))
    assert "--cp-comm-type all_gather" in out


@pytest.mark.parametrize(
    ("knobs", "needles"),
    [
        (
            {"MODEL_VARIANT": "nope"},
            ["MODEL_VARIANT", "unknown Qwen3.5-VL variant 'nope'", "valid variants:", "397b_a17b"],
        ),
        ({"MODEL_VARIANT": "9b", "EP": "2"}, ["EP=2", "dense", "use EP=1"]),
        ({"PP": "2"}, ["PP=2", "pipeline parallelism is not supported", "use PP=1"]),
        ({"TP": "3", "GPUS_PER_NODE": "2"}, ["world size 2", "is not divisible by TP x CP"]),
        ({"CP_COMM_TYPE": "bogus"}, ["CP_COMM_TYPE=bogus", "p2p, a2a"]),
        ({"DATASET": "nope"}, ["unknown dataset provider 'nope'", "cord_v2, mock"]),
        (
            {"SEQ_LEN": "1001", "CP": "2", "GPUS_PER_NODE": "2"},
            ["SEQ_LEN=1001: not a multiple of 4 (2 x CP=2)", "use SEQ_LEN=1000 or 1004"],
        ),
        (
            {"SEQ_LEN": "1001", "TP": "2", "GPUS_PER_NODE": "2"},
            ["SEQ_LEN=1001: not a multiple of 2 (TP=2 with sequence parallelism)"],
        ),
        (
            {"SEQ_LEN": "1001", "TP": "2", "CP": "2", "GPUS_PER_NODE": "4"},
            ["not a multiple of 8 (2 x CP=2 x TP=2 with sequence parallelism)", "1000 or 1008"],
        ),
        ({"DETERMINISTIC": "1", "PACKED": "1"}, ["DETERMINISTIC=1 needs BSHD", "PACKED=0"]),
        ({"TIMING_LOG_LEVEL": "3"}, ["TIMING_LOG_LEVEL=3", "use 0, 1 or 2"]),
        ({"LR": "1e-5", "MIN_LR": "3e-5"}, ["MIN_LR=3e-5 is above LR=1e-5"]),
        (
            {"CP": "8", "GPUS_PER_NODE": "8", "PACKED": "1"},
            ["Gated DeltaNet key heads: proxy has 4", "TP 1 x CP 8", "dividing 4"],
        ),
        (
            {"MODEL_VARIANT": "proxy-moe", "EP": "4", "GPUS_PER_NODE": "2"},
            ["EP=4: world size 2 is not divisible by TP x EP x PP", "use an EP"],
        ),
        ({"TRAIN_ITERS": "5"}, ["WARMUP_ITERS=10 must be below TRAIN_ITERS=5"]),
        ({"VISION_CUDA_GRAPH": "1"}, ["VISION_CUDA_GRAPH=1 needs VISION_GRAPH_PATCHES"]),
        (
            {
                "VISION_CUDA_GRAPH": "1",
                "VISION_GRAPH_PATCHES": "4096",
                "CP": "2",
                "GPUS_PER_NODE": "2",
            },
            ["VISION_CUDA_GRAPH=1 is verified on one GPU and with data or expert", "CP=2"],
        ),
        (
            {"VISION_CUDA_GRAPH": "1", "VISION_GRAPH_PATCHES": "4096", "RECOMPUTE_VISION": "1"},
            ["exclude each other", "VISION_CUDA_GRAPH=0 or RECOMPUTE_VISION=0"],
        ),
        (
            {"MODEL": "qwen3_vl", "VISION_CUDA_GRAPH": "1", "VISION_GRAPH_PATCHES": "4096"},
            ["verified with Qwen3.5-VL's vision tower only", "DeepStack", "VISION_CUDA_GRAPH=0"],
        ),
    ],
    ids=[
        "bad-variant",
        "ep-on-dense",
        "pp",
        "world-not-divisible",
        "cp-comm-type",
        "bad-dataset",
        "seq-len-cp",
        "seq-len-tp-sp",
        "seq-len-tp-cp",
        "deterministic-packed",
        "timing-level",
        "min-lr-above-lr",
        "gdn-heads-over-cp",
        "ep-not-dividing-world",
        "warmup-beyond-schedule",
        "vision-graph-without-budget",
        "vision-graph-with-cp",
        "vision-graph-with-recompute",
        "vision-graph-qwen3-vl",
    ],
)
def test_bad_settings_fail_with_the_fix(tmp_path, knobs, needles):
    assert_fails(dry_run(tmp_path, **knobs), *needles)


def fake_checkpoint(
    tmp_path, step: str, torch_dist: bool, mtp: bool = True, hf_config_of: str | None = None
) -> str:
    """A save directory with what the launcher reads: the tracker, a distributed checkpoint of
    two tiny tensors (one of them MTP's, with `mtp`) under megatron's keys, and with
    `hf_config_of` the HF config.json of that variant, as `import` keeps it."""
    import torch
    import torch.distributed.checkpoint as dcp

    save = tmp_path / "ckpt"
    directory = save / ("release" if step == "release" else f"iter_{int(step):07d}")
    keys = ["language_model.embedding.word_embeddings.weight"]
    if mtp:
        keys.append("language_model.mtp.layers.0.eh_proj.weight")
    state = {key: torch.zeros(2) for key in keys}
    with warnings.catch_warnings():  # one process saving is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    (save / "latest_checkpointed_iteration.txt").write_text(step)
    if torch_dist:
        (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    if hf_config_of:
        get_variant(hf_config_of).to_hf_config().to_json_file(str(save / "config.json"))
    return str(save)


@pytest.mark.parametrize(
    ("step", "torch_dist", "knobs", "needles"),
    [
        ("release", True, {}, ["imported (release) checkpoint", "CKPT_RESUME=0"]),
        ("release", True, {"FSDP": "1", "CKPT_RESUME": "0"}, ["--format fsdp_dtensor"]),
        ("20", False, {}, ["fsdp_dtensor checkpoint", "set FSDP=1"]),
    ],
    ids=["resume-from-import", "fsdp-loads-torch-dist", "ddp-loads-fsdp-dtensor"],
)
def test_checkpoint_to_load_is_checked(tmp_path, step, torch_dist, knobs, needles):
    ckpt = fake_checkpoint(tmp_path, step, torch_dist)
    assert_fails(dry_run(tmp_path, CKPT_LOAD=ckpt, **knobs), *needles)


def test_missing_checkpoint_fails_unless_it_is_the_auto_resume_directory(tmp_path):
    missing = str(tmp_path / "nothing_here")
    assert_fails(dry_run(tmp_path, CKPT_LOAD=missing), "has no latest_checkpointed_iteration.txt")
    out = assert_ok(dry_run(tmp_path, CKPT_LOAD=missing, CKPT_SAVE=missing))
    assert f"--save {missing}" in out and f"--load {missing}" in out


def test_fine_tune_from_an_import_plans(tmp_path):
    ckpt = fake_checkpoint(tmp_path, "release", torch_dist=False)
    out = assert_ok(dry_run(tmp_path, CKPT_LOAD=ckpt, CKPT_RESUME="0", FSDP="1", GPUS_PER_NODE="2"))
    assert f"--load {ckpt} --finetune --no-load-optim --no-load-rng" in out
    assert "--ckpt-format fsdp_dtensor" in out


def test_fine_tune_from_an_import_of_the_same_model_without_mtp(tmp_path):
    ckpt = fake_checkpoint(tmp_path, "release", torch_dist=True, mtp=False, hf_config_of="proxy")
    out = assert_ok(dry_run(tmp_path, CKPT_LOAD=ckpt, CKPT_RESUME="0", MTP_NUM_LAYERS="0"))
    assert "--mtp-num-layers 0" in out


def test_cord_v2_without_data_path_names_the_flag(tmp_path):
    assert_fails(dry_run(tmp_path, DATASET="cord_v2"), "cord_v2 dataset needs --dataset-path")


def test_moe_from_an_hf_config_gets_expert_parallelism_and_the_moe_fusions(tmp_path):
    # The launcher looks at the model trained (the --hf-config-path after the script name), not
    # MODEL_VARIANT, for EP and the MoE flags.
    config_dir = str(tmp_path / "moe_config")
    get_variant("proxy-moe").to_hf_config().save_pretrained(config_dir)
    out = assert_ok(dry_run(tmp_path, "--hf-config-path", config_dir, EP="2", GPUS_PER_NODE="2"))
    assert f"DRY RUN qwen35_vl / {config_dir} (from_hf_config)" in out
    assert "world 2 = TP 1 x CP 1 x PP 1 x DP 2; EP 2" in out
    assert "--moe-permute-fusion --moe-router-fusion" in out


def test_expert_parallelism_beyond_tensor_and_context_parallel_ranks(tmp_path):
    # 16 GPUs = TP 2 x CP 2 x DP 4 for dense layers and TP 2 x EP 8 for experts: megatron's
    # layout accepts it although TP x CP x EP = 32 does not divide 16.
    out = assert_ok(
        dry_run(tmp_path, MODEL_VARIANT="proxy-moe", TP="2", CP="2", EP="8", GPUS_PER_NODE="16")
    )
    assert "world 16 = TP 2 x CP 2 x PP 1 x DP 4; EP 8" in out


def test_launcher_facts_follow_an_hf_config_path(tmp_path):
    facts = launcher_facts(["--model-variant", "9b"])
    assert facts == {"num_experts": 0, "gpus": torch.cuda.device_count(), "name": "9b"}
    config_dir = str(tmp_path / "moe_config")
    get_variant("proxy-moe").to_hf_config().save_pretrained(config_dir)
    facts = launcher_facts(["--model-variant", "proxy", "--hf-config-path", config_dir])
    assert facts["num_experts"] == get_variant("proxy-moe").text.num_experts


def megatron_like_args(variant: str = "proxy", **overrides) -> argparse.Namespace:
    """Parsed (not validated) megatron arguments of `variant`, as the launcher builds them."""
    from megatron.training.arguments import add_megatron_arguments

    parser = add_multimodal_args(add_megatron_arguments(argparse.ArgumentParser()))
    spec = get_model_spec("qwen35_vl")
    flags = megatron_flags(architecture_dests(spec, get_variant(variant)))
    args = vars(parser.parse_args(flags))
    args.update(
        total_seq_length=1001,
        seq_length=1001,
        pipeline_model_parallel_size=1,
        dataloader_type="external",
        calculate_per_token_loss=True,
        model_name="qwen35_vl",
        model_variant=variant,
        hf_config_path=None,
        mtp_num_layers=None,
        expert_model_parallel_size=1,
        packed_sequence=False,
        context_parallel_size=1,
        tensor_model_parallel_size=2,
        sequence_parallel=True,
        train_iters=20,
        lr_decay_iters=None,
        lr_warmup_iters=5,
        moe_router_fusion=False,
        moe_router_load_balancing_type="aux_loss",
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def test_seq_length_check_names_the_multiple():
    with pytest.raises(ValueError, match="--total-seq-length 1001 must be a multiple of 8"):
        validate_multimodal_args(megatron_like_args(context_parallel_size=2))
    packed = megatron_like_args(context_parallel_size=2, packed_sequence=True)
    validate_multimodal_args(packed)
    assert packed.total_seq_length == 1001


def test_warmup_must_end_before_the_schedule():
    with pytest.raises(ValueError, match=r"--lr-warmup-iters 10 \(WARMUP_ITERS\) must be below"):
        validate_multimodal_args(megatron_like_args(lr_warmup_iters=10, train_iters=5))


def test_fused_router_refuses_sequence_aux_loss():
    args = megatron_like_args(
        moe_router_fusion=True, moe_router_load_balancing_type=["seq_aux_loss"]
    )
    with pytest.raises(ValueError, match="seq_aux_loss with --moe-router-fusion"):
        validate_multimodal_args(args)


def test_seq_length_message_arithmetic_without_cp():
    with pytest.raises(ValueError) as error:
        validate_multimodal_args(megatron_like_args())
    message = str(error.value)
    assert "must be a multiple of 2 " in message
    assert "2 x CP 1 x TP 2" not in message


@pytest.mark.parametrize(
    ("variant", "flags", "needles"),
    [
        ("proxy", {"hidden_size": 1024}, ["--hidden-size 1024", "has 512", "--hf-config-path"]),
        ("proxy", {"num_experts": 8}, ["--num-experts 8", "MODEL_VARIANT=proxy"]),
        ("0.8b", {"untie_embeddings_and_output_weights": True}, ["--untie-embeddings"]),
        ("proxy-moe", {"moe_aux_loss_coeff": [0.01]}, ["--moe-aux-loss-coeff 0.01", "0.001"]),
    ],
    ids=["hidden-size", "experts-on-dense", "untie-a-tied-model", "aux-loss-coefficient"],
)
def test_architecture_flags_must_match_the_model(variant, flags, needles):
    # The model is built from the variant; megatron would plan and count FLOPs with the flag.
    with pytest.raises(ValueError) as error:
        validate_multimodal_args(megatron_like_args(variant, **flags))
    assert all(needle in str(error.value) for needle in needles), str(error.value)


@pytest.mark.parametrize(
    ("variant", "flags", "needle"),
    [
        ("proxy", {}, "proxy is dense; use EXPERT_GEMM=te (--expert-gemm)"),
        ("proxy-moe", {"use_megatron_fsdp": True}, "megatron-fsdp (FSDP=1)"),
        ("proxy-moe", {"fp8": "hybrid"}, "FP8 (--fp8-format)"),
        ("proxy-moe", {"delay_wgrad_compute": True}, "--delay-wgrad-compute"),
    ],
    ids=["dense", "megatron-fsdp", "fp8", "delayed-wgrad"],
)
def test_torch_expert_gemm_refuses_what_it_does_not_serve(variant, flags, needle):
    args = megatron_like_args(
        variant, expert_gemm="torch", seq_length=1000, total_seq_length=1000, **flags
    )
    with pytest.raises(ValueError) as error:
        validate_multimodal_args(args)
    assert "EXPERT_GEMM=torch (--expert-gemm)" in str(error.value)
    assert needle in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("variant", "flags", "expected"),
    [
        ("proxy-moe", {"expert_tensor_parallel_size": 1}, "torch"),
        ("proxy-moe", {"expert_tensor_parallel_size": 1, "use_megatron_fsdp": True}, "te"),
        ("proxy-moe", {"expert_tensor_parallel_size": 1, "fp8": "hybrid"}, "te"),
        ("proxy-moe", {}, "te"),  # expert TP follows TP=2
        ("proxy", {"expert_tensor_parallel_size": 1}, "te"),
    ],
    ids=["moe", "megatron-fsdp", "fp8", "expert-tp", "dense"],
)
def test_auto_expert_gemm_takes_torch_where_it_serves(variant, flags, expected):
    args = megatron_like_args(
        variant, expert_gemm="auto", seq_length=1000, total_seq_length=1000, **flags
    )
    validate_multimodal_args(args)
    assert args.expert_gemm == expected


def test_torch_expert_gemm_on_a_moe_model_passes():
    # TP=2 here: the experts stay whole with expert tensor parallelism 1.
    args = megatron_like_args(
        "proxy-moe",
        expert_gemm="torch",
        expert_tensor_parallel_size=1,
        seq_length=1000,
        total_seq_length=1000,
    )
    validate_multimodal_args(args)
    with pytest.raises(ValueError, match="expert tensor parallelism 2"):
        validate_multimodal_args(
            megatron_like_args(
                "proxy-moe", expert_gemm="torch", seq_length=1000, total_seq_length=1000
            )
        )


def test_architecture_flags_equal_to_the_model_pass():
    # megatron's validation unwraps one-element lists such as --moe-aux-loss-coeff's.
    args = megatron_like_args(
        "proxy-moe",
        moe_aux_loss_coeff=0.001,
        hidden_size=512,
        seq_length=1000,
        total_seq_length=1000,
    )
    validate_multimodal_args(args)


def test_cord_v2_dry_run_reads_the_data_and_prints_the_plan_alone(tmp_path):
    from scripts.cord_fixture import write_fixture

    fixture = write_fixture(tmp_path / "cord")
    result = dry_run(
        tmp_path,
        DATASET="cord_v2",
        DATA_PATH=str(fixture.root),
        HF_TOKENIZER_PATH=str(fixture.tokenizer_dir),
    )
    out = assert_ok(result)
    assert f"data: cord_v2 train: {len(fixture.rows['train']):,} rows" in out
    assert "data: tokenizer " in out and "image token id" in out
    assert "Warning" not in out + result.stderr  # library warnings go to RUN_DIR's logs


def launch_with_fake_python(tmp_path, gpu: bool) -> subprocess.CompletedProcess:
    """A real (non-dry) launch whose Python reports `gpu` GPUs in the launcher's facts (the
    second value `python -m arguments` prints) and stands in for torchrun with one printed line;
    everything else goes to the real interpreter."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = -m ] && [ "$2" = arguments ]; then '
        f'out=$({PYTHON} "$@") || {{ echo "$out"; exit 1; }}; '
        f"echo \"$out\" | awk '{{ $2 = {int(gpu)}; print }}'; exit 0; fi\n"
        'if [ "$1" = -m ] && [ "$2" = torch.distributed.run ]; then '
        'echo "training would start: $*"; echo "a warning" >&2; exit 0; fi\n'
        f'exec {PYTHON} "$@"\n'
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(PYTHON=str(fake), GPUS_PER_NODE="1", RUN_DIR=str(tmp_path / "run"))
    return subprocess.run(
        ["bash", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_run_output_is_kept_in_run_dir(tmp_path):
    result = launch_with_fake_python(tmp_path, gpu=True)
    assert result.returncode == 0, result.stderr
    (log,) = (tmp_path / "run" / "logs").glob("*-node0.log")
    kept = log.read_text()
    assert "training would start: -m torch.distributed.run" in kept and "a warning" in kept
    assert f"stdout and stderr also go to {log}" in result.stdout


def test_run_without_gpu_says_so_in_one_line(tmp_path):
    result = launch_with_fake_python(tmp_path, gpu=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "run_qwen35_vl.sh: error: no GPU found: use DRY_RUN=1 to validate the configuration on "
        "the CPU"
    )

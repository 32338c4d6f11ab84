"""pretrain_multimodal on CPU with megatron's own parsed arguments (TE's fused cross entropy
accepted): datasets_provider as pretrain()
calls it (mock provider, our loader and collate, the throughput meter printing tokens/s and model
TFLOP/s per GPU), the arguments a checkpoint stores passing megatron's resume-time model check,
`--help` (megatron-core 0.19.2 has help strings with a bare `%`) and a real run without a GPU.
Runs in subprocesses because megatron's argument parsing sets process-wide globals."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import os, sys
sys.path.insert(0, os.getcwd())
import pretrain_multimodal
from megatron.core import parallel_state
from megatron.training import global_vars

args = pretrain_multimodal.parse_args([
    "--model-variant", "proxy", "--micro-batch-size", "1", "--global-batch-size", "2",
    "--seq-length", "1024", "--train-iters", "3", "--lr", "1e-4", "--bf16",
    "--tokenizer-type", "NullTokenizer", "--dataloader-type", "external", "--num-workers", "0",
    "--calculate-per-token-loss", "--log-interval", "1", "--use-distributed-optimizer",
    "--no-gradient-accumulation-fusion", "--eval-iters", "1", "--eval-interval", "2", "--dry-run",
    "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te",
])
print("cross entropy", args.cross_entropy_loss_fusion, args.cross_entropy_fusion_impl)
global_vars.set_args(args)
# pretrain() would have built the process groups; one data-parallel rank here.
parallel_state.get_data_parallel_world_size = lambda *a, **k: 1
parallel_state.get_data_parallel_rank = lambda *a, **k: 0
train, valid, test = pretrain_multimodal.datasets_provider((6, 2, 2))
for iteration in range(3):
    args.curr_iteration = iteration
    for _ in range(args.global_batch_size):
        batch = next(train)
    if iteration == 1:
        next(valid)  # an evaluation after iteration 2: that interval is not reported
print("batch", tuple(batch["input_ids"].shape), batch["loss_mask"].sum().item() > 0)

# What a checkpoint stores of these arguments, and megatron's resume-time model check on it (our
# model wraps its HybridModel, so the check sees no HybridModel along the wrapper chain).
import copy, pickle, types, torch
from megatron.training.checkpointing import _maybe_setup_gpt_to_hybrid_load
saved = pickle.loads(pickle.dumps(args))
print("saved", type(saved).__name__, hasattr(saved, "hybrid_layer_pattern"),
      saved.language_hybrid_layer_pattern == args.hybrid_layer_pattern)
print("copies keep it", copy.deepcopy(args).hybrid_layer_pattern == args.hybrid_layer_pattern,
      copy.copy(args).hybrid_layer_pattern == args.hybrid_layer_pattern)
wrapper = [torch.nn.Linear(1, 1)]
print("resume check", _maybe_setup_gpt_to_hybrid_load(args, saved, wrapper))
try:
    _maybe_setup_gpt_to_hybrid_load(args, types.SimpleNamespace(**vars(args)), wrapper)
except RuntimeError as error:
    print("unfiltered args", "saved by a hybrid model run" in str(error))
"""


def test_data_throughput_and_saved_arguments():
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    probe = [sys.executable, "-c", PROBE]
    result = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "> mock data: train 6, valid 2, test 2 samples; BSHD batches of 1 x 1024 tokens" in out
    assert "batch (1, 1024) True" in out
    # megatron-core 0.19's validation refuses TE's cross entropy; megatron_compat lets it through.
    assert "cross entropy True te" in out
    lines = [line for line in out.splitlines() if line.startswith(" per GPU:")]
    assert len(lines) == 1 and lines[0].endswith("(iterations 1-1)"), lines
    assert "tokens/s" in lines[0] and "model TFLOP/s" in lines[0]
    assert "saved Namespace False True" in out
    assert "copies keep it True True" in out
    assert "resume check (None, False)" in out
    assert "unfiltered args True" in out  # what megatron would do with the pattern saved


def test_help_lists_megatron_flags_and_ours():
    help_ = [sys.executable, "pretrain_multimodal.py", "--model-variant", "9b", "--help"]
    result = subprocess.run(help_, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("usage: pretrain_multimodal.py")
    assert "multimodal playground:" in out and "--dry-run" in out and "--model-variant" in out
    assert "--tensor-model-parallel-size" in out
    assert "e.g. 1.10 = 10%" in out  # one of megatron's help strings with a bare %


def test_real_run_without_a_gpu_says_so_in_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = [sys.executable, "pretrain_multimodal.py", "--model-variant", "proxy"]
    result = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: no GPU found: use DRY_RUN=1 to validate the configuration on the CPU"
    ]

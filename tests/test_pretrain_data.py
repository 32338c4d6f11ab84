"""pretrain_multimodal.datasets_provider as megatron's pretrain() calls it, on CPU: megatron's
own parsed arguments, the mock provider, our loader and collate, and the throughput meter that
prints tokens/s and model TFLOP/s per GPU as iterations advance. Runs in a subprocess because
megatron's argument parsing sets process-wide globals."""

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
])
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
"""


def test_datasets_provider_feeds_batches_and_logs_throughput():
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    probe = [sys.executable, "-c", PROBE]
    result = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "> mock data: train 6, valid 2, test 2 samples; BSHD batches of 1 x 1024 tokens" in out
    assert "batch (1, 1024) True" in out
    lines = [line for line in out.splitlines() if line.startswith(" per GPU:")]
    assert len(lines) == 1 and lines[0].endswith("(iterations 1-1)"), lines
    assert "tokens/s" in lines[0] and "model TFLOP/s" in lines[0]

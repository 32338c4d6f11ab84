#!/usr/bin/env bash
# Run one group of the GPU verifications, logs and TensorBoard files under OUT_DIR/<step>, a
# summary table on stdout. Each step fits a 10-minute run on a warm machine (the first
# Gated DeltaNet step of a fresh machine spends ~2 minutes compiling kernels).
#   scripts/run_gpu_checks.sh parity|thd|training|cord|convert|bench|bench_row|experts OUT_DIR  # 1 GPU
#     (convert = the checkpoint load test, then `finetune`: import, fine-tunes, loss against HF)
#   [STEPS="..."] scripts/run_gpu_checks.sh side_by_side             OUT_DIR   # STEPS (default:
#     thd parity convert training) at once on one GPU (their timings are not performance figures)
#   scripts/run_gpu_checks.sh cp|cp_curve|bench_cp|finetune_layouts  OUT_DIR   # two GPUs
#   scripts/run_gpu_checks.sh fusions                                  OUT_DIR   # 1-2 GPUs: the
#     speed-ups against megatron's own paths (output layer, wgrad, token scaling, vision graphs)
#   scripts/run_gpu_checks.sh qwen3_vl                                 OUT_DIR   # two GPUs: the
#     second model family's parity, import, fine-tunes (1 GPU, CP=2 THD) and export
#   [MATRIX_JOBS=12] scripts/run_gpu_checks.sh matrix                 OUT_DIR   # 1-2 GPUs: every
#     launcher configuration (scripts/launcher_matrix.py), runs side by side
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEP=${1:?step: parity, thd, training, cord, convert, finetune, bench, bench_row, experts, side_by_side, cp, cp_curve, bench_cp, finetune_layouts, qwen3_vl, fusions or matrix}
OUT=$(realpath -m "${2:?output directory}")/$STEP
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
source scripts/torch_cudnn.sh
# KERNEL_CACHE=DIR keeps Triton, tilelang and inductor kernels in DIR: a fresh machine spends about
# 2 minutes per process compiling them, and a DIR brought from an earlier machine skips that.
if [ -n "${KERNEL_CACHE:-}" ]; then
  KERNEL_CACHE=$(realpath -m "$KERNEL_CACHE")
  export TRITON_CACHE_DIR=$KERNEL_CACHE/triton TILELANG_CACHE_DIR=$KERNEL_CACHE/tilelang \
    TORCHINDUCTOR_CACHE_DIR=$KERNEL_CACHE/inductor
fi

# Steps may run side by side on one machine, so every launcher gets a port nobody holds.
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
bench_layers() {  # decoder layers of the 9B-widths benchmark model: 8 fit an H200, 4 an H100
  nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 |
    awk '{print ($1 > 100000) ? 8 : 4}'
}
table() { grep -E "^\||^###" "$1" | grep -v "^|---\|^| check" ; }
train() {  # name, then VAR=value ... for scripts/run_qwen35_vl.sh
  local name=$1; shift
  env RUN_DIR="$OUT/$name" MASTER_PORT="$(free_port)" EVAL_INTERVAL=1000 EVAL_ITERS=0 "$@" ./scripts/run_qwen35_vl.sh \
    > "$OUT/$name.log" 2>&1 || echo "$name failed: see $OUT/$name.log"
  grep -E "iteration +[0-9]+/" "$OUT/$name.log" | sed -n '1p;$p' | cut -c1-260
}
first_losses() {  # iteration-1 'lm loss' of each named run (float32 TensorBoard scalars); runs
  # after the first are compared with it: the same data through another layout or format must
  # agree to the bf16 floor (limit 1e-2 relative: bf16 logits sit within 7.6e-3 of fp32).
  "$PYTHON" - "$OUT" "$@" <<'PY'
import sys
from scripts.plot_training import read_scalars
out, names = sys.argv[1], sys.argv[2:]
reference = None
for name in names:
    losses = read_scalars(f"{out}/{name}/tensorboard", "lm loss")
    if not losses:
        print(f"| {name} | no lm loss logged: see {out}/{name}.log |")
        continue
    first = losses.get(1, float("nan"))
    row = f"| {name} | iteration 1 lm loss {first:.7f} | last {losses[max(losses)]:.4f} at {max(losses)} |"
    if reference is None:
        reference = first
    else:
        rel = abs(first - reference) / abs(reference)
        row += f" vs {names[0]}: rel {rel:.2e} (limit 1e-2) {'pass' if rel <= 1e-2 else 'FAIL'} |"
    print(row)
PY
}
random_hf_checkpoint() {  # variant, directory: a random HF model of that variant with MTP tensors
  "$PYTHON" - "$1" "$2" <<'PY'
import sys
import torch
from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration
from models.qwen35_vl.configuration import get_variant
from scripts.hf_checkpoint import save_hf_checkpoint
config = get_variant(sys.argv[1])
hf_config = config.to_hf_config()
hf_config.text_config.initializer_range = 0.05
torch.manual_seed(0)
hf_class = Qwen3_5MoeForConditionalGeneration if config.text.is_moe else Qwen3_5ForConditionalGeneration
model = hf_class(hf_config).to(torch.bfloat16)
save_hf_checkpoint(model, config, sys.argv[2], with_mtp=True, max_shard_size="200MB")
PY
}
compare_curves() {  # the whole lm-loss curves of two named runs: largest relative difference
  "$PYTHON" - "$OUT" "$1" "$2" <<'PY'
import sys
from scripts.plot_training import read_scalars
out, first, second = sys.argv[1:]
one, two = (read_scalars(f"{out}/{name}/tensorboard", "lm loss") for name in (first, second))
steps = sorted(set(one) & set(two))
worst = max((abs(two[i] - one[i]) / one[i] for i in steps), default=float("nan"))
print(f"| {second} vs {first} lm-loss curve | {len(steps)} common iterations | max rel diff {worst:.2e} |")
PY
}

case "$STEP" in
  side_by_side)
    read -ra steps <<< "${STEPS:-thd parity convert training}"
    for step in "${steps[@]}"; do
      "$PWD/scripts/run_gpu_checks.sh" "$step" "$(dirname "$OUT")" > "$OUT/$step.summary" 2>&1 &
    done
    wait
    for step in "${steps[@]}"; do echo "### $step"; cat "$OUT/$step.summary"; done ;;
  parity)
    # Both at once: with TF32 as training runs it, and with TF32 refused by cuBLAS (TE included),
    # where the fp32 rows face the goals themselves.
    timeout 280 torchrun --standalone --nproc-per-node 1 tests/test_hf_parity.py > "$OUT/parity.log" 2>&1 &
    NVIDIA_TF32_OVERRIDE=0 timeout 280 torchrun --standalone --nproc-per-node 1 \
      tests/test_hf_parity.py > "$OUT/parity_no_tf32.log" 2>&1
    wait
    table "$OUT/parity.log"
    echo "### NVIDIA_TF32_OVERRIDE=0"; table "$OUT/parity_no_tf32.log" ;;
  thd)
    # TE's THD attention backward alone, under its default backend (cuDNN fused attention) and
    # with fused attention off (TE's unfused path), each against fp32; then whole training steps,
    # THD against BSHD. The log's first line names the cuDNN that TE and torch run.
    for setting in BACKEND_CHOICE=default NVTE_FUSED_ATTN=0; do
      log="$OUT/te_thd_${setting%%=*}.log"
      env "$setting" NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 timeout 150 torchrun --standalone \
        --nproc-per-node 1 tests/test_te_thd_attention.py > "$log" 2>&1
      grep -m1 -E "^cuDNN" "$log"
      grep -m2 -iE "selected backend|available backends" "$log" | cut -c1-200
      table "$log"
    done
    timeout 360 torchrun --standalone --nproc-per-node 1 tests/test_thd_backward.py > "$OUT/thd.log" 2>&1
    table "$OUT/thd.log" ;;
  training)
    timeout 500 "$PYTHON" tests/test_training_resume.py "$OUT/runs" > "$OUT/training.log" 2>&1
    table "$OUT/training.log"
    rm -rf "$OUT"/runs/*ckpt*
    # The loss curve as a PNG where matplotlib is installed (else draw it later from the events).
    "$PYTHON" scripts/plot_training.py --out "$OUT/loss_curve.png" --title "proxy, mock data" \
      "$OUT"/runs/full/tensorboard "$OUT"/runs/resumed/tensorboard 2>&1 | tail -1 ;;
  cord)
    "$PYTHON" -m scripts.cord_fixture --out "$OUT/data" > "$OUT/fixture.log" 2>&1
    for packed in 0 1; do
      train "cord_packed$packed" DATASET=cord_v2 DATA_PATH="$OUT/data" \
        HF_TOKENIZER_PATH="$OUT/data/tokenizer" PACKED=$packed MODEL_VARIANT=proxy \
        TRAIN_ITERS=100 SEQ_LEN=1024 GBS=4 LR=1e-4
    done
    first_losses cord_packed0 cord_packed1
    rm -rf "$OUT/data/data" ;;
  convert)
    timeout 300 torchrun --standalone --nproc-per-node 1 tests/test_checkpoint_load.py > "$OUT/load.log" 2>&1
    table "$OUT/load.log" ;&
  finetune)
    # A random proxy-sized HF checkpoint with its MTP tensors (initialised wider than usual; random
    # models' losses still sit within 4e-4 of each other, so hf_batch_loss also checks the run
    # against a control model) -> import in both formats -> 20 fine-tuning steps each
    # (torch_dist; megatron-fsdp) -> iteration 1 vs HF.
    random_hf_checkpoint proxy "$OUT/proxy_hf"
    for format in torch_dist fsdp_dtensor; do
      "$PYTHON" scripts/convert_hf_checkpoint.py import --hf-path "$OUT/proxy_hf" --format $format \
        --out "$OUT/proxy_$format" > "$OUT/import_$format.log" 2>&1; tail -1 "$OUT/import_$format.log"
    done
    finetune=(MODEL_VARIANT=proxy TRAIN_ITERS=20 SEQ_LEN=1024 GBS=4 LR=1e-5 CKPT_RESUME=0 GPUS_PER_NODE=1)
    train finetune "${finetune[@]}" CKPT_LOAD="$OUT/proxy_torch_dist"
    train finetune_fsdp "${finetune[@]}" CKPT_LOAD="$OUT/proxy_fsdp_dtensor" FSDP=1
    grep -iE "loading.*checkpoint|successfully loaded" "$OUT/finetune.log" | head -3 | cut -c1-200
    first_losses finetune finetune_fsdp
    # Iteration 1 runs on the compute weights; later ones on what the optimizer stepped, so the
    # curves part unless FSDP's fp32 main weights hold the checkpoint too.
    compare_curves finetune finetune_fsdp
    "$PYTHON" -m scripts.hf_batch_loss --hf-path "$OUT/proxy_hf" --seq-len 1024 --gbs 4 \
      --train-iters 20 "$OUT/finetune/tensorboard" "$OUT/finetune_fsdp/tensorboard" \
      > "$OUT/hf_loss.log" 2>&1
    table "$OUT/hf_loss.log"
    rm -rf "$OUT/proxy_hf" "$OUT"/proxy_torch_dist "$OUT"/proxy_fsdp_dtensor ;;
  finetune_layouts)
    # An imported checkpoint loaded into other layouts (megatron reshards its global tensors):
    # the dense proxy at TP=2, proxy-moe at EP=2; iteration 1 against HF's loss.
    finetune=(TRAIN_ITERS=20 SEQ_LEN=1024 GBS=4 LR=1e-5 CKPT_RESUME=0 GPUS_PER_NODE=2)
    for variant in proxy proxy-moe; do
      random_hf_checkpoint "$variant" "$OUT/${variant}_hf"
      "$PYTHON" scripts/convert_hf_checkpoint.py import --hf-path "$OUT/${variant}_hf" \
        --out "$OUT/${variant}_ckpt" > "$OUT/import_$variant.log" 2>&1; tail -1 "$OUT/import_$variant.log"
    done
    train finetune_tp2 "${finetune[@]}" MODEL_VARIANT=proxy TP=2 CKPT_LOAD="$OUT/proxy_ckpt"
    train finetune_moe_ep2 "${finetune[@]}" MODEL_VARIANT=proxy-moe EP=2 CKPT_LOAD="$OUT/proxy-moe_ckpt"
    for run in finetune_tp2:proxy finetune_moe_ep2:proxy-moe; do
      "$PYTHON" -m scripts.hf_batch_loss --hf-path "$OUT/${run#*:}_hf" --seq-len 1024 --gbs 4 \
        --train-iters 20 "$OUT/${run%%:*}/tensorboard" > "$OUT/hf_loss_${run%%:*}.log" 2>&1
      table "$OUT/hf_loss_${run%%:*}.log"
    done
    rm -rf "$OUT"/proxy*_hf "$OUT"/proxy*_ckpt ;;
  bench)
    layers=$(bench_layers)
    timeout 450 "$PYTHON" scripts/bench/bench_vs_hf.py --layers "$layers" --profile "$OUT/profile" \
      > "$OUT/bench.log" 2>&1
    grep -E "^\{|^\||^profile|kernels over" "$OUT/bench.log"
    # Data loading's share of a proxy step on mock data (megatron's batch-generator timer).
    train data_share MODEL_VARIANT=proxy TRAIN_ITERS=40 SEQ_LEN=2048 GBS=8 TIMING_LOG_LEVEL=2
    "$PYTHON" - "$OUT/data_share/tensorboard" <<'PY'
import sys
from scripts.plot_training import read_scalars
data, step = (read_scalars(sys.argv[1], tag) for tag in ("batch-generator-time", "iteration-time"))
steady = [i for i in sorted(set(data) & set(step)) if i > 10]
share = sum(data[i] for i in steady) / sum(step[i] for i in steady)
print(f"| data loading share of the step (proxy, mock, iterations {steady[0]}-{steady[-1]}) "
      f"| {100 * share:.2f}% | goal < 5% |")
PY
    ;;
  experts)
    # Routed experts through torch's grouped GEMM: numerics against TE's grouped experts, then
    # the 35B-A3B slice with each beside HF.
    timeout 200 torchrun --standalone --nproc-per-node 1 tests/test_grouped_gemm_experts_vs_te.py \
      > "$OUT/experts.log" 2>&1
    table "$OUT/experts.log"
    for gemm in te torch; do
      timeout 200 "$PYTHON" scripts/bench/bench_vs_hf.py --model moe --layers 4 --expert-gemm $gemm \
        > "$OUT/bench_moe_$gemm.log" 2>&1
      grep -E "^\{|^\|" "$OUT/bench_moe_$gemm.log"
    done ;;
  bench_row)
    # Ours on exactly HF's input (the pack's samples as one sequence), for the like-for-like ratio.
    layers=$(bench_layers)
    timeout 450 "$PYTHON" scripts/bench/bench_vs_hf.py --layers "$layers" --layout row \
      > "$OUT/bench_row.log" 2>&1
    grep -E "^\{|^\|" "$OUT/bench_row.log" ;;
  bench_cp)
    # 32k-token packs: ours with CP=2 on two GPUs, HF on one (it has no context parallelism) with
    # activation checkpointing, its setting for a row this long.
    timeout 560 torchrun --standalone --nproc-per-node 2 scripts/bench/bench_vs_hf.py --layers 4 \
      --pack-tokens 32768 --warmup 2 --iters 5 --hf-activation-checkpointing \
      > "$OUT/bench_cp.log" 2>&1
    grep -E "^\{|^\|" "$OUT/bench_cp.log" ;;
  matrix)
    # Checkpoints outside OUT_DIR: only logs, TensorBoard events and profiles need keeping.
    timeout "${MATRIX_TIMEOUT:-560}" "$PYTHON" scripts/launcher_matrix.py "$OUT" \
      --jobs "${MATRIX_JOBS:-12}" --ckpt-dir "${TMPDIR:-/tmp}/launcher_matrix_ckpt" \
      > "$OUT/matrix.log" 2>&1
    pkill -f pretrain_multimodal.py  # runs still going when the time ran out
    "$PYTHON" scripts/launcher_matrix.py "$OUT" --table-only ;;
  qwen3_vl)
    # The second model family: HF parity (with and without TF32), then random proxy-sized HF
    # checkpoints (dense and MoE) -> import -> 20 fine-tuning steps (dense: one GPU, saved, and
    # CP=2 with THD; MoE: EP=2 with THD) -> iteration 1 against HF's loss on the same batch ->
    # export of the saved dense fine-tune, which transformers loads. Its launcher layouts are the
    # matrix's qwen3vl_* rows.
    timeout 280 torchrun --standalone --nproc-per-node 1 tests/test_qwen3_vl_parity.py \
      > "$OUT/parity.log" 2>&1 &
    NVIDIA_TF32_OVERRIDE=0 timeout 280 torchrun --standalone --nproc-per-node 1 \
      tests/test_qwen3_vl_parity.py > "$OUT/parity_no_tf32.log" 2>&1
    wait
    table "$OUT/parity.log"; echo "### without TF32"; table "$OUT/parity_no_tf32.log"
    for variant in proxy proxy-moe; do
      "$PYTHON" - "$variant" "$OUT/${variant}_hf" <<'PY'
import sys
import torch
from transformers import AutoModelForImageTextToText
from models import get_model_spec
hf_config = get_model_spec("qwen3_vl").get_variant(sys.argv[1]).to_hf_config()
hf_config.text_config.initializer_range = 0.05
torch.manual_seed(0)
AutoModelForImageTextToText.from_config(hf_config, dtype=torch.bfloat16).save_pretrained(sys.argv[2])
PY
      "$PYTHON" scripts/convert_hf_checkpoint.py import --model qwen3_vl \
        --hf-path "$OUT/${variant}_hf" --out "$OUT/${variant}_ckpt" > "$OUT/import_$variant.log" 2>&1
      tail -1 "$OUT/import_$variant.log"
    done
    finetune=(MODEL=qwen3_vl TRAIN_ITERS=20 SEQ_LEN=1024 GBS=4 LR=1e-5 CKPT_RESUME=0)
    dense=("${finetune[@]}" MODEL_VARIANT=proxy CKPT_LOAD="$OUT/proxy_ckpt")
    train finetune "${dense[@]}" GPUS_PER_NODE=1 CKPT_SAVE="$OUT/finetune_ckpt" SAVE_INTERVAL=20
    train finetune_cp2 "${dense[@]}" GPUS_PER_NODE=2 CP=2 PACKED=1
    train finetune_moe_ep2 "${finetune[@]}" MODEL_VARIANT=proxy-moe CKPT_LOAD="$OUT/proxy-moe_ckpt" \
      GPUS_PER_NODE=2 EP=2 PACKED=1
    batch=(--model qwen3_vl --seq-len 1024 --gbs 4 --train-iters 20)
    "$PYTHON" -m scripts.hf_batch_loss "${batch[@]}" --hf-path "$OUT/proxy_hf" \
      "$OUT/finetune/tensorboard" "$OUT/finetune_cp2/tensorboard" > "$OUT/hf_loss.log" 2>&1
    "$PYTHON" -m scripts.hf_batch_loss "${batch[@]}" --hf-path "$OUT/proxy-moe_hf" \
      "$OUT/finetune_moe_ep2/tensorboard" > "$OUT/hf_loss_moe.log" 2>&1
    table "$OUT/hf_loss.log"; table "$OUT/hf_loss_moe.log"
    "$PYTHON" scripts/convert_hf_checkpoint.py export --model qwen3_vl \
      --megatron-path "$OUT/finetune_ckpt" --hf-config "$OUT/proxy_hf" --out "$OUT/exported_hf" \
      > "$OUT/export.log" 2>&1
    tail -1 "$OUT/export.log"
    "$PYTHON" - "$OUT/exported_hf" "$OUT/proxy_hf" <<'PY'
import sys
import torch
from transformers import AutoModelForImageTextToText
tuned, start = (AutoModelForImageTextToText.from_pretrained(p).state_dict() for p in sys.argv[1:])
moved = sum(not torch.equal(tuned[k], start[k]) for k in start)
print(f"| export of the fine-tuned checkpoint loads in transformers | {len(tuned)} tensors, "
      f"{moved} changed by fine-tuning | {'pass' if tuned.keys() == start.keys() and moved else 'FAIL'} |")
PY
    rm -rf "$OUT"/proxy*_hf "$OUT"/proxy*_ckpt "$OUT"/finetune_ckpt "$OUT"/exported_hf ;;
  cp)
    timeout 560 torchrun --standalone --nproc-per-node 2 tests/test_cp_thd_correctness.py > "$OUT/cp.log" 2>&1
    table "$OUT/cp.log" ;;
  fusions)
    # Each speed-up of the training step against megatron's own path, on a tiny model.
    for test in loss_token_output wgrad_fusion token_scaling_fold; do
      timeout 200 torchrun --standalone --nproc-per-node 1 "tests/test_$test.py" > "$OUT/$test.log" 2>&1
      table "$OUT/$test.log"
    done
    # Data parallel on two GPUs where there are two.
    gpus=$(nvidia-smi -L | wc -l)
    timeout 200 torchrun --standalone --nproc-per-node $(( gpus > 1 ? 2 : 1 )) \
      tests/test_vision_cuda_graph.py > "$OUT/vision_cuda_graph.log" 2>&1
    table "$OUT/vision_cuda_graph.log" ;;
  cp_curve)
    common=(MODEL_VARIANT=proxy PACKED=1 TRAIN_ITERS=30 SEQ_LEN=2048 GBS=8)
    train thd_cp1 "${common[@]}" GPUS_PER_NODE=1
    train thd_cp2 "${common[@]}" CP=2 GPUS_PER_NODE=2
    first_losses thd_cp1 thd_cp2
    compare_curves thd_cp1 thd_cp2 ;;
  *) echo "unknown step $STEP" >&2; exit 2 ;;
esac

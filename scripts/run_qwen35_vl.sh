#!/usr/bin/env bash
# Train Qwen3.5-VL with megatron-core: every knob is an environment variable (see README), extra
# arguments are passed on to pretrain_multimodal.py. DRY_RUN=1 validates the whole configuration
# on the CPU (megatron's own argument checks, model configs, parameter counts, memory per GPU).
#   MODEL_VARIANT=proxy ./scripts/run_qwen35_vl.sh
#   DRY_RUN=1 MODEL_VARIANT=397b EP=64 NNODES=16 GPUS_PER_NODE=8 ./scripts/run_qwen35_vl.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "run_qwen35_vl.sh: error: $*" >&2; exit 1; }

if [ -n "${PYTHON:-}" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
else PYTHON=python3; fi
source scripts/torch_cudnn.sh

MODEL_VARIANT=${MODEL_VARIANT:-proxy}
TP=${TP:-1}; CP=${CP:-1}; EP=${EP:-1}; PP=${PP:-1}; FSDP=${FSDP:-0}
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
if [ -z "${GPUS_PER_NODE:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  GPUS_PER_NODE=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
elif [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${GPUS_PER_NODE:-0}" -gt 0 ] || GPUS_PER_NODE=1
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
MBS=${MBS:-1}; SEQ_LEN=${SEQ_LEN:-4096}; PACKED=${PACKED:-0}
DATASET=${DATASET:-mock}; DATA_PATH=${DATA_PATH:-}; HF_TOKENIZER_PATH=${HF_TOKENIZER_PATH:-}
NUM_WORKERS=${NUM_WORKERS:-2}
TRAIN_ITERS=${TRAIN_ITERS:-300}; LR=${LR:-3e-4}
# The cosine schedule ends at a tenth of the peak unless MIN_LR says otherwise.
MIN_LR=${MIN_LR:-$(awk -v lr="$LR" 'BEGIN { printf "%g", lr / 10 }')}
WARMUP_ITERS=${WARMUP_ITERS:-10}; SEED=${SEED:-1234}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}; EVAL_ITERS=${EVAL_ITERS:-2}
RUN_DIR=${RUN_DIR:-runs/qwen35_vl_${MODEL_VARIANT}}
TB_DIR=${TB_DIR:-$RUN_DIR/tensorboard}
CKPT_SAVE=${CKPT_SAVE:-}; CKPT_LOAD=${CKPT_LOAD:-}; CKPT_RESUME=${CKPT_RESUME:-1}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
FORCE_LOAD_BALANCING=${FORCE_LOAD_BALANCING:-0}
RECOMPUTE=${RECOMPUTE:-0}; RECOMPUTE_VISION=${RECOMPUTE_VISION:-0}
MTP_NUM_LAYERS=${MTP_NUM_LAYERS:-}
CP_COMM_TYPE=${CP_COMM_TYPE:-p2p}
PROFILE=${PROFILE:-0}; PROFILE_STEPS=${PROFILE_STEPS:-5:7}; TIMING_LOG_LEVEL=${TIMING_LOG_LEVEL:-0}
LAUNCHER=${LAUNCHER:-torchrun}
DETERMINISTIC=${DETERMINISTIC:-0}
DRY_RUN=${DRY_RUN:-0}

# ---- fail fast on layouts megatron would reject later ----------------------------------------
variant_info=$("$PYTHON" - "$MODEL_VARIANT" <<'PY'
import sys
from models.qwen35_vl.configuration import get_variant
try:
    config = get_variant(sys.argv[1])
except ValueError as error:
    sys.exit(f"run_qwen35_vl.sh: error: MODEL_VARIANT: {error}")
print(config.text.num_experts)
PY
) || exit 1
NUM_EXPERTS=$variant_info
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
[ "$PP" -eq 1 ] || die "PP=$PP: pipeline parallelism is not supported yet (the vision tower and decoder are built whole on every rank); use PP=1"
if [ "$NUM_EXPERTS" -eq 0 ] && [ "$EP" -gt 1 ]; then
  die "EP=$EP needs a mixture-of-experts variant, but MODEL_VARIANT=$MODEL_VARIANT is dense; use EP=1 (or a MoE variant: proxy-moe, 35b_a3b, 122b_a10b, 397b)"
fi
# megatron lays dense layers out as TP x CP x DP x PP and experts as ETP x EP x expert-DP x PP
# (ETP = TP), so EP spans CP and DP ranks and need not divide the world with CP.
model_parallel=$((TP * CP * PP))
[ $((WORLD_SIZE % model_parallel)) -eq 0 ] || die "world size $WORLD_SIZE (NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE) is not divisible by TP x CP x PP = $TP x $CP x $PP = $model_parallel"
expert_parallel=$((TP * EP * PP))
[ $((WORLD_SIZE % expert_parallel)) -eq 0 ] || die "world size $WORLD_SIZE is not divisible by TP x EP x PP = $TP x $EP x $PP = $expert_parallel (megatron's expert layout); change EP"
[ "$WARMUP_ITERS" -lt "$TRAIN_ITERS" ] || die "WARMUP_ITERS=$WARMUP_ITERS must be below TRAIN_ITERS=$TRAIN_ITERS (the warmup is part of the schedule); lower WARMUP_ITERS or raise TRAIN_ITERS"
DP=$((WORLD_SIZE / (TP * CP * PP)))
# Default global batch: at least 8 samples per step, at least one micro-batch per DP rank.
GBS=${GBS:-$((MBS * DP * (DP >= 8 ? 1 : (8 + DP - 1) / DP)))}
# Transformer Engine names the all-gather scheme all_gather and refuses megatron's "allgather".
case "$CP_COMM_TYPE" in
  p2p|a2a|a2a+p2p) ;;
  allgather|all_gather) CP_COMM_TYPE=all_gather ;;
  *) die "CP_COMM_TYPE=$CP_COMM_TYPE: use p2p, a2a, a2a+p2p or allgather" ;;
esac
awk -v lr="$LR" -v min="$MIN_LR" 'BEGIN { exit !(min + 0 <= lr + 0) }' \
  || die "MIN_LR=$MIN_LR is above LR=$LR: the cosine schedule decays from LR down to MIN_LR"
case "$FSDP" in 0|1) ;; *) die "FSDP=$FSDP: use 0 or 1" ;; esac
case "$PROFILE" in 0|torch|nsys) ;; *) die "PROFILE=$PROFILE: use 0, torch or nsys" ;; esac
case "$TIMING_LOG_LEVEL" in 0|1|2) ;; *) die "TIMING_LOG_LEVEL=$TIMING_LOG_LEVEL: use 0, 1 or 2 (2 adds the data timer batch-generator; each level adds CUDA syncs)" ;; esac

# An imported (release) checkpoint holds weights only, and megatron-fsdp reads fsdp_dtensor
# checkpoints only: say so here instead of failing deep inside megatron's loader.
check_checkpoint_to_load() {
  local tracker="$CKPT_LOAD/latest_checkpointed_iteration.txt" step dir
  if [ ! -f "$tracker" ]; then
    # CKPT_LOAD = CKPT_SAVE is the auto-resume setup: its first run starts from scratch.
    [ "$CKPT_LOAD" = "$CKPT_SAVE" ] && return 0
    die "CKPT_LOAD=$CKPT_LOAD has no latest_checkpointed_iteration.txt: give a save directory or one written by scripts/convert_hf_checkpoint.py import (or set CKPT_SAVE to the same directory to resume automatically)"
  fi
  step=$(cat "$tracker")
  if [ "$step" = release ]; then
    [ "$CKPT_RESUME" = 0 ] || die "CKPT_LOAD=$CKPT_LOAD is an imported (release) checkpoint with weights only (no optimizer, iteration or RNG state): set CKPT_RESUME=0 to fine-tune from it"
    dir="$CKPT_LOAD/release"
  else
    dir=$(printf '%s/iter_%07d' "$CKPT_LOAD" "$step")
  fi
  if [ "$FSDP" = 1 ] && [ -f "$dir/metadata.json" ]; then
    die "FSDP=1 loads fsdp_dtensor checkpoints only, and $dir is torch_dist: import with --format fsdp_dtensor (or train with FSDP=0)"
  fi
  if [ "$FSDP" = 0 ] && [ -f "$dir/.metadata" ] && [ ! -f "$dir/metadata.json" ]; then
    die "$dir is an fsdp_dtensor checkpoint, which only FSDP=1 loads: set FSDP=1 (or import with --format torch_dist)"
  fi
}

# ---- megatron arguments ------------------------------------------------------------------------
ARGS=(
  --model-name qwen35_vl --model-variant "$MODEL_VARIANT"
  --tensor-model-parallel-size "$TP" --context-parallel-size "$CP"
  --expert-model-parallel-size "$EP" --pipeline-model-parallel-size "$PP"
  --cp-comm-type "$CP_COMM_TYPE"
  --micro-batch-size "$MBS" --global-batch-size "$GBS"
  --seq-length "$SEQ_LEN" --total-seq-length "$SEQ_LEN"
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
  --lr-warmup-iters "$WARMUP_ITERS" --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95
  --clip-grad 1.0 --init-method-std 0.02 --seed "$SEED"
  --bf16
  --tokenizer-type NullTokenizer
  --dataset-provider "$DATASET" --dataloader-type external --num-workers "$NUM_WORKERS"
  --calculate-per-token-loss
  --manual-gc --manual-gc-interval 50
  --log-interval 1 --log-throughput --log-params-norm --log-timers-to-tensorboard
  --timing-log-level "$TIMING_LOG_LEVEL"
  --log-memory-to-tensorboard --log-validation-ppl-to-tensorboard
  --tensorboard-dir "$TB_DIR"
  --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
  --distributed-timeout-minutes 30
)
if [ "$DETERMINISTIC" = 1 ]; then
  # Bitwise-reproducible runs: megatron's deterministic mode (torch Gated DeltaNet rule, TE and
  # cuBLAS deterministic algorithms); it rejects the fused cross entropy. BSHD only.
  [ "$PACKED" = 1 ] && die "DETERMINISTIC=1 needs BSHD batches (PACKED=0): megatron's deterministic Gated DeltaNet path does not take packed sequences"
  ARGS+=(--deterministic-mode)
else
  ARGS+=(--cross-entropy-loss-fusion --cross-entropy-fusion-impl native)
fi
[ "$TP" -gt 1 ] && ARGS+=(--sequence-parallel)
[ "$PACKED" = 1 ] && ARGS+=(--packed-sequence)
[ -n "$DATA_PATH" ] && ARGS+=(--dataset-path "$DATA_PATH")
[ -n "$HF_TOKENIZER_PATH" ] && ARGS+=(--hf-tokenizer-path "$HF_TOKENIZER_PATH")
[ -n "$MTP_NUM_LAYERS" ] && ARGS+=(--mtp-num-layers "$MTP_NUM_LAYERS")
if [ "$FSDP" = 1 ]; then
  # megatron-fsdp shards parameters, gradients and optimizer state. It needs
  # CUDA_DEVICE_MAX_CONNECTIONS > 1 and the fsdp_dtensor checkpoint format.
  ARGS+=(--use-megatron-fsdp --data-parallel-sharding-strategy optim_grads_params
         --use-distributed-optimizer --ckpt-format fsdp_dtensor)
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-8}
else
  ARGS+=(--use-distributed-optimizer --overlap-grad-reduce --ckpt-format torch_dist)
  export CUDA_DEVICE_MAX_CONNECTIONS=1
fi
if ! "$PYTHON" -c "import fused_weight_gradient_mlp_cuda" >/dev/null 2>&1; then
  # megatron's (non-TE) output layer refuses gradient-accumulation fusion without APEX's kernel,
  # with megatron-fsdp too (its fusion through TE covers the TE layers only).
  echo "run_qwen35_vl.sh: APEX fused_weight_gradient_mlp_cuda not installed; adding --no-gradient-accumulation-fusion"
  ARGS+=(--no-gradient-accumulation-fusion)
fi
if [ "$NUM_EXPERTS" -gt 0 ]; then
  ARGS+=(--moe-permute-fusion --moe-router-fusion --moe-router-dtype fp32)
  [ "$FORCE_LOAD_BALANCING" = 1 ] && ARGS+=(--moe-router-force-load-balancing)
fi
if [ "$RECOMPUTE" = 1 ]; then
  ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
fi
[ "$RECOMPUTE_VISION" = 1 ] && ARGS+=(--recompute-vision)
if [ -n "$CKPT_SAVE" ]; then
  ARGS+=(--save "$CKPT_SAVE" --save-interval "$SAVE_INTERVAL")
else
  # On a NaN or Inf megatron's rerun check saves a checkpoint before stopping; with nowhere to
  # save it would fail on the missing path, so stop at once with the check's own message.
  ARGS+=(--rerun-mode disabled)
fi
if [ -n "$CKPT_LOAD" ]; then
  check_checkpoint_to_load
  ARGS+=(--load "$CKPT_LOAD")
  # CKPT_RESUME=0: fine-tune from the weights only (iteration 0, fresh optimizer and RNG).
  [ "$CKPT_RESUME" = 0 ] && ARGS+=(--finetune --no-load-optim --no-load-rng)
fi
if [ "$PROFILE" != 0 ]; then
  ARGS+=(--profile --profile-step-start "${PROFILE_STEPS%:*}" --profile-step-end "${PROFILE_STEPS#*:}" --profile-ranks 0)
  [ "$PROFILE" = torch ] && ARGS+=(--use-pytorch-profiler)
fi
ARGS+=("$@")

export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY_RUN" = 1 ]; then
  echo "DRY_RUN: $LAUNCHER would start $WORLD_SIZE processes ($NNODES node(s) x $GPUS_PER_NODE GPU(s)) running:"
  echo "  pretrain_multimodal.py ${ARGS[*]}"
  WORLD_SIZE=$WORLD_SIZE RANK=0 LOCAL_RANK=0 exec "$PYTHON" pretrain_multimodal.py "${ARGS[@]}" --dry-run
fi

mkdir -p "$RUN_DIR"
case "$LAUNCHER" in
  torchrun)
    CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK"
         --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
         pretrain_multimodal.py "${ARGS[@]}") ;;
  *) die "LAUNCHER=$LAUNCHER: only torchrun is supported" ;;
esac
if [ "$PROFILE" = nsys ]; then
  CMD=(nsys profile -o "$RUN_DIR/profile" --capture-range=cudaProfilerApi --capture-range-end=stop
       --trace=cuda,nvtx --force-overwrite true "${CMD[@]}")
fi
echo "run_qwen35_vl.sh: ${CMD[*]}"
exec "${CMD[@]}"

#!/usr/bin/env bash
# Train a registered vision-language model (MODEL, default qwen35_vl: Qwen3.5-VL) with
# megatron-core: every knob is an environment variable (see README), extra
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
# --help needs neither a GPU nor the checks below.
case " $* " in *" --help "*|*" -h "*) exec "$PYTHON" pretrain_multimodal.py --help ;; esac

MODEL=${MODEL:-qwen35_vl}; MODEL_VARIANT=${MODEL_VARIANT:-proxy}
TP=${TP:-1}; CP=${CP:-1}; EP=${EP:-1}; PP=${PP:-1}; FSDP=${FSDP:-0}
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
if [ -z "${GPUS_PER_NODE:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  GPUS_PER_NODE=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
elif [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${GPUS_PER_NODE:-0}" -gt 0 ] || GPUS_PER_NODE=1
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
MBS=${MBS:-1}; GBS=${GBS:-}; SEQ_LEN=${SEQ_LEN:-4096}; PACKED=${PACKED:-0}
DATASET=${DATASET:-mock}; DATA_PATH=${DATA_PATH:-}; HF_TOKENIZER_PATH=${HF_TOKENIZER_PATH:-}
NUM_WORKERS=${NUM_WORKERS:-2}
TRAIN_ITERS=${TRAIN_ITERS:-300}; LR=${LR:-3e-4}; MIN_LR=${MIN_LR:-}
WARMUP_ITERS=${WARMUP_ITERS:-10}; SEED=${SEED:-1234}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}; EVAL_ITERS=${EVAL_ITERS:-2}
RUN_DIR=${RUN_DIR:-runs/${MODEL}_${MODEL_VARIANT}}
TB_DIR=${TB_DIR:-$RUN_DIR/tensorboard}
CKPT_SAVE=${CKPT_SAVE:-}; CKPT_LOAD=${CKPT_LOAD:-}; CKPT_RESUME=${CKPT_RESUME:-1}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
FORCE_LOAD_BALANCING=${FORCE_LOAD_BALANCING:-0}
RECOMPUTE=${RECOMPUTE:-0}; RECOMPUTE_VISION=${RECOMPUTE_VISION:-0}
VISION_CUDA_GRAPH=${VISION_CUDA_GRAPH:-0}; VISION_GRAPH_PATCHES=${VISION_GRAPH_PATCHES:-}
VISION_GRAPH_IMAGES=${VISION_GRAPH_IMAGES:-16}
MTP_NUM_LAYERS=${MTP_NUM_LAYERS:-}; MASK_IM_END=${MASK_IM_END:-0}
CP_COMM_TYPE=${CP_COMM_TYPE:-p2p}; EXPERT_GEMM=${EXPERT_GEMM:-auto}
PROFILE=${PROFILE:-0}; PROFILE_STEPS=${PROFILE_STEPS:-5:7}; TIMING_LOG_LEVEL=${TIMING_LOG_LEVEL:-0}
LAUNCHER=${LAUNCHER:-torchrun}
DETERMINISTIC=${DETERMINISTIC:-0}
DRY_RUN=${DRY_RUN:-0}

# ---- every variable checked in bash before anything runs -----------------------------------------
# One line per refusal: the variable as given, what is wrong, what to set. Integers must be plain
# decimals: bash arithmetic reads "08" as octal and "abc" as the name of another variable.
is_int() { [[ $1 =~ ^(0|[1-9][0-9]{0,17})$ ]]; }
is_number() { [[ $1 =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]]; }
positive_ints() {
  local name
  for name in "$@"; do
    { is_int "${!name}" && [ "${!name}" -gt 0 ]; } || die "$name=${!name}: not a positive integer; use 1, 2, 3, ..."
  done
}
non_negative_ints() {
  local name
  for name in "$@"; do
    is_int "${!name}" || die "$name=${!name}: not an integer >= 0; use 0, 1, 2, ..."
  done
}
switches() {
  local name
  for name in "$@"; do
    case "${!name}" in 0|1) ;; *) die "$name=${!name}: not a switch; use 0 (off) or 1 (on)" ;; esac
  done
}
# "a or b": the multiples of $2 around $1, for messages.
nearest_multiples() {
  local below=$(($1 / $2 * $2))
  if [ "$below" -gt 0 ]; then echo "$below or $((below + $2))"; else echo "$2"; fi
}

positive_ints TP CP EP PP NNODES GPUS_PER_NODE MBS SEQ_LEN TRAIN_ITERS SAVE_INTERVAL EVAL_INTERVAL
non_negative_ints EVAL_ITERS WARMUP_ITERS NUM_WORKERS SEED
[ -z "$MTP_NUM_LAYERS" ] || non_negative_ints MTP_NUM_LAYERS
[ -z "$GBS" ] || positive_ints GBS
switches PACKED FSDP RECOMPUTE RECOMPUTE_VISION DETERMINISTIC DRY_RUN FORCE_LOAD_BALANCING \
  CKPT_RESUME MASK_IM_END VISION_CUDA_GRAPH
if [ "$VISION_CUDA_GRAPH" = 1 ]; then
  [ -n "$VISION_GRAPH_PATCHES" ] || die "VISION_CUDA_GRAPH=1 needs VISION_GRAPH_PATCHES: the most image patches one micro-batch holds (an image of H x W pixels has H x W / patch_size^2 of them; the graphs run on that many rows every step)"
  positive_ints VISION_GRAPH_PATCHES VISION_GRAPH_IMAGES
fi
{ is_int "$NODE_RANK" && [ "$NODE_RANK" -lt "$NNODES" ]; } \
  || die "NODE_RANK=$NODE_RANK: not a node of NNODES=$NNODES; use $([ "$NNODES" -eq 1 ] && echo 0 || echo "0 to $((NNODES - 1))") (0 on the first node)"
{ is_int "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ]; } \
  || die "MASTER_PORT=$MASTER_PORT: not a TCP port; use 1 to 65535 (default 29500)"
{ is_number "$LR" && awk -v lr="$LR" 'BEGIN { exit !(lr + 0 > 0) }'; } \
  || die "LR=$LR: not a positive number; use e.g. LR=3e-4 (the default)"
# The cosine schedule ends at a tenth of the peak unless MIN_LR says otherwise.
[ -n "$MIN_LR" ] || MIN_LR=$(awk -v lr="$LR" 'BEGIN { printf "%g", lr / 10 }')
is_number "$MIN_LR" || die "MIN_LR=$MIN_LR: not a number >= 0; use e.g. MIN_LR=3e-5, or leave it unset for LR / 10"
awk -v lr="$LR" -v min="$MIN_LR" 'BEGIN { exit !(min + 0 <= lr + 0) }' \
  || die "MIN_LR=$MIN_LR is above LR=$LR: the cosine schedule decays from LR down to MIN_LR"
[ "$WARMUP_ITERS" -lt "$TRAIN_ITERS" ] || die "WARMUP_ITERS=$WARMUP_ITERS must be below TRAIN_ITERS=$TRAIN_ITERS (the warmup is part of the schedule); lower WARMUP_ITERS or raise TRAIN_ITERS"
# Transformer Engine names the all-gather scheme all_gather and refuses megatron's "allgather".
case "$CP_COMM_TYPE" in
  p2p|a2a|a2a+p2p) ;;
  allgather|all_gather) CP_COMM_TYPE=all_gather ;;
  *) die "CP_COMM_TYPE=$CP_COMM_TYPE: use p2p, a2a, a2a+p2p or allgather" ;;
esac
case "$PROFILE" in 0|torch|nsys) ;; *) die "PROFILE=$PROFILE: use 0, torch or nsys" ;; esac
case "$EXPERT_GEMM" in auto|te|torch) ;; *) die "EXPERT_GEMM=$EXPERT_GEMM: use auto (torch where it serves the run, te otherwise), te (TE's grouped linear layers) or torch (one torch grouped GEMM over all experts)" ;; esac
if [ "$EXPERT_GEMM" = torch ] && [ "$FSDP" = 1 ]; then
  die "EXPERT_GEMM=torch with FSDP=1: megatron-fsdp shards the expert weights, which the torch grouped GEMM reads whole; use FSDP=0 or EXPERT_GEMM=te"
fi
if [ "$PROFILE" != 0 ]; then
  { [[ $PROFILE_STEPS =~ ^([0-9]+):([0-9]+)$ ]] \
    && [ "${BASH_REMATCH[1]}" -lt "${BASH_REMATCH[2]}" ]; } \
    || die "PROFILE_STEPS=$PROFILE_STEPS: use START:END iterations with START below END, e.g. 5:7"
fi
case "$TIMING_LOG_LEVEL" in 0|1|2) ;; *) die "TIMING_LOG_LEVEL=$TIMING_LOG_LEVEL: use 0, 1 or 2 (2 adds the data timer batch-generator; each level adds CUDA syncs)" ;; esac
[ "$LAUNCHER" = torchrun ] || die "LAUNCHER=$LAUNCHER: only torchrun is supported; use LAUNCHER=torchrun"
if [ "$DETERMINISTIC" = 1 ] && [ "$PACKED" = 1 ]; then
  die "DETERMINISTIC=1 needs BSHD batches (PACKED=0): megatron's deterministic Gated DeltaNet path does not take packed sequences"
fi

# ---- parallel layout, batch and sequence ---------------------------------------------------------
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
[ "$PP" -eq 1 ] || die "PP=$PP: pipeline parallelism is not supported yet (the vision tower and decoder are built whole on every rank); use PP=1"
model_parallel=$((TP * CP * PP))
[ $((WORLD_SIZE % model_parallel)) -eq 0 ] || die "world size $WORLD_SIZE (NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE) is not divisible by TP x CP x PP = $TP x $CP x $PP = $model_parallel"
DP=$((WORLD_SIZE / model_parallel))
# Default global batch: at least 8 samples per step, at least one micro-batch per DP rank.
GBS=${GBS:-$((MBS * DP * (DP >= 8 ? 1 : (8 + DP - 1) / DP)))}
[ $((GBS % (MBS * DP))) -eq 0 ] || die "GBS=$GBS: not a multiple of MBS x DP = $MBS x $DP = $((MBS * DP)) (each of the $DP data-parallel ranks takes whole micro-batches of MBS=$MBS); use GBS=$(nearest_multiples "$GBS" $((MBS * DP)))"
# Context parallelism splits each sequence into 2 x CP load-balanced chunks, and sequence
# parallelism (on whenever TP>1) splits BSHD rows over TP; packed (THD) batches are padded to
# that multiple per sample by the collate, megatron still checks SEQ_LEN against 2 x CP.
seq_multiple=1; seq_reason=
if [ "$CP" -gt 1 ]; then seq_multiple=$((2 * CP)); seq_reason="2 x CP=$CP"; fi
if [ "$TP" -gt 1 ] && [ "$PACKED" = 0 ]; then
  seq_multiple=$((seq_multiple * TP)); seq_reason="${seq_reason:+$seq_reason x }TP=$TP with sequence parallelism"
fi
[ $((SEQ_LEN % seq_multiple)) -eq 0 ] || die "SEQ_LEN=$SEQ_LEN: not a multiple of $seq_multiple ($seq_reason), the pieces the parallel layout splits each sample into; use SEQ_LEN=$(nearest_multiples "$SEQ_LEN" "$seq_multiple")"

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
  [[ $step =~ ^(release|[0-9]+)$ ]] || die "CKPT_LOAD=$CKPT_LOAD: its latest_checkpointed_iteration.txt holds '$step', neither release nor an iteration number; give a save directory or an import"
  if [ "$step" = release ]; then
    [ "$CKPT_RESUME" = 0 ] || die "CKPT_LOAD=$CKPT_LOAD is an imported (release) checkpoint with weights only (no optimizer, iteration or RNG state): set CKPT_RESUME=0 to fine-tune from it"
    dir="$CKPT_LOAD/release"
  else
    dir=$(printf '%s/iter_%07d' "$CKPT_LOAD" "$((10#$step))")
  fi
  if [ "$FSDP" = 1 ] && [ -f "$dir/metadata.json" ]; then
    die "FSDP=1 loads fsdp_dtensor checkpoints only, and $dir is torch_dist: import with --format fsdp_dtensor (or train with FSDP=0)"
  fi
  if [ "$FSDP" = 0 ] && [ -f "$dir/.metadata" ] && [ ! -f "$dir/metadata.json" ]; then
    die "$dir is an fsdp_dtensor checkpoint, which only FSDP=1 loads: set FSDP=1 (or import with --format torch_dist)"
  fi
}
[ -z "$CKPT_LOAD" ] || check_checkpoint_to_load

# ---- megatron arguments --------------------------------------------------------------------------
ARGS=(
  --model-name "$MODEL" --model-variant "$MODEL_VARIANT"
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
  ARGS+=(--deterministic-mode)
else
  # TE's fused kernel (megatron_compat.accept_te_cross_entropy): one pass over the bf16 logits
  # instead of megatron's fp32 copies of them.
  ARGS+=(--cross-entropy-loss-fusion --cross-entropy-fusion-impl te)
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
if [ "$RECOMPUTE" = 1 ]; then
  ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
fi
[ "$RECOMPUTE_VISION" = 1 ] && ARGS+=(--recompute-vision)
if [ "$VISION_CUDA_GRAPH" = 1 ]; then
  # TE's attention refuses CUDA graph capture under megatron's own RNG tracker.
  ARGS+=(--vision-cuda-graph-patches "$VISION_GRAPH_PATCHES"
         --vision-cuda-graph-images "$VISION_GRAPH_IMAGES" --te-rng-tracker)
fi
[ "$MASK_IM_END" = 1 ] && ARGS+=(--mask-im-end)
if [ -n "$CKPT_SAVE" ]; then
  ARGS+=(--save "$CKPT_SAVE" --save-interval "$SAVE_INTERVAL")
else
  # On a NaN or Inf megatron's rerun check saves a checkpoint before stopping; with nowhere to
  # save it would fail on the missing path, so stop at once with the check's own message.
  ARGS+=(--rerun-mode disabled)
fi
if [ -n "$CKPT_LOAD" ]; then
  ARGS+=(--load "$CKPT_LOAD")
  # CKPT_RESUME=0: fine-tune from the weights only (iteration 0, fresh optimizer and RNG).
  [ "$CKPT_RESUME" = 0 ] && ARGS+=(--finetune --no-load-optim --no-load-rng)
fi
if [ "$PROFILE" != 0 ]; then
  ARGS+=(--profile --profile-step-start "${PROFILE_STEPS%:*}" --profile-step-end "${PROFILE_STEPS#*:}" --profile-ranks 0)
  [ "$PROFILE" = torch ] && ARGS+=(--use-pytorch-profiler)
fi

# ---- the model trained: MODEL_VARIANT, or a --hf-config-path after the script name ---------------
source scripts/torch_cudnn.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# arguments.py runs its early checks (variant, dataset provider and shards, tokenizer directory,
# the checkpoint's config.json and MTP tensors) and the model's layout rules (EP and its experts,
# heads TP x CP must split, SEQ_LEN against the positions) on the flags pretrain_multimodal.py will
# get and prints the model's routed experts, the GPUs torch sees and the model's name, or the bad
# flag's message.
# Library warnings of the lookup go to a file, so that the plan or the run's output stands alone.
mkdir -p "$RUN_DIR"
if ! facts=$("$PYTHON" -m arguments "${ARGS[@]}" "$@" 2>>"$RUN_DIR/launcher_checks.log"); then
  facts=${facts##*$'\n'}
  die "${facts:-python -m arguments failed: see $RUN_DIR/launcher_checks.log}"
fi
read -r NUM_EXPERTS VISIBLE_GPUS TRAINED <<< "${facts##*$'\n'}"
if [ "$NUM_EXPERTS" -eq 0 ] && [ "$FORCE_LOAD_BALANCING" = 1 ]; then
  die "FORCE_LOAD_BALANCING=1 balances the experts of a MoE model, and $TRAINED is dense; use FORCE_LOAD_BALANCING=0"
fi
if [ "$NUM_EXPERTS" -eq 0 ] && [ "$EXPERT_GEMM" = torch ]; then
  die "EXPERT_GEMM=torch replaces the routed experts' GEMMs of a MoE model, and $TRAINED is dense; use EXPERT_GEMM=te"
fi
# megatron lays dense layers out as TP x CP x DP x PP and experts as ETP x EP x expert-DP x PP
# (ETP = TP), so EP spans CP and DP ranks and need not divide the world with CP.
expert_parallel=$((TP * EP * PP))
[ $((WORLD_SIZE % expert_parallel)) -eq 0 ] || die "EP=$EP: world size $WORLD_SIZE is not divisible by TP x EP x PP = $TP x $EP x $PP = $expert_parallel (megatron's expert layout); use an EP that makes TP x EP x PP divide $WORLD_SIZE"
if [ "$NUM_EXPERTS" -gt 0 ]; then
  ARGS+=(--moe-permute-fusion --moe-router-fusion --moe-router-dtype fp32)
  [ "$FORCE_LOAD_BALANCING" = 1 ] && ARGS+=(--moe-router-force-load-balancing)
  ARGS+=(--expert-gemm "$EXPERT_GEMM")
fi
if ! "$PYTHON" -c "import fused_weight_gradient_mlp_cuda" >/dev/null 2>&1; then
  # megatron's (non-TE) output layer refuses gradient-accumulation fusion without APEX's kernel,
  # with megatron-fsdp too (its fusion through TE covers the TE layers only).
  echo "run_qwen35_vl.sh: APEX fused_weight_gradient_mlp_cuda not installed; adding --no-gradient-accumulation-fusion"
  ARGS+=(--no-gradient-accumulation-fusion)
fi
ARGS+=("$@")

export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

if [ "$DRY_RUN" = 1 ]; then
  echo "DRY_RUN: $LAUNCHER would start $WORLD_SIZE processes ($NNODES node(s) x $GPUS_PER_NODE GPU(s)) running:"
  echo "  pretrain_multimodal.py ${ARGS[*]}"
  # GBS stays unexported: the planner reads a GBS in the environment as the user's choice.
  RUN_DIR="$RUN_DIR" NNODES="$NNODES" GPUS_PER_NODE="$GPUS_PER_NODE" WORLD_SIZE=$WORLD_SIZE \
    RANK=0 LOCAL_RANK=0 exec "$PYTHON" pretrain_multimodal.py "${ARGS[@]}" --dry-run
fi

# Checked here, not in Python: torchrun would wrap the one-line error in its own traceback.
[ "$VISIBLE_GPUS" -gt 0 ] || die "no GPU found: use DRY_RUN=1 to validate the configuration on the CPU"
mkdir -p "$RUN_DIR/logs"
CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK"
     --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
     pretrain_multimodal.py "${ARGS[@]}")
if [ "$PROFILE" = nsys ]; then
  CMD=(nsys profile -o "$RUN_DIR/profile" --capture-range=cudaProfilerApi --capture-range-end=stop
       --trace=cuda,nvtx --force-overwrite true "${CMD[@]}")
fi
# Every run keeps its output; resuming (CKPT_LOAD=CKPT_SAVE) appends a new file beside the old.
LOG_FILE="$RUN_DIR/logs/$(date +%Y%m%d-%H%M%S)-node$NODE_RANK.log"
echo "run_qwen35_vl.sh: stdout and stderr also go to $LOG_FILE"
exec > >(tee -a "$LOG_FILE") 2> >(tee -a "$LOG_FILE" >&2)
echo "run_qwen35_vl.sh: ${CMD[*]}"
exec "${CMD[@]}"

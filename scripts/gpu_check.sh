#!/usr/bin/env bash
# What only a GPU can show, in one run on the tiny model (a few minutes on one GPU): the shipped recipes with
# the flags GPU users run, each check timed and its peak GPU memory read, one table at the end.
#
#   1. zero3-bf16-full   scripts/finetune_getok.sh: bf16, ZeRO-3, gradient checkpointing, on all visible GPUs
#   2. qlora4-cuda       scripts/finetune_getok_lora.sh with BITS=4 (bitsandbytes on CUDA, ZeRO-2), one GPU
#   3. flash-attn-2      the full recipe with ATTN=flash_attention_2 (skipped when flash-attn does not import)
#   4. grpo-2-steps      scripts/grpo_getok.sh, stage grid, 2 steps from check 1's checkpoint
#   5. predict           llava-getok predict with grammar-constrained decoding on check 1's checkpoint, then eval
#   6. qwen-lora-zero2   scripts/finetune_getok_qwen.sh on a tiny Qwen2.5-VL: LoRA + GETok rows, bf16, ZeRO-2, one GPU
#   7. qwen-grpo         scripts/grpo_getok_qwen.sh, both stages (refine on the policy's first answers), 2 steps each,
#                        from check 6's checkpoint, then llava-getok predict on the refine stage's checkpoint
#
# usage: bash scripts/gpu_check.sh [--help]
#   OUT       working folder                                  [runs/gpu_check]
#   RESULT    where the table is written                      [bench/results/gpu_check.md]
#   STEPS     training steps of each fine-tuning check         [4]
#   DEVICE    gpu | cpu (cpu runs the same checks on CPU ranks: the script's own smoke test)   [gpu]
#   PYTHON    the Python that has llava-getok                  [python]
set -uo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; fi
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}; RESULT=${RESULT:-bench/results/gpu_check.md}; STEPS=${STEPS:-4}
DEVICE=${DEVICE:-gpu}; PYTHON=${PYTHON:-python}
export DEVICE PYTHON
rm -rf "$OUT"; mkdir -p "$OUT"

if [[ "$DEVICE" == gpu ]]; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi); DEVICE=cpu runs the same checks on the CPU" >&2; exit 2
  fi
  GPUS=$(nvidia-smi -L | wc -l)
else
  GPUS=2
fi
eval "$("$PYTHON" -m llava_getok.cli tiny-model --out "$OUT/tiny" --grid 8 --qwen)" || { echo "gpu_check: tiny-model failed" >&2; exit 1; }
export MODEL_BASE VISION_TOWER PROJECTOR DATA_PATH IMAGE_FOLDER GRID
export BATCH=4 WORKERS=0 REPORT_TO=none

ROWS=()
# check NAME LOG -- COMMAND...: run it, sample the GPU's memory meanwhile, add a row (status, time, memory)
check() {
  local name=$1 log=$2; shift 3
  local peak_file="$OUT/$name.mem" start end rc peak
  : > "$peak_file"
  if [[ "$DEVICE" == gpu ]]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$peak_file" 2>/dev/null &
    local sampler=$!
  fi
  start=$(date +%s.%N)
  MASTER_PORT=$((29500 + RANDOM % 1000)) timeout 900 "$@" > "$log" 2>&1; rc=$?
  end=$(date +%s.%N)
  [[ "$DEVICE" == gpu ]] && kill "$sampler" 2>/dev/null
  peak=$(sort -n "$peak_file" | tail -1); peak=${peak:-n/a}
  local status=pass; [[ $rc -ne 0 ]] && status="FAIL (exit $rc, see $log)"
  ROWS+=("| $name | $status | $(printf '%.1f' "$(echo "$end - $start" | bc)") | $(step_time "$name") | $peak |")
  echo "[gpu_check] $name: $status" >&2
}
# seconds a training step from the run's trainer_state.json ("" when there is none)
step_time() {
  local state="$OUT/$1/trainer_state.json"
  [[ -f "$state" ]] || { echo "-"; return; }
  "$PYTHON" - "$state" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
runtime = [h["train_runtime"] for h in s["log_history"] if "train_runtime" in h]
print(f"{runtime[-1] / max(s['global_step'], 1):.3f}" if runtime else "-")
EOF
}

check zero3-bf16-full "$OUT/zero3-bf16-full.log" -- \
  env NUM_GPUS="$GPUS" OUTPUT_DIR="$OUT/zero3-bf16-full" bash scripts/finetune_getok.sh --max_steps "$STEPS"
# one GPU for QLoRA and GRPO; on CPU ranks every check runs two processes (the recipes' multi-process paths)
SINGLE=1; [[ "$DEVICE" == cpu ]] && SINGLE=$GPUS
check qlora4-cuda "$OUT/qlora4-cuda.log" -- \
  env NUM_GPUS="$SINGLE" BITS=4 LORA_R=8 LORA_ALPHA=16 OUTPUT_DIR="$OUT/qlora4-cuda" bash scripts/finetune_getok_lora.sh --max_steps "$STEPS"
if "$PYTHON" -c "import flash_attn" 2>/dev/null && [[ "$DEVICE" == gpu ]]; then
  check flash-attn-2 "$OUT/flash-attn-2.log" -- \
    env NUM_GPUS=1 ATTN=flash_attention_2 OUTPUT_DIR="$OUT/flash-attn-2" bash scripts/finetune_getok.sh --max_steps "$STEPS"
else
  ROWS+=("| flash-attn-2 | skipped: flash-attn does not import here | - | - | - |")
fi
check grpo-2-steps "$OUT/grpo-2-steps.log" -- \
  env MODEL="$OUT/zero3-bf16-full" GRID_DATA="$DATA_PATH" OUT="$OUT/grpo" STAGES=grid NUM_GPUS="$SINGLE" \
  bash scripts/grpo_getok.sh --max-steps 2 --num-generations 4 --max-new-tokens 8 --lora-r 8 --lora-alpha 16 \
  --save-steps 1
DEVICE_ARG=cuda; [[ "$DEVICE" == cpu ]] && DEVICE_ARG=cpu
check predict "$OUT/predict.log" -- bash -c "
  '$PYTHON' -m llava_getok.cli predict --model-path '$OUT/zero3-bf16-full' --data '$DATA_PATH' --image-root '$IMAGE_FOLDER' \
    --output '$OUT/predictions.jsonl' --constrained --shape-only --max-new-tokens 16 --device $DEVICE_ARG &&
  '$PYTHON' -m llava_getok.cli eval --predictions '$OUT/predictions.jsonl' --annotations '$DATA_PATH' --output-dir '$OUT/eval'"
check qwen-lora-zero2 "$OUT/qwen-lora-zero2.log" -- \
  env MODEL="$QWEN_MODEL" DATA_PATH="$QWEN_DATA_PATH" NUM_GPUS="$SINGLE" LORA_R=8 LORA_ALPHA=16 GRAD_ACCUM=1 \
  OUTPUT_DIR="$OUT/qwen-lora-zero2" bash scripts/finetune_getok_qwen.sh --max_steps "$STEPS"
check qwen-grpo "$OUT/qwen-grpo.log" -- env -u MODEL_BASE bash -c "
  MODEL='$OUT/qwen-lora-zero2' GRID_DATA='$QWEN_DATA_PATH' REFINE_DATA='$QWEN_REFINE_DATA' OUT='$OUT/qwen-grpo' \
  NUM_GPUS=$SINGLE REFINE_ARGS='--first-answer policy' bash scripts/grpo_getok_qwen.sh --max-steps 2 \
    --num-generations 4 --max-new-tokens 8 --lora-r 8 --lora-alpha 16 --save-steps 1 &&
  '$PYTHON' -m llava_getok.cli predict --model-path '$OUT/qwen-grpo/refine' --data '$QWEN_REFINE_DATA' \
    --image-root '$IMAGE_FOLDER' --output '$OUT/qwen-predictions.jsonl' --constrained --shape-only \
    --max-new-tokens 16 --device $DEVICE_ARG"

{
  echo "# GPU check (scripts/gpu_check.sh)"
  echo
  echo "| check | result | wall s | s/step | peak GPU MiB |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  if [[ "$DEVICE" == gpu ]]; then
    echo "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), $GPUS GPU(s); $("$PYTHON" -c 'import torch, transformers, deepspeed; print(f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")' 2>/dev/null); $(date -u +%Y-%m-%d)."
  else
    echo "DEVICE=cpu: the same checks on 2 CPU ranks (no GPU memory); $(date -u +%Y-%m-%d)."
  fi
  echo "Reproduce: \`bash scripts/gpu_check.sh\` (tiny model from \`llava-getok tiny-model\`, $STEPS steps a fine-tuning check)."
} > "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
[[ "$DEVICE" == gpu ]] && mkdir -p "$(dirname "$RESULT")" && cp "$OUT/gpu_check.md" "$RESULT"
! printf '%s\n' "${ROWS[@]}" | grep -q FAIL

#!/usr/bin/env bash
# GRPO for a GETok LLaVA model (or a transformers-native one: scripts/grpo_getok_qwen.sh), the paper's two stages:
#   stage 1 (grid):   rec / det / res / point records, rewards format + repetition + grounding
#                     (box: IoU + corner L1, Hungarian over objects, whole-image / extra-box penalties;
#                      mask: IoU of the proposal masks at the predicted anchors; point: inside the target)
#   stage 2 (refine): refine records (second turn: offsets to the first answer), rewards format +
#                     repetition + refine (per-point +1/0/-1 and the IoU gain), from the stage-1 output.
#
# Usage:  bash scripts/grpo_getok.sh [--help] [extra args for both stages, e.g. --max-steps 200]
# Paths come from the environment (defaults in brackets):
#   MODEL         the SFT GETok checkpoint to start from        [checkpoints/llava-v1.5-7b-getok]
#   MODEL_BASE    its base, only for a LoRA SFT checkpoint       [unset]
#   GRID_DATA     converted JSON for stage 1                     [data/getok/rec_train.json]
#   REFINE_DATA   converted JSON for stage 2 (refine records)    [data/getok/refine_train.json]
#   IMAGE_FOLDER  folder the records' image paths are under      [data/coco]
#   OUT           output root: OUT/grid, OUT/refine              [checkpoints/grpo-getok]
#   STAGES        which stages to run: "grid refine", "grid" or "refine"   [grid refine]
#   NUM_GPUS      processes (one a GPU), launched with accelerate as trl documents for GRPOTrainer   [1]
#   ZERO          a DeepSpeed config for accelerate's DeepSpeed plugin, e.g. scripts/zero2.json   [unset: DDP]
#   DEVICE        gpu | cpu: the smoke test before booking GPUs (CPU processes, float32)        [gpu]
#   MASTER_PORT   rendezvous port of the processes (another one for a second run on the node)   [29500]
#   PYTHON        the Python that has llava-getok, trl and accelerate                            [python]
#   GRID_ARGS / REFINE_ARGS   extra arguments for one stage only           [unset]
#     e.g. REFINE_ARGS="--first-answer policy": refine the model's own first answers (as at inference)
#     instead of the first answers stored in the data; GRID_ARGS="--constrained" samples under the grammar
# Every option: python -m llava_getok.rl --help
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-checkpoints/llava-v1.5-7b-getok}
GRID_DATA=${GRID_DATA:-data/getok/rec_train.json}
REFINE_DATA=${REFINE_DATA:-data/getok/refine_train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/coco}
OUT=${OUT:-checkpoints/grpo-getok}
STAGES=${STAGES:-grid refine}
BASE_ARGS=()
[[ -n "${MODEL_BASE:-}" ]] && BASE_ARGS=(--model-base "$MODEL_BASE")
NUM_GPUS=${NUM_GPUS:-1}; DEVICE=${DEVICE:-gpu}
DEVICE_ARGS=(); LAUNCH=("$PYTHON")
case "$DEVICE" in
  gpu) ;;
  cpu) DEVICE_ARGS=(--device cpu) ;;
  *) echo "DEVICE must be gpu or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
if [[ "$NUM_GPUS" -gt 1 || -n "${ZERO:-}" ]]; then
  LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes "$NUM_GPUS" --num_machines 1
          --mixed_precision no --dynamo_backend no --main_process_port "${MASTER_PORT:-29500}")
  # --multi_gpu is accelerate's torchrun launcher; CPU processes take it too (its --cpu launches one process
  # without MPI), and the trainer's --device cpu keeps them on the CPU
  [[ "$NUM_GPUS" -gt 1 ]] && LAUNCH+=(--multi_gpu)
  [[ -n "${ZERO:-}" ]] && LAUNCH+=(--use_deepspeed --deepspeed_config_file "$ZERO")
fi

# one stage: NAME DATA EXTRA_ARGS, from $MODEL (+ $BASE_ARGS) to $OUT/NAME, with the paper's GRPO settings
run_stage() {
  echo "[grpo_getok] stage $1: $MODEL -> $OUT/$1"
  # shellcheck disable=SC2086
  "${LAUNCH[@]}" -m llava_getok.rl --stage "$1" --model-path "$MODEL" "${BASE_ARGS[@]}" "${DEVICE_ARGS[@]}" \
    --data "$2" --image-folder "$IMAGE_FOLDER" --output-dir "$OUT/$1" \
    --num-generations 8 --beta 0.04 --learning-rate 1e-5 --max-new-tokens 64 --loss-type dapo \
    $3 "${@:4}"
}

if [[ " $STAGES " == *" grid "* ]]; then
  run_stage grid "$GRID_DATA" "${GRID_ARGS:-}" "$@"
  MODEL="$OUT/grid"  # the grid stage's final save (LLaVA: merged, full; hf: LoRA on $MODEL, which loads it)
  BASE_ARGS=()
fi
if [[ " $STAGES " == *" refine "* ]]; then
  run_stage refine "$REFINE_DATA" "${REFINE_ARGS:-}" "$@"
fi

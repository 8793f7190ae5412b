#!/usr/bin/env bash
# GRPO for a GETok Qwen2.5-VL model (an SFT checkpoint of scripts/finetune_getok_qwen.sh), the paper's two stages:
# grid (rec / det / res / point, rewards format + repetition + grounding), then refine (the second turn's offsets,
# rewards format + repetition + refine) from the grid stage's output. The same recipe as scripts/grpo_getok.sh, which
# this script runs with Qwen's defaults: python -m llava_getok.rl reads the backend from the checkpoint's sidecar
# (trl's GRPOTrainer on the model's processor and chat template; LoRA r=64 with the GETok rows as trainable tokens;
# the KL reference is the starting model). Each stage's checkpoints are LoRA checkpoints on the model it started
# from, and load in llava-getok predict.
#
# usage: bash scripts/grpo_getok_qwen.sh [--help] [extra args for both stages, e.g. --max-steps 200]
# Environment variables (defaults in brackets); the data in the processor's frame (convert-datasets --frame orig):
#   MODEL         the SFT checkpoint to start from                [checkpoints/qwen2.5-vl-7b-getok-lora]
#   GRID_DATA     converted JSON for stage 1                      [data/getok/rec_train_orig.json]
#   REFINE_DATA   converted JSON for stage 2 (refine records)     [data/getok/refine_train_orig.json]
#   IMAGE_FOLDER  folder the records' image paths are under       [data/coco]
#   OUT           output root: OUT/grid, OUT/refine               [checkpoints/grpo-getok-qwen]
#   STAGES [grid refine]  NUM_GPUS [1]  ZERO [unset: DDP]  DEVICE [gpu | cpu]  MASTER_PORT [29500]  PYTHON [python]
#   GRID_ARGS / REFINE_ARGS   extra arguments for one stage only  [unset]
# Every variable and option: bash scripts/grpo_getok.sh --help; python -m llava_getok.rl --help
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; fi

export MODEL=${MODEL:-checkpoints/qwen2.5-vl-7b-getok-lora}
export GRID_DATA=${GRID_DATA:-data/getok/rec_train_orig.json}
export REFINE_DATA=${REFINE_DATA:-data/getok/refine_train_orig.json}
export OUT=${OUT:-checkpoints/grpo-getok-qwen}
exec bash "$(dirname "$0")/grpo_getok.sh" --lora-r 64 --lora-alpha 128 "$@"

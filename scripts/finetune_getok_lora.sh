#!/usr/bin/env bash
# LoRA fine-tuning of LLaVA-1.5 with GETok tokens (LLaVA-1.5's finetune_lora.sh); BITS=4 gives QLoRA.
# Only the GETok rows of the embeddings and the LM head train besides LoRA and the projector; they are
# saved in getok_rows.safetensors in every checkpoint. Load with model_base=$MODEL_BASE (or the recorded one).
#
# usage: bash scripts/finetune_getok_lora.sh [--help] [extra arguments for python -m llava_getok.train ...]
#
# Environment variables (defaults in brackets):
#   BITS           16 (LoRA) | 4 or 8 (QLoRA; ZeRO-2, since bitsandbytes/peft cannot do ZeRO-3)   [16]
#   MODEL_BASE     [lmsys/vicuna-7b-v1.5]   PROJECTOR [./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin]
#   VISION_TOWER   [openai/clip-vit-large-patch14-336]
#   DATA_PATH      [./playground/data/getok_train.json]   IMAGE_FOLDER [./playground/data]
#   OUTPUT_DIR     [./checkpoints/llava-v1.5-7b-getok-lora]
#   NUM_GPUS [all]  BATCH [16]  GRAD_ACCUM [1]  EPOCHS [1]  LR [2e-4]  PROJECTOR_LR [2e-5]  MAX_LEN [2048]
#   LORA_R [128]  LORA_ALPHA [256]  WORKERS [4]  REPORT_TO [none]
#   ZERO           [zero3.json beside this script, or zero2.json when BITS is 4 or 8]
#   GRID [32]  ROUNDS [1]  MODE [inline]  INIT [sincos2d]  GRID_WEIGHT [0.5]  BOX_WEIGHT [0.5]  VERSION [getok_v1]
#   ATTN           sdpa | eager | flash_attention_2        [flash_attention_2 if flash-attn is installed, else sdpa]
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; fi

# The full fine-tuning script with LoRA's defaults and arguments: one place holds LLaVA-1.5's recipe.
BITS=${BITS:-16}; LORA_R=${LORA_R:-128}; LORA_ALPHA=${LORA_ALPHA:-256}; PROJECTOR_LR=${PROJECTOR_LR:-2e-5}
export LR=${LR:-2e-4}
export OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-getok-lora}
if [[ "$BITS" == 4 || "$BITS" == 8 ]]; then export ZERO=${ZERO:-$(dirname "$0")/zero2.json}; else export ZERO=${ZERO:-$(dirname "$0")/zero3.json}; fi
exec bash "$(dirname "$0")/finetune_getok.sh" \
    --lora_enable True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --mm_projector_lr "$PROJECTOR_LR" \
    --bits "$BITS" \
    "$@"

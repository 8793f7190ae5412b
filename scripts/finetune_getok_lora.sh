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
#   ZERO           [scripts/zero3.json, or scripts/zero2.json when BITS is 4 or 8]
#   GRID [32]  ROUNDS [1]  MODE [inline]  INIT [sincos2d]  GRID_WEIGHT [0.5]  BOX_WEIGHT [0.5]  VERSION [getok_v1]
#   ATTN           sdpa | eager | flash_attention_2        [flash_attention_2 if flash-attn is installed, else sdpa]
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; fi

BITS=${BITS:-16}
MODEL_BASE=${MODEL_BASE:-lmsys/vicuna-7b-v1.5}
PROJECTOR=${PROJECTOR-./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}  # empty: model has its projector
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
DATA_PATH=${DATA_PATH:-./playground/data/getok_train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-getok-lora}
BATCH=${BATCH:-16}; GRAD_ACCUM=${GRAD_ACCUM:-1}; EPOCHS=${EPOCHS:-1}; LR=${LR:-2e-4}; PROJECTOR_LR=${PROJECTOR_LR:-2e-5}
MAX_LEN=${MAX_LEN:-2048}; LORA_R=${LORA_R:-128}; LORA_ALPHA=${LORA_ALPHA:-256}; WORKERS=${WORKERS:-4}
REPORT_TO=${REPORT_TO:-none}
if [[ "$BITS" == 4 || "$BITS" == 8 ]]; then ZERO=${ZERO:-scripts/zero2.json}; else ZERO=${ZERO:-scripts/zero3.json}; fi
GRID=${GRID:-32}; ROUNDS=${ROUNDS:-1}; MODE=${MODE:-inline}; INIT=${INIT:-sincos2d}
GRID_WEIGHT=${GRID_WEIGHT:-0.5}; BOX_WEIGHT=${BOX_WEIGHT:-0.5}; VERSION=${VERSION:-getok_v1}
if [[ -z "${ATTN:-}" ]]; then
  if python -c "import flash_attn" 2>/dev/null; then ATTN=flash_attention_2; else ATTN=sdpa; fi
fi
GPU_ARGS=(); [[ -n "${NUM_GPUS:-}" ]] && GPU_ARGS=(--num_gpus "$NUM_GPUS")
PROJ_ARGS=(); [[ -n "$PROJECTOR" ]] && PROJ_ARGS=(--pretrain_mm_mlp_adapter "$PROJECTOR")

deepspeed "${GPU_ARGS[@]}" --module llava_getok.train \
    --lora_enable True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --mm_projector_lr "$PROJECTOR_LR" \
    --bits "$BITS" \
    --deepspeed "$ZERO" \
    --model_name_or_path "$MODEL_BASE" \
    --version "$VERSION" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    "${PROJ_ARGS[@]}" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$BATCH" \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy no \
    --save_strategy steps \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate "$LR" \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length "$MAX_LEN" \
    --gradient_checkpointing True \
    --dataloader_num_workers "$WORKERS" \
    --lazy_preprocess True \
    --report_to "$REPORT_TO" \
    --attn_implementation "$ATTN" \
    --getok_grid "$GRID" --getok_rounds "$ROUNDS" --getok_mode "$MODE" --getok_init "$INIT" \
    --getok_grid_weight "$GRID_WEIGHT" --getok_box_weight "$BOX_WEIGHT" \
    "$@"

#!/usr/bin/env bash
# Full fine-tuning of LLaVA-1.5 with GETok tokens (ZeRO-3, the hyper-parameters of LLaVA-1.5's finetune.sh).
#
# usage: bash scripts/finetune_getok.sh [--help] [extra arguments for python -m llava_getok.train ...]
#
# Paths and sizes come from environment variables (defaults in brackets):
#   MODEL_BASE     language model to start from           [lmsys/vicuna-7b-v1.5]
#   PROJECTOR      pretrained projector (mm_projector.bin)  [./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin]
#                  (set it empty when MODEL_BASE is a LLaVA model that has its projector)
#   VISION_TOWER   CLIP tower                              [openai/clip-vit-large-patch14-336]
#   DATA_PATH      converted GETok data (convert-datasets) [./playground/data/getok_train.json]
#   IMAGE_FOLDER   image root of DATA_PATH                 [./playground/data]
#   OUTPUT_DIR     checkpoints                             [./checkpoints/llava-v1.5-7b-getok]
#   DEVICE         gpu | cpu: the smoke test before booking GPUs, same launcher, ZeRO config and flags, with only
#                  what a CPU needs changed (--use_cpu True, no tf32, DeepSpeed's bf16 on CPU ranks, sdpa) [gpu]
#   NUM_GPUS       GPUs on this node; processes with DEVICE=cpu [all GPUs; 1 with DEVICE=cpu]
#   BATCH          per-device batch size                   [16]    (x GPUs x GRAD_ACCUM = 128 in LLaVA-1.5)
#   GRAD_ACCUM     gradient accumulation steps             [1]
#   EPOCHS [1]  LR [2e-5]  MAX_LEN [2048]  WORKERS [4]  REPORT_TO [none]  ZERO [zero3.json beside this script]
#   GRID [32]  ROUNDS [1]  MODE [inline]  INIT [sincos2d]  GRID_WEIGHT [0.5]  BOX_WEIGHT [0.5]
#   VERSION        conversation template                   [getok_v1]
#   MASTER_PORT    rendezvous port of the ranks (another one for a second run on the node) [DeepSpeed's 29500]
#   PYTHON         the Python that has llava-getok and DeepSpeed                           [python]
#   ATTN           sdpa | eager | flash_attention_2        [flash_attention_2 if flash-attn is installed, else sdpa]
# Every other option of LLaVA's train.py can be appended (e.g. --unfreeze_mm_vision_tower, --save_steps 1000).
# Check the data first: llava-getok check-data "$DATA_PATH" --model-path "$MODEL_BASE" --grid "$GRID"
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; fi

MODEL_BASE=${MODEL_BASE:-lmsys/vicuna-7b-v1.5}
PROJECTOR=${PROJECTOR-./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}  # empty: model has its projector
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
DATA_PATH=${DATA_PATH:-./playground/data/getok_train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-getok}
BATCH=${BATCH:-16}; GRAD_ACCUM=${GRAD_ACCUM:-1}; EPOCHS=${EPOCHS:-1}; LR=${LR:-2e-5}; MAX_LEN=${MAX_LEN:-2048}
WORKERS=${WORKERS:-4}; REPORT_TO=${REPORT_TO:-none}; ZERO=${ZERO:-$(dirname "$0")/zero3.json}
GRID=${GRID:-32}; ROUNDS=${ROUNDS:-1}; MODE=${MODE:-inline}; INIT=${INIT:-sincos2d}
GRID_WEIGHT=${GRID_WEIGHT:-0.5}; BOX_WEIGHT=${BOX_WEIGHT:-0.5}; VERSION=${VERSION:-getok_v1}
DEVICE=${DEVICE:-gpu}; PYTHON=${PYTHON:-python}
DEVICE_ARGS=(--tf32 True)
case "$DEVICE" in
  gpu) ;;
  cpu) DEVICE_ARGS=(--tf32 False --use_cpu True); NUM_GPUS=${NUM_GPUS:-1}; ATTN=${ATTN:-sdpa} ;;
  *) echo "DEVICE must be gpu or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
if [[ -z "${ATTN:-}" ]]; then
  if "$PYTHON" -c "import flash_attn" 2>/dev/null; then ATTN=flash_attention_2; else ATTN=sdpa; fi
fi
GPU_ARGS=(); [[ -n "${NUM_GPUS:-}" ]] && GPU_ARGS=(--num_gpus "$NUM_GPUS")
PORT_ARGS=(); [[ -n "${MASTER_PORT:-}" ]] && PORT_ARGS=(--master_port "$MASTER_PORT")
PROJ_ARGS=(); [[ -n "$PROJECTOR" ]] && PROJ_ARGS=(--pretrain_mm_mlp_adapter "$PROJECTOR")

"$PYTHON" -m deepspeed.launcher.runner "${GPU_ARGS[@]}" "${PORT_ARGS[@]}" --module llava_getok.train \
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
    "${DEVICE_ARGS[@]}" \
    --model_max_length "$MAX_LEN" \
    --gradient_checkpointing True \
    --dataloader_num_workers "$WORKERS" \
    --lazy_preprocess True \
    --report_to "$REPORT_TO" \
    --attn_implementation "$ATTN" \
    --getok_grid "$GRID" --getok_rounds "$ROUNDS" --getok_mode "$MODE" --getok_init "$INIT" \
    --getok_grid_weight "$GRID_WEIGHT" --getok_box_weight "$BOX_WEIGHT" \
    "$@"

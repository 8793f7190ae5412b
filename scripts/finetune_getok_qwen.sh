#!/usr/bin/env bash
# LoRA fine-tuning of Qwen2.5-VL with GETok tokens (the paper's Qwen setting: Qwen2.5-VL-7B-Instruct, LoRA r=64, bf16),
# through trl's SFTTrainer (python -m llava_getok.hf.train) under DeepSpeed ZeRO-2, launched by accelerate. Beside
# LoRA only the GETok rows of the embeddings and the LM head train (peft's trainable tokens); every checkpoint holds
# the adapter, the processor, getok_rows.safetensors and the sidecar, and loads in llava-getok predict / export.
# The data must be in the processor's frame: convert-datasets ... --frame orig (Qwen's smart_resize keeps the whole
# image).
#
# usage: bash scripts/finetune_getok_qwen.sh [--help] [extra arguments for python -m llava_getok.hf.train ...]
#
# Environment variables (defaults in brackets):
#   MODEL          the Qwen2.5-VL model (hub id or folder)            [Qwen/Qwen2.5-VL-7B-Instruct]
#   DATA_PATH      converted GETok data, frame orig                   [./playground/data/getok_train_orig.json]
#   IMAGE_FOLDER   image root of DATA_PATH                            [./playground/data]
#   OUTPUT_DIR     checkpoints                                        [./checkpoints/qwen2.5-vl-7b-getok-lora]
#   DEVICE         gpu | cpu: the smoke test before booking GPUs (CPU ranks, --use_cpu True, sdpa)   [gpu]
#   NUM_GPUS       processes, one a GPU (with DEVICE=cpu: CPU ranks)  [all GPUs; 1 with DEVICE=cpu]
#   BATCH [4]  GRAD_ACCUM [4]  EPOCHS [1]  LR [2e-4]  WORKERS [4]  REPORT_TO [none]
#   LORA_R [64]  LORA_ALPHA [128]  LORA_DROPOUT [0.05]
#   MIN_PIXELS [3136]  MAX_PIXELS [1003520]   the processor's image size range, recorded in the checkpoint
#   ZERO           a DeepSpeed config: zero2.json beside this script (LoRA with GETok rows is refused under ZeRO-3)
#   GRID [32]  ROUNDS [1]  MODE [inline]  INIT [sincos2d]  GRID_WEIGHT [0.5]  BOX_WEIGHT [0.5]
#   ATTN           sdpa | eager | flash_attention_2        [flash_attention_2 if flash-attn is installed, else sdpa]
#   MASTER_PORT    rendezvous port of the processes (another one for a second run on the node)      [29500]
#   PYTHON         the Python that has llava-getok, trl, accelerate and DeepSpeed                    [python]
# Every other option of python -m llava_getok.hf.train can be appended (e.g. --max_steps 2000, --save_steps 500).
# Then GRPO: MODEL=$OUTPUT_DIR bash scripts/grpo_getok_qwen.sh
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; fi

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
DATA_PATH=${DATA_PATH:-./playground/data/getok_train_orig.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/qwen2.5-vl-7b-getok-lora}
BATCH=${BATCH:-4}; GRAD_ACCUM=${GRAD_ACCUM:-4}; EPOCHS=${EPOCHS:-1}; LR=${LR:-2e-4}
WORKERS=${WORKERS:-4}; REPORT_TO=${REPORT_TO:-none}; ZERO=${ZERO:-$(dirname "$0")/zero2.json}
LORA_R=${LORA_R:-64}; LORA_ALPHA=${LORA_ALPHA:-128}; LORA_DROPOUT=${LORA_DROPOUT:-0.05}
MIN_PIXELS=${MIN_PIXELS:-3136}; MAX_PIXELS=${MAX_PIXELS:-1003520}
GRID=${GRID:-32}; ROUNDS=${ROUNDS:-1}; MODE=${MODE:-inline}; INIT=${INIT:-sincos2d}
GRID_WEIGHT=${GRID_WEIGHT:-0.5}; BOX_WEIGHT=${BOX_WEIGHT:-0.5}
DEVICE=${DEVICE:-gpu}; PYTHON=${PYTHON:-python}
DEVICE_ARGS=(--tf32 True)
case "$DEVICE" in
  gpu) NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}; [[ "$NUM_GPUS" -ge 1 ]] || NUM_GPUS=1 ;;
  cpu) DEVICE_ARGS=(--tf32 False --use_cpu True); NUM_GPUS=${NUM_GPUS:-1}; ATTN=${ATTN:-sdpa} ;;
  *) echo "DEVICE must be gpu or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
if [[ -z "${ATTN:-}" ]]; then
  if "$PYTHON" -c "import flash_attn" 2>/dev/null; then ATTN=flash_attention_2; else ATTN=sdpa; fi
fi
# accelerate's torchrun launcher (--multi_gpu; CPU ranks take it too); the Trainer sets DeepSpeed up from --deepspeed
LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision no
        --dynamo_backend no --main_process_port "${MASTER_PORT:-29500}")
[[ "$NUM_GPUS" -gt 1 ]] && LAUNCH+=(--multi_gpu)

"${LAUNCH[@]}" -m llava_getok.hf.train \
    --deepspeed "$ZERO" \
    --model_name_or_path "$MODEL" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --min_pixels "$MIN_PIXELS" --max_pixels "$MAX_PIXELS" \
    --lora_enable True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT" \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$BATCH" \
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
    --gradient_checkpointing True \
    --dataloader_num_workers "$WORKERS" \
    --report_to "$REPORT_TO" \
    --attn_implementation "$ATTN" \
    --getok_grid "$GRID" --getok_rounds "$ROUNDS" --getok_mode "$MODE" --getok_init "$INIT" \
    --getok_grid_weight "$GRID_WEIGHT" --getok_box_weight "$BOX_WEIGHT" \
    "$@"

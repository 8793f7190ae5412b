"""``python -m llava_getok.hf.train``: GETok fine-tuning of a transformers-native model (Qwen2.5-VL, llava-hf) with
trl's ``SFTTrainer``, on converted records (docs/data-format.md).

    python -m llava_getok.hf.train --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct \\
        --data_path data/getok/refcoco_train.json --image_folder data/coco/train2014 \\
        --lora_enable True --lora_r 64 --lora_alpha 128 --getok_grid 32 \\
        --output_dir checkpoints/qwen25vl-getok --bf16 True --per_device_train_batch_size 4 --max_steps 1000

Model: ``--model_name_or_path`` (a model folder or hub id of a supported family), ``--lora_enable`` with
``--lora_r`` / ``--lora_alpha`` / ``--lora_dropout`` / ``--lora_target_modules`` (a regex; default: the language
model's linear layers), ``--bits 4|8`` (QLoRA, with ``--lora_enable``), ``--attn_implementation``, and Qwen's
``--min_pixels`` / ``--max_pixels`` (the processor's image size range, recorded in the checkpoint).
Data: ``--data_path`` (converted JSON / JSONL; records in the processor's frame: ``orig`` for Qwen2.5-VL, ``pad`` for
llava-hf with ``do_pad``), ``--image_folder``.
GETok: every field of ``GETokSettings`` as ``--getok_<field>`` (``--getok_grid``, ``--getok_sigma``,
``--getok_grid_weight``, ``--getok_box_weight``, ``--getok_format``, ``--getok_data_order``, ...).
Training: every ``SFTConfig`` / ``TrainingArguments`` flag (``--output_dir``, ``--max_steps``, ``--learning_rate``,
``--bf16``, ``--gradient_checkpointing``, ``--deepspeed``, ``--seed``, ...). ``--seed`` also seeds the model's set-up
(the new rows' sizes, LoRA's initialisation): the same command trains the same model.

On a CPU add ``--use_cpu True`` (bf16 then trains under CPU autocast); ``torchrun --nproc_per_node 2 -m
llava_getok.hf.train ... --use_cpu True --ddp_backend gloo`` runs data parallel and ``deepspeed --num_gpus 2 --module
llava_getok.hf.train ... --deepspeed zero2.json --use_cpu True`` runs ZeRO on CPU ranks.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..training.cpu_ranks import close_process_group, launch_argv
from ..options import as_flag_dataclass, from_flags
from ..training.settings import FLAG_PREFIX, GETokSettings


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a Qwen2.5-VL or llava-hf model folder or hub id"})
    lora_enable: bool = field(default=False, metadata={"help": "LoRA on the language model, GETok rows beside it"})
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_target_modules: str | None = field(default=None, metadata={
        "help": "regex of the modules LoRA adapts (default: the language model's linear layers)"})
    bits: int = field(default=16, metadata={"help": "4 or 8: QLoRA (bitsandbytes) with --lora_enable; 16: none"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2"})
    min_pixels: int | None = field(default=None, metadata={"help": "Qwen2.5-VL: the processor's fewest pixels"})
    max_pixels: int | None = field(default=None, metadata={"help": "Qwen2.5-VL: the processor's most pixels"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "converted records (JSON list or JSONL), docs/data-format.md"})
    image_folder: str | None = field(default=None, metadata={"help": "the root the records' image paths are under"})


GETokArguments = as_flag_dataclass(GETokSettings, FLAG_PREFIX, "GETokArguments")  # --getok_<field>, for HfArgumentParser


def settings_from(ours) -> GETokSettings:
    return GETokSettings(**from_flags(ours, GETokSettings, prefix=FLAG_PREFIX))


def parse(argv):
    from transformers import HfArgumentParser
    from trl import SFTConfig

    parser = HfArgumentParser((ModelArguments, DataArguments, GETokArguments, SFTConfig))
    model_args, data_args, ours, args = parser.parse_args_into_dataclasses(args=argv)
    try:
        settings = settings_from(ours)
    except ValueError as e:
        raise SystemExit(f"python -m llava_getok.hf.train: {e}") from None
    # the dataset yields ready model inputs (labels included): nothing for trl to prepare or drop
    args.remove_unused_columns = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if args.gradient_checkpointing and not args.gradient_checkpointing_kwargs:
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    return model_args, data_args, settings, args


def load_base(model_args: ModelArguments, args):
    """The model (float32 weights, bf16 / fp16 autocast from the Trainer; 4 / 8-bit with --bits) and its family."""
    import torch

    from .family import family_of

    try:
        family = family_of(model_args.model_name_or_path) if _is_folder(model_args.model_name_or_path) else None
    except ValueError as e:
        raise SystemExit(f"python -m llava_getok.hf.train: {e}") from None
    kwargs = {"attn_implementation": model_args.attn_implementation, "dtype": torch.float32}
    if model_args.bits in (4, 8):
        if not model_args.lora_enable:
            raise SystemExit(f"--bits {model_args.bits} quantises the model: train it with --lora_enable True")
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if args.bf16 else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=model_args.bits == 4, load_in_8bit=model_args.bits == 8, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=["lm_head", "visual", "vision_tower", "multi_modal_projector"])
    elif model_args.bits != 16:
        raise SystemExit(f"--bits must be 4, 8 or 16, got {model_args.bits}")
    from transformers import AutoConfig

    try:
        family = family or family_of(AutoConfig.from_pretrained(model_args.model_name_or_path))
    except (OSError, ValueError) as e:
        raise SystemExit(f"python -m llava_getok.hf.train: --model_name_or_path {model_args.model_name_or_path}: "
                         f"{str(e).splitlines()[0]}") from None
    return family.load_class().from_pretrained(model_args.model_name_or_path, **kwargs), family


def _is_folder(path: str) -> bool:
    from pathlib import Path

    return (Path(path) / "config.json").is_file()


def load_records(data_args: DataArguments, frame: str) -> list[dict]:
    """The training records; one line (SystemExit) when the file cannot be read or holds records in another frame
    than the model's processor sees."""
    from ..frames import frames_differ
    from ..records import RecordsError, read_records

    try:
        records = read_records(data_args.data_path, require_id=False)
    except (RecordsError, OSError) as e:
        raise SystemExit(f"python -m llava_getok.hf.train: {e}") from None
    if not records:
        raise SystemExit(f"python -m llava_getok.hf.train: {data_args.data_path} holds no records")
    problem = frames_differ(records, frame, data_args.data_path)
    if problem:
        raise SystemExit(f"python -m llava_getok.hf.train: {problem}")
    return records


def check_records(records, processor, limit: int, source: str) -> None:
    """Build the labels of ``limit`` records spread over the file (all for -1) once, before training: a record this
    backend cannot train on stops the run in one line naming it, not minutes into training."""
    from .data import text_labels

    picked = records if limit < 0 else records[:: max(1, len(records) // max(limit, 1))][:limit]
    for r in picked:
        try:
            text_labels(processor, r)
        except ValueError as e:
            raise SystemExit(f"python -m llava_getok.hf.train: {source}: {e}") from None


def build(argv):
    """Everything a run needs, in order: arguments, seed, model, processor, tokens and rows, LoRA, data, trainer."""
    from transformers import set_seed

    from .data import Collator, training_dataset
    from ..frames import processor_frame
    from .family import load_processor
    from .prepare import (LoraSettings, add_location_tokens, check_rows_mode, describe_state, lora_model,
                          set_full_trainable)
    from .trainer import GETokSFTTrainer

    argv = launch_argv(list(argv))
    model_args, data_args, settings, args = parse(argv)
    try:
        mode = check_rows_mode(settings, model_args.lora_enable)
    except ValueError as e:
        raise SystemExit(f"python -m llava_getok.hf.train: {e}") from None
    set_seed(args.seed)  # before the model: resized rows, LoRA's initialisation
    model, family = load_base(model_args, args)
    processor = load_processor(model_args.model_name_or_path, family)
    if model_args.min_pixels or model_args.max_pixels:
        _set_pixels(processor, model_args)
    try:
        frame = processor_frame(processor)
    except ValueError as e:
        raise SystemExit(f"python -m llava_getok.hf.train: {model_args.model_name_or_path}: {e}") from None
    records = load_records(data_args, frame)
    from ..training.settings import FormatError

    try:
        state = add_location_tokens(model, processor.tokenizer, settings, records)
    except (FormatError, ValueError) as e:
        raise SystemExit(f"python -m llava_getok.hf.train: {e}") from None
    if settings.check_data:
        check_records(records, processor, settings.check_data, data_args.data_path)
    if args.local_rank in (-1, 0):
        print(describe_state(state, mode, settings), flush=True)
    zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
    if model_args.lora_enable:
        lora = LoraSettings(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                            model_args.lora_target_modules)
        try:
            model = lora_model(model, family, state, lora, quantized=model_args.bits in (4, 8), zero3=zero3,
                               gradient_checkpointing=args.gradient_checkpointing)
        except ValueError as e:
            raise SystemExit(f"python -m llava_getok.hf.train: {e}") from None
    else:
        set_full_trainable(model, family, settings)
    dataset = training_dataset(records, processor, data_args.image_folder)
    return GETokSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                           data_collator=Collator(processor.tokenizer.pad_token_id), getok=state, settings=settings,
                           family=family, base_model=model_args.model_name_or_path)


def _set_pixels(processor, model_args) -> None:
    ip = processor.image_processor
    if not hasattr(ip, "min_pixels"):
        raise SystemExit(f"--min_pixels / --max_pixels are Qwen2.5-VL's; {type(ip).__name__} has no pixel range")
    for key in ("min_pixels", "max_pixels"):
        value = getattr(model_args, key)
        if value:
            setattr(ip, key, value)
            ip.size["shortest_edge" if key == "min_pixels" else "longest_edge"] = value


def main(argv=None) -> int:
    from ..quiet import install

    install()
    trainer = build(sys.argv[1:] if argv is None else argv)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_final()
    close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

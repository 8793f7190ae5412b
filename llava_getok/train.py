"""``python -m llava_getok.train``: LLaVA's own ``train()`` with the GETok hooks and arguments.

Every argument of LLaVA's ``llava/train/train.py`` passes through unchanged (``--model_name_or_path``,
``--version``, ``--data_path``, ``--image_folder``, ``--vision_tower``, ``--mm_projector_type``,
``--mm_vision_select_layer``, ``--tune_mm_mlp_adapter``, ``--freeze_backbone``, ``--lora_enable``,
``--bits``, ``--learning_rate``, ``--mm_projector_lr``, ``--deepspeed``, ...). Added here:

  --getok_format getok|text|bins                 the location format (default: the training data's, which
                                                 convert-datasets --format wrote; getok if it says none)
  --getok_bins K                                 bins: K bins per axis, tokens <loc_0>..<loc_{K-1}> (default: the
                                                 data's, else 1000)
  --getok_grid N (32)  --getok_rounds R  --getok_offset_levels M (3)  --getok_schedule halving|fixed
  --getok_mode grid|inline|refine (inline)       the GETok config (spec sections 2-5)
  --getok_init sincos2d|mean (sincos2d)          initialisation of the new rows, input and output (bins: the 1D
                                                 code of the bin centre)
  --getok_grid_weight W (0.5)  --getok_box_weight W (0.5)  --getok_sigma S (1.0)  --getok_offset_sigma S (0)
                                                 box-token loss (bins: its 1D analogue, sigma in bins); both weights
                                                 0 = plain LLaVA loss, exactly; text always trains with LLaVA's loss
  --getok_rows auto|full|delta (auto)            auto: only GETok rows train under LoRA/QLoRA/frozen backbone
  --getok_check_data N (-1 = all, 0 = off)       LLaVA's preprocessing check over the data before training
                                                 (N: that many distinct records, spread over the file)
  --getok_data_order shuffle|file (shuffle)      file: train on the records in file order (a curriculum
                                                 written into the data file), not shuffled
  --unfreeze_mm_vision_tower                     also train the CLIP tower; saved in every checkpoint
                                                 (getok_vision_tower.safetensors) and loaded by the builder
  --attn_implementation sdpa|eager|flash_attention_2 (sdpa); flash-attn is imported only when asked

Templates: ``--version getok_v1`` (or ``getok_<any LLaVA template>``); an unknown name is an error (LLaVA
would silently use vicuna_v1). QLoRA (``--bits 4/8``) with a ZeRO-3 config is refused: bitsandbytes/peft do
not support it (LLaVA#1692); use one GPU or ZeRO-2.

On a CPU (tests, the demo, the recipes' ``DEVICE=cpu`` smoke test) add ``--use_cpu True`` and drop ``--tf32``:
``--bf16 True`` / ``--fp16 True`` then train under CPU autocast; ``torchrun --nproc_per_node N ... --ddp_backend
gloo`` runs data parallel, and ``deepspeed --num_gpus N --module llava_getok.train ... --deepspeed zero3.json
--use_cpu True`` runs ZeRO with N ranks (llava_getok.training.cpu_ranks). Gradient checkpointing is non-reentrant
unless ``--gradient_checkpointing_kwargs`` says otherwise. Every checkpoint folder holds ``getok_config.json``,
``getok_rows.safetensors`` and the tokenizer; ``llava.model.builder.load_pretrained_model`` loads it back
after ``llava_getok.register()``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from .formats import FORMAT_NAMES
from .training.cpu_ranks import close_process_group as _close_process_group
from .training.cpu_ranks import launch_argv as cpu_ranks
from .training.settings import DATA_ORDERS, ROW_MODES, GETokSettings

ATTENTION = ("sdpa", "eager", "flash_attention_2")


def getok_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_getok.train", add_help=False,
                                description="GETok options (all other options go to LLaVA's train()).")
    d = GETokSettings()
    p.add_argument("--getok_format", default=None, choices=FORMAT_NAMES)
    p.add_argument("--getok_bins", type=int, default=None)
    p.add_argument("--getok_grid", type=int, default=d.grid)
    p.add_argument("--getok_rounds", type=int, default=None)
    p.add_argument("--getok_offset_levels", type=int, default=d.offset_levels)
    p.add_argument("--getok_schedule", default=d.schedule, choices=("halving", "fixed"))
    p.add_argument("--getok_mode", default=d.mode, choices=("grid", "inline", "refine"))
    p.add_argument("--getok_init", default=d.init, choices=("sincos2d", "mean"))
    p.add_argument("--getok_grid_weight", type=float, default=d.grid_weight)
    p.add_argument("--getok_box_weight", type=float, default=d.box_weight)
    p.add_argument("--getok_sigma", type=float, default=d.sigma)
    p.add_argument("--getok_offset_sigma", type=float, default=d.offset_sigma)
    p.add_argument("--getok_rows", default=d.rows, choices=ROW_MODES)
    p.add_argument("--getok_check_data", type=int, default=d.check_data)
    p.add_argument("--getok_data_order", default=d.data_order, choices=DATA_ORDERS)
    p.add_argument("--unfreeze_mm_vision_tower", type=_bool, nargs="?", const=True, default=False)
    p.add_argument("--attn_implementation", default="sdpa", choices=ATTENTION)
    return p


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _peek(argv, name, default=None):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(f"--{name}", default=default)
    return p.parse_known_args(argv)[0].__dict__[name]


def check_launch(argv) -> None:
    """Refuse combinations that cannot work, with the reason, before any model is loaded."""
    bits = int(_peek(argv, "bits", 16))
    ds = _peek(argv, "deepspeed")
    if bits in (4, 8) and ds:
        try:
            stage = json.loads(open(ds).read()).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError) as e:
            raise SystemExit(f"--deepspeed {ds}: cannot read the config ({e})") from None
        if stage == 3:
            raise SystemExit(f"--bits {bits} with ZeRO-3 ({ds}) is not supported by bitsandbytes/peft (LLaVA#1692): "
                             f"quantised weights cannot be partitioned. Use ZeRO-2 (scripts/zero2.json) or one GPU, "
                             f"or train without --bits.")


def with_default_checkpointing(argv: list[str]) -> list[str]:
    """``argv`` with non-reentrant gradient checkpointing unless the user chose ``--gradient_checkpointing_kwargs``.

    transformers' default, the reentrant checkpoint, fails under DDP with LoRA ("Expected to mark a variable ready
    only once": the adapters' gradients arrive twice); the non-reentrant one is what transformers and torch
    recommend, and is the same computation."""
    if any(a == "--gradient_checkpointing_kwargs" or a.startswith("--gradient_checkpointing_kwargs=") for a in argv):
        return argv
    return argv + ["--gradient_checkpointing_kwargs", json.dumps({"use_reentrant": False})]


def settings_from(ours) -> GETokSettings:
    """The GETok settings of the parsed --getok_* flags (ValueError for a bad value)."""
    return GETokSettings(
        format=ours.getok_format, bins=ours.getok_bins, grid=ours.getok_grid, rounds=ours.getok_rounds,
        offset_levels=ours.getok_offset_levels, schedule=ours.getok_schedule, mode=ours.getok_mode, init=ours.getok_init,
        grid_weight=ours.getok_grid_weight, box_weight=ours.getok_box_weight, sigma=ours.getok_sigma,
        offset_sigma=ours.getok_offset_sigma, rows=ours.getok_rows, train_vision_tower=ours.unfreeze_mm_vision_tower,
        check_data=ours.getok_check_data, data_order=ours.getok_data_order)


def main(argv=None) -> None:
    from .quiet import install

    install()  # the messages that tell a user nothing (llava_getok.quiet), in every process of the run
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = getok_parser().parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
    check_launch(rest)
    if ours.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise SystemExit("--attn_implementation flash_attention_2: the flash-attn package is not installed "
                         "(GPU only: pip install 'llava-getok[gpu]'); use sdpa")
    try:
        settings = settings_from(ours)
    except ValueError as e:  # a bad value of a --getok_* flag: one line
        raise SystemExit(f"python -m llava_getok.train: {e}") from None

    from .llava import register
    from .llava.templates import resolve_template

    register(settings)
    version = _peek(rest, "version", "v0")
    try:
        resolve_template(version)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    import llava.train.train as llava_train

    from .training.settings import FormatError

    sys.argv = [sys.argv[0]] + with_default_checkpointing(cpu_ranks(rest))  # LLaVA's HfArgumentParser reads sys.argv
    try:
        llava_train.train(attn_implementation=ours.attn_implementation)
    except FormatError as e:  # the data's location format and the flags disagree: one line, not a traceback
        raise SystemExit(f"python -m llava_getok.train: {e}") from None
    _close_process_group()


if __name__ == "__main__":
    main()

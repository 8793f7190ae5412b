"""``python -m llava_getok.train``: LLaVA's own ``train()`` with the GETok hooks and options.

Every argument of LLaVA's ``llava/train/train.py`` passes through unchanged (``--model_name_or_path``,
``--version``, ``--data_path``, ``--image_folder``, ``--vision_tower``, ``--lora_enable``, ``--bits``,
``--deepspeed``, ...); the GETok options (``--getok_*``) are the fields of
:class:`llava_getok.training.settings.GETokSettings`, listed by ``--help``.

Templates: ``--version getok_v1`` (or ``getok_<any LLaVA template>``); an unknown name is an error (LLaVA would
silently use vicuna_v1). QLoRA (``--bits 4/8``) with a ZeRO-3 config is refused: bitsandbytes/peft do not support it
(LLaVA#1692); use one GPU or ZeRO-2. ``--seed`` seeds torch before LLaVA builds anything, so a run is reproduced.

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

from .options import add_flags, from_flags
from .training.cpu_ranks import close_process_group as _close_process_group  # shared with llava_getok.hf.train
from .training.cpu_ranks import launch_argv as cpu_ranks
from .training.settings import FLAG_PREFIX, GETokSettings

ATTENTION = ("sdpa", "eager", "flash_attention_2")


def getok_parser() -> argparse.ArgumentParser:
    """The options this entry point adds to LLaVA's: the GETok settings (``--getok_*``) and the attention kernel."""
    p = argparse.ArgumentParser(prog="python -m llava_getok.train", add_help=False,
                                description="GETok options (all other options go to LLaVA's train()).")
    add_flags(p, GETokSettings, prefix=FLAG_PREFIX)
    p.add_argument("--attn_implementation", default="sdpa", choices=ATTENTION, help="attention kernel; flash-attn is "
                   "imported only when asked")
    return p


def _peek(argv, name, default=None):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(f"--{name}", default=default)
    return p.parse_known_args(argv)[0].__dict__[name]


def check_launch(argv) -> None:
    """Refuse combinations that cannot work, with the reason, before any model is loaded."""
    model = _peek(argv, "model_name_or_path") or ""
    if "mpt" in model and _peek(argv, "vision_tower") and not _is_mpt(model):
        raise SystemExit(f"--model_name_or_path {model}: LLaVA's train() loads any model whose path contains 'mpt' as "
                         "an MPT model (it picks the class by that substring), and this one is not: give it a path "
                         "without 'mpt' (a symbolic link will do)")
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


def _is_mpt(model: str) -> bool:
    """Whether the model's config says MPT (a hub id or a folder without a readable config.json: assume it does)."""
    from pathlib import Path

    config = Path(model) / "config.json"
    if not config.is_file():
        return True
    try:
        return "mpt" in str(json.loads(config.read_text()).get("model_type", "")).lower()
    except ValueError:
        return True


def with_default_checkpointing(argv: list[str]) -> list[str]:
    """``argv`` with non-reentrant gradient checkpointing unless the user chose ``--gradient_checkpointing_kwargs``.

    transformers' default, the reentrant checkpoint, fails under DDP with LoRA ("Expected to mark a variable ready
    only once": the adapters' gradients arrive twice); the non-reentrant one is what transformers and torch
    recommend, and is the same computation."""
    if any(a == "--gradient_checkpointing_kwargs" or a.startswith("--gradient_checkpointing_kwargs=") for a in argv):
        return argv
    return argv + ["--gradient_checkpointing_kwargs", json.dumps({"use_reentrant": False})]


def settings_from(ours) -> GETokSettings:
    """The GETok settings of the parsed ``--getok_*`` flags (ValueError for a bad value)."""
    return GETokSettings(**from_flags(ours, GETokSettings, prefix=FLAG_PREFIX))


def seed_everything(argv) -> None:
    """Seed python, numpy and torch with ``--seed`` (the Trainer's default, 42) before LLaVA's ``train()`` builds the
    model: it creates the projector, the new token rows and LoRA's adapters before the Trainer seeds, so two runs
    of one command would differ from their first step."""
    from transformers import set_seed

    set_seed(int(_peek(argv, "seed", 42)))


def main(argv=None) -> None:
    from .quiet import install

    install()  # the messages that tell a user nothing (llava_getok.quiet), in every process of the run
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = getok_parser().parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__ + "\n" + getok_parser().format_help() + "\nLLaVA's own options:")
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

    version = _peek(rest, "version", "v0")
    register(settings, template=version)
    try:
        resolve_template(version)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    from .llava.trainer import run_llava_train
    from .training.settings import FormatError, TrainingDataError

    sys.argv = [sys.argv[0]] + with_default_checkpointing(cpu_ranks(rest))  # LLaVA's HfArgumentParser reads sys.argv
    seed_everything(rest)
    try:
        run_llava_train(ours.attn_implementation)
    except (FormatError, TrainingDataError) as e:  # what is wrong with the data or the flags: one line, no traceback
        raise SystemExit(f"python -m llava_getok.train: {e}") from None
    _close_process_group()


if __name__ == "__main__":
    main()

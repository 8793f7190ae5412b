"""``llava-getok tiny-model --out DIR``: a tiny random LLaVA and a small GETok data set (drawn shapes), for the
recipes' ``DEVICE=cpu`` smoke test before booking GPUs; prints the environment the recipes read:

    eval "$(llava-getok tiny-model --out /tmp/tiny)" && DEVICE=cpu NUM_GPUS=2 bash scripts/finetune_getok.sh --max_steps 2

``--qwen`` adds a tiny random Qwen2.5-VL (``llava_getok.hf.tiny``) and the same images converted in its frame
(``orig``), for the Qwen recipes: ``QWEN_MODEL``, ``QWEN_DATA_PATH`` (inline answers, for SFT and GRPO's grid stage)
and ``QWEN_REFINE_DATA`` (refine records, for GRPO's refine stage).
"""
from __future__ import annotations

from pathlib import Path

from .llava import tiny


def main(argv=None) -> int:
    """Write the tiny model and data under ``--out``; print ``export NAME=value`` lines (and nothing else) on
    stdout."""
    import argparse
    import contextlib
    import shlex
    import sys

    p = argparse.ArgumentParser(prog="llava-getok tiny-model", description=__doc__.split(";")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write tiny-llava/ and data/ into")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a LLaMA-layout tokenizer folder to use (yours, so that your data is checked with your "
                        "vocabulary); default: a 1000-piece one trained here")
    p.add_argument("--images", type=int, default=16, help="training images of the shapes data set")
    p.add_argument("--grid", type=int, default=32, help="GETok grid of the converted data (the recipes' GRID)")
    p.add_argument("--qwen", action="store_true", help="also a tiny Qwen2.5-VL and its data (frame orig, inline and "
                                                       "refine) for scripts/finetune_getok_qwen.sh / grpo_getok_qwen.sh")
    a = p.parse_args(argv)
    out = a.out.resolve()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the environment only (DeepSpeed logs to stdout)
        tokenizer = a.tokenizer or tiny.train_tokenizer(out / "tokenizer")
        model = tiny.build_tiny_llava(out / "tiny-llava", tokenizer)

        from data_converters import shapes
        from data_converters.cli import main as convert

        data = out / "data"
        shapes.generate(data, {"train": a.images}, image_size=64, n_objects=(2, 3))
        rc = convert(["shapes", "--input", str(data), "--image-root", str(data), "--output", str(data / "train.json"),
                      "--split", "train", "--grid", str(a.grid), "--no-resume"])
        if a.qwen and not rc:
            from .hf.tiny import build_tiny_qwen

            qwen = build_tiny_qwen(out / "tiny-qwen")
            for name, extra in (("train_orig.json", []), ("refine_orig.json", ["--task", "refine"])):
                rc = rc or convert(["shapes", "--input", str(data), "--image-root", str(data), "--output",
                                    str(data / name), "--split", "train", "--grid", str(a.grid), "--frame", "orig",
                                    "--no-resume", *extra])
    if rc:
        return rc
    env = {"MODEL_BASE": model, "VISION_TOWER": model / "vision_tower", "PROJECTOR": "",
           "DATA_PATH": data / "train.json", "IMAGE_FOLDER": data, "GRID": a.grid}
    if a.qwen:
        env.update(QWEN_MODEL=qwen, QWEN_DATA_PATH=data / "train_orig.json", QWEN_REFINE_DATA=data / "refine_orig.json")
    print(f"# tiny random LLaVA in {model}, {a.images} shapes images in {data}", file=sys.stderr)
    print("\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in env.items()))
    return 0

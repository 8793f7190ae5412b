"""``llava-getok export``: a GETok checkpoint as a standalone transformers folder, which
``AutoModelForImageTextToText`` and ``AutoProcessor`` load with no llava-getok installed (the form vLLM, SGLang and TGI
serve):

    llava-getok export --model-path CKPT [--model-base BASE] --out DIR [--conv-mode getok_v1]

- a checkpoint of ``python -m llava_getok.hf.train`` (Qwen2.5-VL, llava-hf): LoRA and the GETok rows merged, the
  processor with the GETok tokens (``llava_getok.hf.export.export_checkpoint``);
- a LLaVA 1.2.x checkpoint (``python -m llava_getok.train``, or a stock LLaVA-1.5): as llava-hf's
  ``LlavaForConditionalGeneration`` with ``LlavaImageProcessor(do_pad=True)`` and, as its chat template, the LLaVA
  conversation it was trained with (``--conv-mode``, as in ``llava-getok predict``; LLaVA does not record it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def llava_parts(tokenizer_dir, model, image_processor, conv_mode: str):
    """What ``llava_hf_from_llava`` takes, read off a loaded LLaVA model and its conversation template."""
    from .hf.export import LlavaParts
    from .hf.templates import LLAVA_IMAGE, two_separator_template
    from .llava.to_hf import conversation_parts, model_parts

    conv = conversation_parts(conv_mode)
    return LlavaParts(**model_parts(model), image_processor=image_processor, tokenizer_dir=str(tokenizer_dir),
                      chat_template=two_separator_template(conv["system"], conv["roles"], conv["sep"], conv["sep2"],
                                                           image=LLAVA_IMAGE))


def export_llava(model_path: str, model_base: str | None, out: Path, conv_mode: str) -> Path:
    from .hf.export import llava_hf_from_llava
    from .predict import load_model
    from .training.sidecar import read_sidecar

    sidecar = read_sidecar(model_path)
    _, model, image_processor = load_model(model_path, model_base, "cpu")
    return llava_hf_from_llava(llava_parts(model_path, model, image_processor, conv_mode), sidecar, out)


def _parser():
    p = argparse.ArgumentParser(prog="llava-getok export", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, help="a GETok checkpoint (either backend) or a stock LLaVA-1.5")
    p.add_argument("--model-base", default=None, help="base model of a LoRA checkpoint (default: the sidecar's)")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (created)")
    p.add_argument("--conv-mode", default="llava_v1", help="LLaVA checkpoints: the conversation template they were "
                   "trained with (python -m llava_getok.train --version), written as the chat template")
    return p


def main(argv=None) -> int:
    from .predict import backend_of
    from .training.sidecar import read_sidecar

    args = _parser().parse_args(argv)
    try:
        if backend_of(args.model_path) == "hf":
            if read_sidecar(args.model_path) is None:
                raise ValueError(f"{args.model_path} is a transformers model already (no GETok sidecar)")
            from .hf.export import export_checkpoint

            out = export_checkpoint(args.model_path, args.out, args.model_base)
        else:
            out = export_llava(args.model_path, args.model_base, args.out, args.conv_mode)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"llava-getok export: {str(e).strip(chr(39))}", file=sys.stderr)
        return 1
    print(f"wrote {out}: load it with transformers' AutoModelForImageTextToText and AutoProcessor", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`llava-getok SUBCOMMAND ...`: one entry point; each subcommand is a module with a ``main(argv)``."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "chat": ("llava_getok.chat", "talk to a model about an image: answers streamed, shapes in pixels, --out picture"),
    "web": ("llava_getok.web", "the web demo (gradio): upload an image, chat, see each shape drawn as it closes"),
    "predict": ("llava_getok.predict", "generate answers for a converted file and parse them to pixel shapes"),
    "eval": ("llava_getok.eval.cli", "score predictions: REC Acc@0.5/0.8, RES cIoU/gIoU, pointing accuracy"),
    "show": ("llava_getok.viz", "draw predictions and ground truth on the images (PNG, contact sheet)"),
    "check-data": ("llava_getok.llava.check", "run LLaVA's own preprocessing over converted data; fail on any mismatch"),
    "export": ("llava_getok.export", "a GETok checkpoint as a standalone transformers folder (LLaVA ones as llava-hf)"),
    "grpo": ("llava_getok.rl.__main__", "GRPO with grounding rewards: --stage grid, then --stage refine"),
    "tiny-model": ("llava_getok.tiny_model", "a tiny random LLaVA + shapes data for the recipes' DEVICE=cpu smoke test"),
    "demo": ("llava_getok.demo", "the embedded default: shapes data -> fine-tune -> predict -> eval -> picture"),
    "recipes": ("llava_getok.recipes", "write the training scripts, DeepSpeed configs and LLaVA patches into --out DIR"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        width = max(map(len, SUBCOMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: llava-getok SUBCOMMAND [--help] ...\n\nsubcommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

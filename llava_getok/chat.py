"""``llava-getok chat``: talk to a GETok model about one image in the terminal, as LLaVA's ``llava.serve.cli``, with
the answer streamed (location tokens kept), each shape printed in pixels of the image, and the picture with the
shapes drawn written with ``--out``.

    llava-getok chat --model-path runs/demo/llava-getok-demo --image-file photo.jpg [--out answer.png] [--grid]
                     [--model-base BASE] [--conv-mode TEMPLATE] [--temperature 0] [--max-new-tokens 512]
                     [--load-4bit | --load-8bit] [--device cpu]

Type a question; an empty line (or end of input) ends the chat. Commands:

    /ground box|point|mask PHRASE   the shape of PHRASE, constrained to exactly one box, point or mask
    /refine                         refine-mode models: the offset turn for the last answer (its points moved)
    /reset                          forget the conversation (same image)
    /help                           this list

The backend is the checkpoint's (its sidecar; a folder without one: a Qwen2.5-VL or llava-hf config is a
transformers model, anything else LLaVA's). A LLaVA model's template is the checkpoint's (its sidecar's ``template``),
else the one LLaVA's cli picks from the folder name; ``--conv-mode`` overrides both. A Qwen2.5-VL or llava-hf model
answers in its own chat template, its images go through its processor, and the shapes are mapped from the frame that
processor gives. The history keeps each raw answer, so a later turn's prompt is what training saw. Images are read
upright (EXIF orientation applied) and the shapes are pixels of that upright image.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import add_flags
from .session import ModelOptions

COMMANDS = ("/ground", "/refine", "/reset", "/help")
HELP = __doc__[__doc__.index("    /ground"):__doc__.index("\n\nThe backend")]


def format_shape(k: int, shape: dict) -> str:
    """One shape as chat prints it: ``box 1: (x1, y1) - (x2, y2) px``."""
    pts = [f"({x:.1f}, {y:.1f})" for x, y in shape["points"]]
    joined = " - ".join(pts) if shape["kind"] in ("box", "polyline") else ", ".join(pts)
    return f"  {shape['kind']} {k}: {joined} px"


def _parser():
    p = argparse.ArgumentParser(prog="llava-getok chat", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + HELP)
    add_flags(p, ModelOptions, dash=True, switches=True, defaults={"max_new_tokens": 512})
    p.add_argument("--image-file", required=True)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default; LLaVA's cli samples at 0.2)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=None, help="PNG: the image with the last answer's shapes drawn")
    p.add_argument("--grid", action="store_true", help="in --out, also the lattice and the cells of the anchors")
    p.add_argument("--offsets", action="store_true", help="in --out, also each point's grid anchor and its offset")
    p.add_argument("--debug", action="store_true", help="after each answer, print the prompt and the raw answer")
    return p


def run(conversation, roles, args, lines, write) -> None:
    """The read-answer loop over ``lines`` (an iterator of input lines; None ends it)."""
    from .viz import save_png

    while True:
        write(f"{roles[0]}: ")
        line = next(lines, None)
        if line is None or not line.strip():
            write("exit...\n")
            return
        text = line.strip()
        try:
            chunks = command(conversation, text)
            if chunks is None:
                continue
            write(f"{roles[1]}: ")
            last = None
            for chunk in chunks:
                write(chunk.delta)
                last = chunk
        except ValueError as e:
            write(f"[{e}]\n")
            continue
        write("\n")
        for k, shape in enumerate(last.shapes, 1):
            write(format_shape(k, shape) + "\n")
        if args.debug:  # as LLaVA's cli --debug
            write("\n" + json.dumps({"prompt": conversation.last_prompt, "outputs": last.text}) + "\n\n")
        if args.out is not None and conversation.picture is not None:
            picture = conversation.engine.picture(conversation.picture, last.shapes, args.grid,
                                                  conversation.last.anchors if args.offsets else ())
            save_png(picture, args.out)
            write(f"  picture: {args.out}\n")


def command(conversation, text: str):
    """The chunks of the answer to one input line, or None for a command that answers nothing (printed here)."""
    if not text.startswith("/"):
        return conversation.ask(text)
    name, _, rest = text.partition(" ")
    if name == "/reset":
        conversation.reset()
        print("[conversation reset]", flush=True)
        return None
    if name == "/help":
        print(HELP, flush=True)
        return None
    if name == "/refine":
        return conversation.refine()
    if name == "/ground":
        kind, _, phrase = rest.strip().partition(" ")
        if kind not in ("box", "point", "mask") or not phrase.strip():
            raise ValueError("usage: /ground box|point|mask PHRASE")
        return conversation.ground(kind, phrase)
    raise ValueError(f"unknown command {name}; one of {', '.join(COMMANDS)}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from . import quiet

    quiet.install()
    from .images import ImageError, load_image

    try:
        picture = load_image(args.image_file)
    except (FileNotFoundError, ImageError) as e:
        print(f"llava-getok chat: --image-file {e}", file=sys.stderr)
        return 1
    from .session import Conversation, load_engine

    engine = load_engine(args, "llava-getok chat")
    if engine is None:
        return 1
    roles = engine.roles
    conversation = Conversation(engine, picture, args.temperature, args.top_p, args.max_new_tokens)

    def write(s):
        sys.stdout.write(s)
        sys.stdout.flush()

    run(conversation, roles, args, iter(sys.stdin.readline, ""), write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``llava-getok web``: the web demo, one process (no controller), laid out as LLaVA's: the image on the left, the chat
on the right. Upload an image or pick an example, ask; the answer streams and each shape (box, point, polyline, mask
decoded from its anchors) is drawn on the image as soon as its group closes. "Ground this phrase" asks for exactly
one box, point or mask (constrained decoding); the toggles draw the GETok lattice with the anchor cells, and where
each offset token moved its grid anchor. The raw answer is shown as text, location tokens included.

    llava-getok web --model-path runs/demo/llava-getok-demo [--examples DIR] [--host 127.0.0.1] [--port 7860]
                    [--model-base BASE] [--conv-mode TEMPLATE] [--device cpu] [--temperature 0]
                    [--max-new-tokens 256] [--load-4bit | --load-8bit]

Example images: the files of ``--examples DIR``; by default, in a checkout, the repository's COCO test images
(tests/fixtures/data/coco_mini/val2017; an installed wheel has none: upload, or pass --examples). Needs the ``web``
extra (``pip install "llava-getok[web]"``). All the model work is :mod:`llava_getok.session`'s: any checkpoint chat
takes (LLaVA, Qwen2.5-VL, llava-hf; the backend read from the checkpoint).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .options import add_flags
from .session import ModelOptions

CHECKOUT_EXAMPLES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data" / "coco_mini" / "val2017"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# a run of location tokens and tags: shown as a code span, which the chat's Markdown shows literally (its HTML
# sanitiser would otherwise swallow <box> and the other tags as unknown elements: gradio-app/gradio#7198)
TOKEN_RUN = re.compile(r"(?:<(?:/?(?:box|seg|pl|offset)|grid_-?\d+_-?\d+|off_-?\d+_-?\d+|delete|loc_\d+|image)>)+")
NO_IMAGE = "Upload an image or pick an example first."
MAX_EXAMPLES = 100  # the dropdown's length; a folder may hold thousands


def shown(text: str) -> str:
    """Answer text as the chat shows it: every run of location tokens in a code span, other backticks escaped.

    >>> shown("the tv <box><grid_0_3><off_0_0><grid_7_5><off_1_0></box> ok")
    'the tv `<box><grid_0_3><off_0_0><grid_7_5><off_1_0></box>` ok'
    """
    return TOKEN_RUN.sub(lambda m: f"`{m.group(0)}`", text.replace("`", "\\`"))


def example_images(folder: Path | None) -> list[Path]:
    """The image files of ``folder`` (default: the checkout's test images, when there is a checkout), sorted."""
    folder = folder if folder is not None else (CHECKOUT_EXAMPLES if CHECKOUT_EXAMPLES.is_dir() else None)
    if folder is None:
        return []
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_EXAMPLES]


def web_command(model: Path, examples: Path | None = None) -> str:
    """The shell command that opens ``model`` in the web demo (its template read from its sidecar), with this
    environment's ``llava-getok`` (no activation needed) and paths relative to the working folder where they are inside
    it."""
    import shlex

    def rel(p):
        p = Path(p).resolve()
        try:
            return str(p.relative_to(Path.cwd()))
        except ValueError:
            return str(p)

    exe = Path(sys.executable).parent / "llava-getok"
    cmd = [rel(exe) if exe.exists() else "llava-getok", "web", "--model-path", rel(model)]
    if examples is not None:
        cmd += ["--examples", rel(examples)]
    return " ".join(shlex.quote(c) for c in cmd)


def build_app(engine, examples: list[Path], temperature: float = 0.0):
    """The gradio Blocks app over a loaded :class:`llava_getok.session.Engine` (not launched)."""
    import gradio as gr

    from .images import ImageError, load_image
    from .session import Conversation

    by_name = {p.name: p for p in examples}

    def picture_of(conv, grid, offsets, shapes=None):
        if conv is None:
            return None
        shapes = conv.last.pixels if shapes is None else shapes
        return engine.picture(conv.picture, shapes, grid, conv.last.anchors if offsets else ())

    def open_image(source, conv, history):
        """A new image: a new conversation, or a message in the chat when the file cannot be shown to the model."""
        if not source:
            return conv, gr.skip(), history, history, gr.skip(), gr.skip()
        try:
            picture = load_image(source)
        except (ImageError, FileNotFoundError) as e:
            name = Path(str(source)).name
            history = history + [{"role": "assistant",
                                  "content": f"Cannot use this image: {str(e).replace(str(source), name)}"}]
            return conv, gr.skip(), history, history, gr.skip(), gr.skip()
        return Conversation(engine, picture, temperature), picture, [], [], "", []

    def upload(path, conv, history):
        return open_image(path, conv, history)

    def pick(name, conv, history):
        return open_image(str(by_name[name]) if name in by_name else None, conv, history)

    def refused(history, message):
        history = history + [{"role": "assistant", "content": message}]
        return history, history, gr.skip(), gr.skip(), gr.skip()

    def stream(conv, history, question, chunks, grid, offsets):
        history = history + [{"role": "user", "content": shown(question)}, {"role": "assistant", "content": ""}]
        picture, n = picture_of(conv, grid, False, []), 0
        yield history, history, picture, "", []
        try:
            for chunk in chunks:
                history[-1] = {"role": "assistant", "content": shown(chunk.text)}
                if len(chunk.shapes) != n:  # redraw as soon as a group closes
                    n = len(chunk.shapes)
                    picture = picture_of(conv, grid, False, chunk.shapes)
                if not chunk.done:
                    yield history, history, picture, chunk.text, chunk.shapes
        except ValueError as e:
            history[-1] = {"role": "assistant", "content": f"[{e}]"}
            yield history, history, picture, "", []
            return
        # the conversation has taken the answer in: its anchors, for the offsets toggle
        yield history, history, picture_of(conv, grid, offsets), conv.last.text, conv.last.pixels

    def ask(question, conv, history, grid, offsets):
        if conv is None:
            yield refused(history, NO_IMAGE)
        elif question.strip():
            yield from stream(conv, history, question, conv.ask(question), grid, offsets)
        else:
            yield (gr.skip(),) * 5

    def ground(kind, phrase, conv, history, grid, offsets):
        if conv is None:
            yield refused(history, NO_IMAGE)
            return
        try:
            chunks = conv.ground(kind, phrase)
        except ValueError as e:
            yield refused(history, f"[{e}]")
            return
        yield from stream(conv, history, f"/ground {kind} {phrase}", chunks, grid, offsets)

    def refine(conv, history, grid, offsets):
        if conv is None:
            yield refused(history, NO_IMAGE)
            return
        try:
            chunks = conv.refine()
        except ValueError as e:
            yield refused(history, f"[{e}]")
            return
        yield from stream(conv, history, "/refine", chunks, grid, offsets)

    def redraw(conv, grid, offsets):
        return picture_of(conv, grid, offsets) if conv is not None else gr.skip()

    def clear(conv):
        if conv is not None:
            conv.reset()
        return [], [], (engine.picture(conv.picture, []) if conv is not None else None), "", []

    with gr.Blocks(title="llava-getok") as app:
        conv = gr.State(None)  # the Conversation of this browser session
        history = gr.State([])  # the chat's messages, as shown
        gr.Markdown("## llava-getok: ask where things are\nUpload an image or pick an example, then ask about it "
                    "or ground a phrase. Shapes are drawn as soon as the model closes them.")
        with gr.Row():
            with gr.Column(scale=5):
                image = gr.Image(label="image", type="pil", format="png", interactive=False, height=420,
                                 elem_id="picture")
                upload_button = gr.UploadButton("Upload an image", file_types=["image"], type="filepath",
                                                elem_id="upload")
                example = gr.Dropdown([p.name for p in examples], value=None, label="or pick an example image",
                                      elem_id="example")
                with gr.Row():
                    grid = gr.Checkbox(label="grid (lattice and anchor cells)", value=False, elem_id="grid")
                    offsets = gr.Checkbox(label="offsets (anchor -> point)", value=False, elem_id="offsets")
            with gr.Column(scale=7):
                chatbot = gr.Chatbot(label="chat", height=420, elem_id="chat")
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the image", show_label=False, scale=8,
                                          elem_id="question")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    kind = gr.Radio(["box", "point", "mask"], value="box", label="ground this phrase", scale=2)
                    phrase = gr.Textbox(placeholder="e.g. the red car", show_label=False, scale=5, elem_id="phrase")
                    ground_button = gr.Button("Ground", scale=1, elem_id="ground")
                with gr.Row():
                    refine_button = gr.Button("Refine (refine-mode models)", visible=engine.refine_mode)
                    clear_button = gr.Button("Clear the chat", elem_id="clear")
                raw = gr.Textbox(label="raw answer (location tokens kept)", interactive=False, lines=2,
                                 elem_id="raw")
                shapes = gr.JSON(label="shapes (pixels of the image)", elem_id="shapes")
        outputs = [chatbot, history, image, raw, shapes]
        hidden = {"api_visibility": "private"}
        upload_button.upload(upload, [upload_button, conv, history], [conv, image, chatbot, history, raw, shapes],
                             api_name="upload")
        example.change(pick, [example, conv, history], [conv, image, chatbot, history, raw, shapes],
                       api_name="pick")
        send.click(ask, [question, conv, history, grid, offsets], outputs, api_name="ask").then(
            lambda: "", None, question, **hidden)
        question.submit(ask, [question, conv, history, grid, offsets], outputs, **hidden).then(
            lambda: "", None, question, **hidden)
        ground_button.click(ground, [kind, phrase, conv, history, grid, offsets], outputs, api_name="ground")
        phrase.submit(ground, [kind, phrase, conv, history, grid, offsets], outputs, **hidden)
        refine_button.click(refine, [conv, history, grid, offsets], outputs, api_name="refine")
        grid.change(redraw, [conv, grid, offsets], image, **hidden)
        offsets.change(redraw, [conv, grid, offsets], image, **hidden)
        clear_button.click(clear, conv, outputs, api_name="clear")
    return app


def _parser():
    p = argparse.ArgumentParser(prog="llava-getok web", description=__doc__.split("\n")[0])
    add_flags(p, ModelOptions, dash=True, switches=True, defaults={"max_new_tokens": 256})
    p.add_argument("--examples", type=Path, default=None, help="folder of example images (default: the checkout's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    from . import quiet

    quiet.install()
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('llava-getok web: needs gradio: pip install "llava-getok[web]"', file=sys.stderr)
        return 1
    if args.examples is not None and not args.examples.is_dir():
        print(f"llava-getok web: --examples {args.examples}: not a folder", file=sys.stderr)
        return 1
    from .session import load_engine

    engine = load_engine(args, "llava-getok web")
    if engine is None:
        return 1
    app = build_app(engine, example_images(args.examples), args.temperature)
    app.queue().launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

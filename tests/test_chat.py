"""`llava-getok chat` as a user types it (a subprocess, its stdin and stdout) on a trained tiny GETok checkpoint, and
the engine's refine turn. The shapes it prints are the raw answer's, in pixels; the picture has them drawn; the
history keeps the raw answers, so a later prompt is what training rendered."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGE = "000000183709.jpg"  # 480 x 640, portrait: the pad frame has a left and right margin
SHAPE_LINE = re.compile(r"^  (box|point|mask|polyline) (\d+): (.*) px$")


def pixels(text, size, cfg):
    from llava_getok.parse import parse
    from llava_getok.records import shapes_to_pixels

    return shapes_to_pixels(parse(text, cfg).shapes, size, "pad")


def printed_points(line):
    return [[float(v) for v in p.split(", ")] for p in re.findall(r"\(([^)]*)\)", line)]


@pytest.fixture(scope="module")
def chat_run(tiny_getok_checkpoint, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "answer.png"
    typed = ["/ground box the person", "Where is the person?", "/refine", "/ground point the man", "/nonsense", "/reset",
             "/ground mask the person", ""]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "llava_getok.cli", "chat", "--model-path", str(tiny_getok_checkpoint),
                           "--image-file", str(shared_data / "coco_mini" / "val2017" / IMAGE), "--device", "cpu",
                           "--conv-mode", "getok_v1", "--max-new-tokens", "12", "--out", str(out), "--debug"],
                          input="\n".join(typed) + "\n", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_chat_streams_grounds_and_prints_each_shape_in_pixels(chat_run):
    import llava_getok as gt

    proc, out = chat_run
    cfg = gt.GETokConfig(grid=8)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("USER: ASSISTANT: ") and lines[-1] == "USER: exit..."
    answers = [(k, x) for k, x in enumerate(lines) if "ASSISTANT: " in x]
    box = next(x for _, x in answers if "<box>" in x)
    text = box.split("ASSISTANT: ", 1)[1]
    assert re.fullmatch(r"<box>(<grid_\d_\d><off_-?\d_-?\d>){2}</box>", text), text  # exactly one box, tokens kept
    k = lines.index(box)
    assert SHAPE_LINE.match(lines[k + 1]).group(1, 2) == ("box", "1")
    expected = np.ravel(pixels(text, (480, 640), cfg)[0]["points"])
    assert np.ravel(printed_points(lines[k + 1])) == pytest.approx(expected, abs=0.051)
    point = next(x for _, x in answers if "the man" in proc.stdout and "<grid" in x and "<box>" not in x and "<seg>" not in x)
    assert re.fullmatch(r"<grid_\d_\d><off_-?\d_-?\d>", point.split("ASSISTANT: ", 1)[1])
    mask = next(x for _, x in answers if "<seg>" in x)
    assert SHAPE_LINE.match(lines[lines.index(mask) + 1]).group(1) == "mask"
    assert "[/refine is for models trained in refine mode" in proc.stdout
    assert "[unknown command /nonsense" in proc.stdout and "[conversation reset]" in proc.stdout
    assert proc.stderr == ""  # chat prints its own output only: no load-time notices of the libraries


def test_chat_history_keeps_the_raw_answers_as_training_rendered_them(chat_run):
    """The second prompt is LLaVA's template over the turns with the first raw answer, GETok tokens included."""
    from llava_getok.llava import register
    from llava_getok.llava.inputs import render_prompt

    register()
    proc, _ = chat_run
    debug = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"prompt"')]
    first, second = debug[0], debug[1]
    assert re.fullmatch(r"<box>.*</box>", first["outputs"])
    turns = [{"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the region this "
                                        "sentence describes: the person."},
             {"from": "gpt", "value": first["outputs"]}, {"from": "human", "value": "Where is the person?"}]
    assert second["prompt"] == render_prompt(turns, "getok_v1")
    after_reset = debug[-1]["prompt"]  # /reset: the next question is the first again, with the image
    assert after_reset.count("USER:") == 1 and after_reset.count("<image>") == 1


def test_chat_writes_the_picture_with_the_last_shape_drawn(chat_run):
    proc, out = chat_run
    assert f"  picture: {out}" in proc.stdout
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (640, 480, 3)
    red = (picture[..., 0] > 200) & (picture[..., 1] < 80) & (picture[..., 2] < 80)
    assert red.sum() > 20  # the mask's anchors (and its overlay) in the prediction colour


def test_chat_stops_in_one_line_on_a_bad_image(tiny_getok_checkpoint, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"a text file named as a photo")
    proc = subprocess.run([sys.executable, "-m", "llava_getok.cli", "chat", "--model-path", str(tiny_getok_checkpoint),
                           "--image-file", str(bad), "--device", "cpu"], input="", capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"llava-getok chat: --image-file {bad}: not an image file (PIL cannot identify image format)"]


def test_refine_turn_moves_the_first_answers_points(tiny_getok_checkpoint, shared_data):
    """A model trained in refine mode: the first answer is grid-only, /refine's answer is one offset per point,
    constrained to fit it, and the shapes are the first answer's moved by those offsets (the tiny checkpoint's tokens
    are the same in refine mode)."""
    import llava_getok as gt
    from llava_getok.codec import apply_refinement
    from llava_getok.images import load_image
    from llava_getok.parse import parse
    from llava_getok.records import shapes_to_pixels
    from llava_getok.session import Conversation, Engine

    loaded = Engine.load(str(tiny_getok_checkpoint), device="cpu", max_new_tokens=12)
    assert loaded.template == "getok_v1"  # no --conv-mode: the template the checkpoint's sidecar records
    cfg = gt.GETokConfig(grid=8, mode="refine")
    engine = Engine(loaded.part, cfg, 12)
    chat = Conversation(engine, load_image(shared_data / "coco_mini" / "val2017" / IMAGE))
    first = list(chat.ground("box", "the person"))[-1]
    assert first.done and re.fullmatch(r"<box><grid_\d_\d><grid_\d_\d></box>", first.text), first.text
    chunks = list(chat.refine())
    second = chunks[-1].text
    assert re.fullmatch(r"<offset><box>(<off_-?\d_-?\d>|<delete>){2}</box></offset>", second), second
    refined = apply_refinement(parse(first.text, cfg.with_mode("grid")).shapes, parse(second, cfg).refinements, cfg)
    assert chunks[-1].shapes == shapes_to_pixels(refined, (480, 640), "pad")
    assert chat.turns[-2]["value"] == f"Your answer was {first.text}. Refine it: one offset for each point, or " \
                                      f"delete the points that are wrong."

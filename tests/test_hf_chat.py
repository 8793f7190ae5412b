"""`llava-getok chat` (and the engine web and the worker share) on checkpoints of llava_getok.hf, the backend read from
the checkpoint: the prompt from the model's chat template, the image through its processor, the answer streamed with
its GETok tokens, the shapes in pixels from the processor's frame: the same text and shapes `llava-getok predict`
gives for that question."""
import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHAPE_LINE = re.compile(r"^  (box|point|mask|polyline) (\d+): (.*) px$")
BOX = re.compile(r"<box>(<grid_\d_\d><off_-?\d_-?\d>){2}</box>")
MAX_NEW = "16"


def printed_points(line):
    return [[float(v) for v in p.split(", ")] for p in re.findall(r"\(([^)]*)\)", line)]


def predicted(tmp_path, ckpt, data, record, question, *flags):
    """``llava-getok predict``'s line for ``record`` asked ``question`` (its image, size and frame) by ``ckpt``."""
    from llava_getok.cli import main

    asked = dict(record, conversations=[{"from": "human", "value": "<image>\n" + question},
                                        record["conversations"][1]])
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps([asked]))
    out = path.with_suffix(".jsonl")
    assert main(["predict", "--model-path", str(ckpt), "--data", str(path), "--image-root",
                 str(data.parent / "images"), "--output", str(out), "--device", "cpu", "--max-new-tokens", MAX_NEW,
                 *flags]) == 0
    return json.loads(out.read_text())


def answers(stdout):
    """(answer text, [printed shape lines]) per answer chat printed."""
    lines = stdout.splitlines()
    out = []
    for k, line in enumerate(lines):
        if "ASSISTANT: " in line:
            shapes = []
            for nxt in lines[k + 1:]:
                if not SHAPE_LINE.match(nxt):
                    break
                shapes.append(nxt)
            out.append((line.split("ASSISTANT: ", 1)[1], shapes))
    return out


def same_shapes(printed, shapes):
    assert [SHAPE_LINE.match(x).group(1) for x in printed] == [s["kind"] for s in shapes]
    for line, shape in zip(printed, shapes):
        assert np.ravel(printed_points(line)) == pytest.approx(np.ravel(shape["points"]), abs=0.051)  # to 0.1 px


@pytest.fixture(scope="module")
def qwen_chat(hf_full_run, hf_grounding, tmp_path_factory):
    """Chat with the full Qwen2.5-VL checkpoint as a user types it: the record's question, /reset, /ground box, /refine."""
    _, ckpt = hf_full_run
    data = hf_grounding["orig"]
    record = json.loads(data.read_text())[0]
    out = tmp_path_factory.mktemp("hf-chat") / "answer.png"
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    typed = [question, "/reset", "/ground box the object", "/refine", ""]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "llava_getok.cli", "chat", "--model-path", str(ckpt), "--image-file",
                           str(data.parent / "images" / record["image"]), "--device", "cpu", "--max-new-tokens",
                           MAX_NEW, "--out", str(out), "--debug"],
                          input="\n".join(typed) + "\n", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out, ckpt, data, record, question


def test_qwen_chat_answers_as_predict_does(qwen_chat, tmp_path):
    """The record's own question and a /ground box: chat's streamed text and printed shapes are what predict writes
    for that question (unconstrained kind / --shape-only), in pixels of the original image (Qwen's frame: orig)."""
    from llava_getok.records import PROMPTS

    proc, _, ckpt, data, record, question = qwen_chat
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("USER: ASSISTANT: ") and lines[-1] == "USER: exit..."
    (asked, asked_shapes), (grounded, grounded_shapes), *rest = answers(proc.stdout)
    assert not rest  # /refine answers nothing on a grid-and-offsets model
    line = predicted(tmp_path, ckpt, data, record, question)
    assert asked == line["text"].strip()
    same_shapes(asked_shapes, line["shapes"])
    assert BOX.fullmatch(grounded), grounded  # exactly one box, its GETok tokens kept
    line = predicted(tmp_path, ckpt, data, record, PROMPTS["rec"].format(expression="the object"), "--shape-only")
    assert grounded == line["text"].strip() and line["errors"] == []
    same_shapes(grounded_shapes, line["shapes"])
    assert "[/refine is for models trained in refine mode" in proc.stdout and "[conversation reset]" in proc.stdout
    assert proc.stderr == ""  # chat prints its own output only


def test_qwen_chat_prompt_is_the_chat_template_and_the_picture_is_drawn(qwen_chat):
    from PIL import Image

    from llava_getok.hf.family import load_processor
    from llava_getok.hf.generate import prompt_text

    proc, out, ckpt, data, record, _ = qwen_chat
    debug = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"prompt"')]
    processor = load_processor(ckpt)
    assert debug[0]["prompt"] == prompt_text(processor, record["conversations"][:1])
    assert debug[0]["prompt"].count("<|image_pad|>") == 1 and "<|im_start|>assistant" in debug[0]["prompt"]
    assert f"  picture: {out}" in proc.stdout
    assert Image.open(out).size == Image.open(data.parent / "images" / record["image"]).size


def test_llava_hf_lora_engine_grounds_as_predict_does(hf_lora_run, hf_grounding, tmp_path):
    """The LoRA llava-hf checkpoint (pad frame, its base from the sidecar) through the engine chat and web share:
    the constrained /ground box is predict's --shape-only answer, its shapes mapped from the padded square."""
    from llava_getok.images import load_image
    from llava_getok.records import PROMPTS
    from llava_getok.session import Conversation, Engine

    _, ckpt = hf_lora_run
    data = hf_grounding["pad"]
    record = json.loads(data.read_text())[1]
    engine = Engine.load(str(ckpt), device="cpu", max_new_tokens=int(MAX_NEW))
    assert (engine.part.backend, engine.frame) == ("hf", "pad")
    chat = Conversation(engine, load_image(data.parent / "images" / record["image"]))
    last = list(chat.ground("box", "the object"))[-1]
    assert last.done and BOX.fullmatch(last.text), last.text
    line = predicted(tmp_path, ckpt, data, record, PROMPTS["rec"].format(expression="the object"), "--shape-only")
    assert last.text == line["text"].strip()
    assert [s["kind"] for s in last.shapes] == [s["kind"] for s in line["shapes"]] == ["box"]
    assert np.ravel(last.shapes[0]["points"]) == pytest.approx(np.ravel(line["shapes"][0]["points"]), abs=1e-6)
    assert chat.turns[-1] == {"from": "gpt", "value": last.text}  # the history keeps the raw answer

    from llava_getok.serve.model_worker import Worker  # the worker's request: the prompt as the chat template renders it

    buf = tmp_path / "img.b64"
    buf.write_bytes(base64.b64encode((data.parent / "images" / record["image"]).read_bytes()))
    worker = Worker(engine, "tiny", None, "http://127.0.0.1:0")
    prompt = engine.prompt([{"from": "human", "value": "<image>\n" + PROMPTS["rec"].format(expression="the object")}])
    chunks = [json.loads(c) for c in b"".join(worker.generate_stream(
        {"prompt": prompt, "images": [buf.read_text()], "getok_only": "box", "max_new_tokens": int(MAX_NEW)}
    )).split(b"\0") if c]
    assert chunks[-1]["text"] == prompt + last.text and chunks[-1]["shapes"] == last.shapes


def test_stock_models_and_llava_only_flags(tiny_qwen_dir, tiny_llava_hf_dir, capsys):
    """A folder without a sidecar is the hf backend's by its config: Qwen2.5-VL answers in its own JSON pixel boxes,
    llava-hf in LLaVA-1.5's text boxes; LLaVA's template and quantisation flags are refused in one line."""
    from llava_getok.chat import main
    from llava_getok.formats import Qwen25Format, TextFormat
    from llava_getok.images import load_image
    from llava_getok.session import Conversation, Engine

    image = REPO / "tests" / "fixtures" / "data" / "coco_mini" / "val2017" / "000000183709.jpg"
    qwen = Engine.load(str(tiny_qwen_dir), device="cpu", max_new_tokens=4)
    assert isinstance(qwen.fmt, Qwen25Format) and qwen.frame == "orig"
    chat = Conversation(qwen, load_image(image))
    assert list(chat.ground("box", "the man"))[-1].done  # in Qwen2.5-VL's own grounding prompt
    assert "Locate the man, output its bbox coordinates using JSON format.<|im_end|>" in chat.last_prompt
    llava = Engine.load(str(tiny_llava_hf_dir), device="cpu", max_new_tokens=4)
    assert isinstance(llava.fmt, TextFormat) and llava.frame == "pad"
    assert list(llava.stream(llava.prompt([{"from": "human", "value": "hi"}])))[-1].done
    for flag in (["--conv-mode", "vicuna_v1"], ["--load-4bit"]):
        assert main(["--model-path", str(tiny_qwen_dir), "--image-file", str(image), "--device", "cpu", *flag]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"llava-getok chat: {tiny_qwen_dir}: --")

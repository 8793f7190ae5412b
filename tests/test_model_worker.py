"""LLaVA's serving fleet with a GETok model: LLaVA's own controller (``python -m llava.serve.controller``) on the
loopback address, our worker registers with it, and a streamed request through the controller's API returns the
GETok text (tokens kept) and, per chunk, the closed shapes in pixels; a bad image is one error chunk."""
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]
IMAGE = "000000183709.jpg"  # 480 x 640


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what} not ready within {timeout:.0f} s")


@pytest.fixture(scope="module")
def fleet(tiny_getok_checkpoint, tmp_path_factory):
    """LLaVA's controller and our worker, each a process as users start them; stopped after the module."""
    cwd = tmp_path_factory.mktemp("fleet")  # LLaVA's controller writes its log file into the working folder
    env = dict(os.environ, PYTHONPATH=str(REPO))
    pc, pw = free_port(), free_port()
    controller = f"http://127.0.0.1:{pc}"
    procs = [subprocess.Popen([sys.executable, "-m", "llava.serve.controller", "--host", "127.0.0.1", "--port", str(pc)],
                              cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for(lambda: requests.post(controller + "/list_models", timeout=2).ok, "LLaVA's controller")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llava_getok.serve.model_worker", "--host", "127.0.0.1", "--port", str(pw),
             "--worker-address", f"http://127.0.0.1:{pw}", "--controller-address", controller,
             "--model-path", str(tiny_getok_checkpoint), "--device", "cpu", "--conv-mode", "getok_v1"],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        wait_for(lambda: requests.post(controller + "/list_models", timeout=2).json()["models"]
                 and requests.post(f"http://127.0.0.1:{pw}/worker_get_status", timeout=2).ok, "the worker")
        yield controller
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def stream(controller, **params):
    r = requests.post(controller + "/worker_generate_stream", json={"model": "tiny-llava-getok", **params},
                      stream=True, timeout=60)
    return [json.loads(c) for c in r.iter_lines(delimiter=b"\0") if c]


def test_worker_registers_with_llavas_controller_and_streams_getok_text_and_shapes(fleet, shared_data):
    import llava_getok as gt
    from llava_getok.llava import register
    from llava_getok.llava.inputs import render_prompt
    from llava_getok.parse import parse
    from llava_getok.records import shapes_to_pixels

    assert requests.post(fleet + "/list_models", timeout=5).json()["models"] == ["tiny-llava-getok"]
    register()
    prompt = render_prompt([{"from": "human", "value": "<image>\nWhere is the person?"}], "getok_v1")
    image = base64.b64encode((shared_data / "coco_mini" / "val2017" / IMAGE).read_bytes()).decode()
    chunks = stream(fleet, prompt=prompt, images=[image], temperature=0, max_new_tokens=16, stop="</s>",
                    getok_only="box")
    assert len(chunks) >= 2 and all(c["error_code"] == 0 and c["text"].startswith(prompt) for c in chunks)
    answer = chunks[-1]["text"][len(prompt):]
    assert answer.startswith("<box><grid_") and answer.endswith("</box>"), answer  # the tokens survive
    expected = shapes_to_pixels(parse(answer, gt.GETokConfig(grid=8)).shapes, (480, 640), "pad")
    assert chunks[-1]["shapes"] == expected and len(expected) == 1
    assert all(c["shapes"] == [] for c in chunks if "</box>" not in c["text"][len(prompt):])  # only once closed

    bad = stream(fleet, prompt=prompt, images=[base64.b64encode(b"no image here").decode()], max_new_tokens=4)
    assert bad == [{"text": "images[0]: the uploaded image: not an image file (PIL cannot identify image format)",
                    "error_code": 1}]
    again = stream(fleet, prompt=prompt, images=[image], temperature=0, max_new_tokens=16, getok_only="box")
    assert again[-1]["text"] == chunks[-1]["text"]  # still serving, greedy and deterministic

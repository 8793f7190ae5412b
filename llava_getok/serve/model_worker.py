"""A model worker that speaks LLaVA's worker API (``llava/serve/model_worker.py``) for GETok checkpoints: it registers
with LLaVA's controller, answers ``/worker_get_status`` and streams ``/worker_generate_stream`` as b"\\0"-separated
JSON chunks, ``{"text": prompt + answer so far, "error_code": 0}``, as LLaVA's worker does, with two differences:

- the GETok tokens are kept in ``text`` (LLaVA's worker decodes with ``skip_special_tokens=True``), and each chunk
  carries ``shapes``: the shapes closed so far, ``[{"kind", "points"}]`` in pixels of the request's (upright) image;
- a request may ask for a constrained answer: ``"getok_only": "box" | "point" | "mask" | "polyline" | "shape"``
  (exactly one such shape), and ``"constrained": false`` turns the GETok grammar off (on by default).

    python -m llava_getok.serve.model_worker --model-path CKPT [--model-base BASE] [--model-name NAME]
        --controller-address http://127.0.0.1:21001 --worker-address http://127.0.0.1:21002
        [--host 127.0.0.1] [--port 21002] [--device cpu] [--conv-mode TEMPLATE] [--no-register]

Request fields read, as LLaVA's: ``prompt`` (the rendered conversation, one ``<image>``; for a Qwen2.5-VL or llava-hf
checkpoint: rendered by the model's chat template, with its one image token, ``<|image_pad|>`` / ``<image>``),
``images`` (base64, one), ``temperature``, ``top_p``, ``max_new_tokens`` (at most 1024), ``stop``. A bad image is a
chunk with ``error_code`` 1 and a one-line ``text``. Generation is :mod:`llava_getok.session`'s, one request at a time. Needs the ``serve``
extra (fastapi, uvicorn, requests).
"""
import argparse
import base64
import binascii
import json
import logging
import sys
import threading
import time

from ..options import add_flags
from ..session import ModelOptions

logger = logging.getLogger("llava_getok.serve")
HEART_BEAT_INTERVAL = 15  # seconds: LLaVA's WORKER_HEART_BEAT_INTERVAL (its controller drops workers silent for 90)
MAX_NEW_TOKENS = 1024  # LLaVA's worker's cap


def model_name_of(model_path: str) -> str:
    """LLaVA's worker's rule: the folder name, or ``parent_checkpoint-N`` for a checkpoint folder."""
    parts = model_path.rstrip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def _chunk(data: dict) -> bytes:
    return json.dumps(data).encode() + b"\0"


class Worker:
    """The engine behind LLaVA's worker API, and its registration with a controller."""

    def __init__(self, engine, model_name: str, controller_addr: str | None, worker_addr: str):
        self.engine, self.model_name = engine, model_name
        self.controller_addr, self.worker_addr = controller_addr, worker_addr
        self.in_flight = 0
        self._count = threading.Lock()

    def status(self) -> dict:
        return {"model_names": [self.model_name], "speed": 1, "queue_length": self.in_flight}

    def register(self) -> None:
        import requests

        r = requests.post(self.controller_addr + "/register_worker", timeout=10,
                          json={"worker_name": self.worker_addr, "check_heart_beat": True, "worker_status": self.status()})
        r.raise_for_status()

    def heart_beat(self) -> None:
        """Tell the controller this worker is alive; register again when it has forgotten the worker."""
        import requests

        try:
            r = requests.post(self.controller_addr + "/receive_heart_beat", timeout=5,
                              json={"worker_name": self.worker_addr, "queue_length": self.in_flight})
            if not r.json().get("exist", True):
                self.register()
        except (requests.RequestException, ValueError) as e:
            logger.warning("heart beat to %s failed: %s", self.controller_addr, e)

    def start_heart_beat(self) -> None:
        def beat():
            while True:
                time.sleep(HEART_BEAT_INTERVAL)
                self.heart_beat()

        threading.Thread(target=beat, daemon=True, name="heart-beat").start()

    def generate_stream(self, params: dict):
        """LLaVA's ``/worker_generate_stream`` body: chunks of b"\\0"-terminated JSON."""
        with self._count:
            self.in_flight += 1
        try:
            yield from self._stream(params)
        except ValueError as e:  # a request that cannot be answered: one line, as LLaVA's error chunks
            yield _chunk({"text": str(e), "error_code": 1})
        finally:
            with self._count:
                self.in_flight -= 1

    def _stream(self, params: dict):
        from ..images import ImageError, load_image

        engine = self.engine
        prompt = params.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("the request needs a 'prompt' string")
        images = params.get("images") or []
        marker = engine.part.image_marker  # LLaVA's <image>; a transformers model's image token (Qwen: <|image_pad|>)
        if len(images) != prompt.count(marker) or len(images) > 1:
            raise ValueError(f"one image and one {marker} in the prompt are supported; the request has {len(images)} "
                             f"image(s) and {prompt.count(marker)} {marker}")
        picture = None
        if images:
            try:
                picture = load_image(base64.b64decode(images[0], validate=False))
            except (ImageError, binascii.Error) as e:
                raise ValueError(f"images[0]: {e}") from None
        only = params.get("getok_only")
        if only not in (None, "box", "point", "mask", "polyline", "shape"):
            raise ValueError(f"getok_only must be box, point, mask, polyline or shape, got {only!r}")
        processors = engine.processors(only) if params.get("constrained", True) else []
        max_new = min(int(params.get("max_new_tokens", 256)), MAX_NEW_TOKENS)
        stop = params.get("stop") or None
        text = ""
        for chunk in engine.stream(prompt, picture, processors, float(params.get("temperature", 0.0)),
                                   float(params.get("top_p", 1.0)), max_new, stop=stop):
            text = chunk.text
            if stop and text.endswith(stop):
                text = text[: -len(stop)]
            yield _chunk({"text": prompt + text, "error_code": 0, "shapes": chunk.shapes})


def make_app(worker: Worker):
    """The FastAPI app with LLaVA's two worker routes."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI()  # (no postponed annotations in this module: FastAPI reads the handlers' Request annotation)

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request):
        return StreamingResponse(worker.generate_stream(await request.json()))

    @app.post("/worker_get_status")
    async def get_status():
        return worker.status()

    return app


def _parser():
    p = argparse.ArgumentParser(prog="python -m llava_getok.serve.model_worker", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=21002)
    p.add_argument("--worker-address", default="http://127.0.0.1:21002")
    p.add_argument("--controller-address", default="http://127.0.0.1:21001")
    add_flags(p, ModelOptions, dash=True, switches=True, defaults={"max_new_tokens": 256})
    p.add_argument("--model-name", default=None, help="default: the folder name, as LLaVA's worker")
    p.add_argument("--no-register", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    from .. import quiet

    quiet.install()
    try:
        import uvicorn
    except ImportError:
        print('model_worker: needs fastapi and uvicorn: pip install "llava-getok[serve]"', file=sys.stderr)
        return 1
    from ..session import load_engine

    engine = load_engine(args, "model_worker")
    if engine is None:
        return 1
    worker = Worker(engine, args.model_name or model_name_of(args.model_path),
                    None if args.no_register else args.controller_address, args.worker_address)
    if not args.no_register:
        worker.register()
        worker.start_heart_beat()
        logger.info("registered %s (%s) with %s", worker.worker_addr, worker.model_name, args.controller_address)
    uvicorn.run(make_app(worker), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

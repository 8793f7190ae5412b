"""How much each box representation costs and how much it loses: GETok vs the usual alternatives.

For every box of COCO (tests/fixtures/data/coco_mini, pixel boxes, `orig` frame) and every representation:
location tokens per box (text formats counted with a real 32k LLaMA-layout sentencepiece tokenizer: Mistral-7B
v0.1's, read from the `mistral_common` wheel), mean round-trip IoU, and the share of boxes whose round-trip
IoU is >= 0.5 / 0.8 / 0.9 (the ceiling a representation puts on Acc@0.5 / 0.8 / 0.9). Then encode+decode
throughput (boxes/s) on one million random boxes.

    .venv/bin/python bench/representations.py [--n-random 1000000] [--out bench/results/representations.md]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

import llava_getok as gt
from llava_getok.atomic import write_text_atomic
from llava_getok.geometry import box_iou, boxes_to_frame, xywh_to_xyxy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COCO = ROOT / "tests" / "fixtures" / "data" / "coco_mini" / "instances_val2017.json"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llava-getok"


def llama_layout_tokenizer():
    """Mistral-7B v0.1's sentencepiece model (LLaMA layout, 32k BPE), from the mistral_common wheel (PyPI)."""
    import sentencepiece as spm

    model = CACHE / "tokenizer.model.v1"
    if not model.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "mistral_common"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wheel = next(Path(tmp).glob("mistral_common-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                model.write_bytes(z.read("mistral_common/data/tokenizer.model.v1"))
    return spm.SentencePieceProcessor(model_file=str(model))


# -- representations: encode (N, 4) normalised boxes -> list of strings, decode back -----------------------

def getok(rounds):
    cfg = gt.GETokConfig(grid=32, rounds=rounds, mode="grid" if rounds == 0 else "inline")
    return (lambda b: gt.encode_boxes(b, cfg), lambda t: gt.decode_boxes(t, cfg), 2 * (1 + rounds), None)


def kosmos2():
    from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index, patch_index_to_coordinate

    def enc(boxes):
        return ["<patch_index_%04d><patch_index_%04d>" % coordinate_to_patch_index(tuple(b), 32) for b in boxes.tolist()]

    def dec(texts):
        idx = np.array(re.findall(r"<patch_index_(\d+)><patch_index_(\d+)>", "".join(texts)), dtype=int)
        return np.array([patch_index_to_coordinate(int(a), int(b), 32) for a, b in idx])

    return enc, dec, 2, None


def bins_1024():  # Pix2Seq / PaliGemma: one <locNNNN> token per coordinate, PaliGemma order y1 x1 y2 x2
    def enc(boxes):
        q = np.minimum(np.floor(boxes * 1024), 1023).astype(int)[:, [1, 0, 3, 2]]
        return ["".join(f"<loc{v:04d}>" for v in row) for row in q.tolist()]

    def dec(texts):
        q = np.array(re.findall(r"<loc(\d{4})>", "".join(texts)), dtype=float).reshape(-1, 4)
        return ((q + 0.5) / 1024)[:, [1, 0, 3, 2]]

    return enc, dec, 4, None


def llava_text():  # LLaVA-1.5: "[0.28, 0.80, 0.48, 0.98]"
    def enc(boxes):
        return ["[%.2f, %.2f, %.2f, %.2f]" % tuple(b) for b in boxes.tolist()]

    def dec(texts):
        return np.array(re.findall(r"\[([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+)\]", "".join(texts)), dtype=float)

    return enc, dec, None, "tokenizer"


def qwen_ints():  # Qwen-VL: <box>(x1,y1),(x2,y2)</box>, integers 0-999; <box> tags are special tokens
    def enc(boxes):
        q = np.minimum(np.floor(boxes * 1000), 999).astype(int)
        return ["(%d,%d),(%d,%d)" % tuple(row) for row in q.tolist()]

    def dec(texts):
        return np.array(re.findall(r"\((\d+),(\d+)\),\((\d+),(\d+)\)", "".join(texts)), dtype=float) / 1000

    return enc, dec, None, "tokenizer"


REPRESENTATIONS = {
    "GETok R=0 (n=32, grid only)": getok(0),
    "GETok R=1 (n=32, inline)": getok(1),
    "GETok R=2 (n=32, inline)": getok(2),
    "Kosmos-2 32x32 patch corners": kosmos2(),
    "Pix2Seq/PaliGemma 1024 bins": bins_1024(),
    "LLaVA-1.5 text, 2 decimals": llava_text(),
    "Qwen-VL integers 0-999": qwen_ints(),
}


def coco_boxes(path):
    data = json.loads(Path(path).read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    out = [boxes_to_frame(xywh_to_xyxy(a["bbox"]), sizes[a["image_id"]], "orig") for a in data["annotations"]]
    return np.clip(np.array(out), 0, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coco", default=str(DEFAULT_COCO))
    ap.add_argument("--n-random", type=int, default=1_000_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "representations.md"))
    args = ap.parse_args(argv)

    boxes = coco_boxes(args.coco)
    sp = llama_layout_tokenizer()
    rng = np.random.default_rng(0)
    xy = rng.random((args.n_random, 2, 2))
    rand = np.concatenate([xy.min(1), xy.max(1)], 1)

    rows = []
    for name, (enc, dec, n_loc, counted) in REPRESENTATIONS.items():
        texts = enc(boxes)
        iou = box_iou(dec(texts), boxes)
        if counted:  # count real tokenizer pieces of the text as it would stand after a word
            n_loc = float(np.mean([len(sp.encode(" " + t)) for t in texts]))
        t0 = time.perf_counter()
        back = dec(enc(rand))
        dt = time.perf_counter() - t0
        assert back.shape == rand.shape
        rows.append((name, n_loc, iou.mean(), (iou >= 0.5).mean(), (iou >= 0.8).mean(), (iou >= 0.9).mean(),
                     args.n_random / dt))

    head = (f"Box representations on {len(boxes)} COCO boxes (coco_mini, orig frame); throughput on "
            f"{args.n_random:,} random boxes, one process, `python bench/representations.py`.\n\n"
            "| representation | location tokens / box | mean round-trip IoU | IoU>=0.5 | IoU>=0.8 | IoU>=0.9 "
            "| encode+decode boxes/s |\n|---|---|---|---|---|---|---|\n")
    table = head + "".join(
        f"| {n} | {t:.1f} | {m:.4f} | {a:.3f} | {b:.3f} | {c:.3f} | {s:,.0f} |\n" for n, t, m, a, b, c, s in rows
    )
    print(table)
    write_text_atomic(Path(args.out), table)


if __name__ == "__main__":
    main()

"""Where a finished demo run's boxes go wrong: which shape, which cell, or the offset within the cell.

For each ``llava-getok demo --out DIR`` folder (its val.json, predictions.jsonl and data/annotations.jsonl): the
share of boxes on the named shape (best overlap, as the demo's "selection"), and for those boxes the share that
reach IoU 0.5 (precision), the mean corner error in pixels, the share of corners whose grid token is the right
cell, and how often a corner's offset token is ``<off_0_0>`` (keep the cell centre) in the prediction and in the
ground truth. The offset columns say whether the model uses the offset round at all.

    .venv/bin/python bench/demo_errors.py runs/demo [more demo folders ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llava_getok.demo.scoring import on_named_shape, predicted_box
from llava_getok.geometry import box_iou
from llava_getok.parse import lex

KEEP = "<off_0_0>"


def corners(text: str) -> list[tuple[str, str | None]]:
    """(grid token, the offset token after it or None) of each corner of the first box in ``text``."""
    toks = [t for _, t, _ in lex(text)]
    out = []
    for k, t in enumerate(toks):
        if t.startswith("<grid_"):
            nxt = toks[k + 1] if k + 1 < len(toks) else None
            out.append((t, nxt if nxt and nxt.startswith("<off_") else None))
    return out[:2]


def run_errors(folder: Path) -> dict:
    truth = {r["id"]: r for r in map(json.loads, open(folder / "data" / "annotations.jsonl"))}
    answers = {r["id"]: r["conversations"][1]["value"] for r in json.loads((folder / "val.json").read_text())}
    n = on_shape = 0
    ious, errors, right_cell, keep_pred, keep_true = [], [], [], [], []
    for line in open(folder / "predictions.jsonl"):
        p = json.loads(line)
        n += 1
        rec = truth[p["id"].rsplit("-", 1)[0]]
        pred = predicted_box(p)
        if pred is None or not on_named_shape(pred, rec):
            continue
        on_shape += 1
        gt = np.asarray(rec["box"], float)
        ious.append(float(np.asarray(box_iou(gt[None], pred[None])).reshape(-1)[0]))
        errors.append(np.abs(pred - gt))
        for (pg, po), (tg, to) in zip(corners(p["text"]), corners(answers[p["id"]])):
            right_cell.append(pg == tg)
            keep_pred.append(po == KEEP)
            keep_true.append(to == KEEP)
    return {"run": str(folder), "n": n, "selection": on_shape / max(n, 1),
            "precision": float(np.mean(np.asarray(ious) >= 0.5)), "corner_error_px": float(np.mean(errors)),
            "right_cell": float(np.mean(right_cell)), "keep_offset_predicted": float(np.mean(keep_pred)),
            "keep_offset_truth": float(np.mean(keep_true))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="llava-getok demo --out folders (finished runs)")
    a = ap.parse_args(argv)
    missing = [f for f in a.folders if not (f / "predictions.jsonl").is_file()]
    if missing:
        print(f"demo_errors: no predictions.jsonl in {', '.join(map(str, missing))} (not a finished demo run)",
              file=sys.stderr)
        return 2
    print("| run | n | selection | precision (IoU >= 0.5 on the named shape) | mean corner error (px) | right cell "
          "| <off_0_0> predicted / in the truth |")
    print("|---|---|---|---|---|---|---|")
    for folder in a.folders:
        r = run_errors(folder)
        print(f"| {folder.name} | {r['n']} | {r['selection']:.3f} | {r['precision']:.2f} | {r['corner_error_px']:.2f} "
              f"| {r['right_cell']:.2f} | {r['keep_offset_predicted']:.2f} / {r['keep_offset_truth']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

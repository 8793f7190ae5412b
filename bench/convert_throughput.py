"""convert-datasets throughput: records/s on a generated LLaVA-format file (target: 1M records in < 60 s
with 2 workers) and masks/s for RES on the real coco_mini masks (superpixel proposals).

    .venv/bin/python bench/convert_throughput.py [--records 1000000] [--workers 2]

Prints a markdown table and writes bench/results/convert_throughput.md. The generated file imitates
llava_v1_5_mix665k: 1/3 plain VQA turns (pass through), 1/3 REG (a box in the question), 1/3 REC (a box in
the answer, sometimes two), over 16 images of different sizes (sizes come from the image headers, cached).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT / "tests" / "fixtures" / "data"  # real COCO-mini data shipped with the repository


def make_llava_file(path: Path, image_dir: Path, n: int, seed: int = 0):
    from PIL import Image

    rng = random.Random(seed)
    sizes = [(640, 480), (480, 640), (500, 375), (640, 427), (1024, 768), (333, 500), (800, 600), (640, 640)] * 2
    names = []
    for k, (w, h) in enumerate(sizes):
        name = f"img{k:02d}.jpg"
        Image.new("RGB", (w, h), (k * 10, 100, 150)).save(image_dir / name)
        names.append((name, w, h))

    def box(w, h):  # a box inside the image, normalised to the padded square (LLaVA-1.5's data)
        s = max(w, h)
        x1, y1 = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
        x2, y2 = rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h)
        ox, oy = (s - w) // 2, (s - h) // 2
        return "[" + ", ".join(f"{v:.2f}" for v in ((x1 + ox) / s, (y1 + oy) / s, (x2 + ox) / s, (y2 + oy) / s)) + "]"

    with open(path, "w") as f:
        for i in range(n):
            name, w, h = names[i % len(names)]
            kind = i % 3
            if kind == 0:
                conv = [{"from": "human", "value": "<image>\nWhat color is the bus in the picture?"}, {"from": "gpt", "value": "The bus is red and white."}]
            elif kind == 1:
                conv = [{"from": "human", "value": f"<image>\nPlease provide a short description for this region: {box(w, h)}"}, {"from": "gpt", "value": "A man riding a bike."}]
            else:
                ans = box(w, h) if i % 2 else box(w, h) + " and " + box(w, h)
                conv = [{"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: the left dog."}, {"from": "gpt", "value": ans}]
            f.write(json.dumps({"id": f"r{i}", "image": name, "conversations": conv}) + "\n")


def convert(argv):
    from data_converters.cli import build_job
    from data_converters.pipeline import run

    job = build_job([str(a) for a in argv])
    t, c = time.perf_counter(), _cpu()
    summary = run(job)
    return summary, time.perf_counter() - t, _cpu() - c


def _cpu():
    """CPU seconds of this process and its finished children (the worker pool)."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def res_quality(records, image_root) -> float:
    """Mean IoU between each record's ground-truth mask and the union of proposals at its decoded anchors."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    from llava_getok.records import decode_record
    from llava_getok.geometry import mask_iou, points_to_frame
    from llava_getok.masks import SuperpixelGenerator, mask_from_anchors

    gen, ious = SuperpixelGenerator(), []
    for r in records:
        g = r["getok"]
        image = np.asarray(Image.open(image_root / r["image"]).convert("RGB"))
        pts = points_to_frame(decode_record(r)["shapes"][0]["points"], g["size"], g["frame"])
        ious.append(mask_iou(mask_from_anchors(pts, image, g["frame"], gen), mask_utils.decode(g["mask"]).astype(bool)))
    return float(np.mean(ious)) if ious else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--res-limit", type=int, default=None, help="RES: only the first N coco_mini objects with images")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        t = time.perf_counter()
        make_llava_file(tmp / "mix.jsonl", tmp / "images", a.records)
        gen_s = time.perf_counter() - t
        size_mb = (tmp / "mix.jsonl").stat().st_size / 1e6
        s, secs, cpu = convert(["llava", "--input", tmp / "mix.jsonl", "--image-root", tmp / "images", "--output", tmp / "out.jsonl",
                           "--workers", a.workers, "--no-progress"])
        assert s["read"] == a.records == s["written"] + s["skipped"], s
        rows.append((f"llava rewrite, {a.records:,} records ({size_mb:.0f} MB JSONL), frame pad, inline R=1", a.workers,
                     f"{secs:.1f} s", f"{cpu:.1f} s", f"{a.records / secs:,.0f} records/s",
                     (f"target < 60 s: {'met' if secs < 60 else 'missed'} in wall time here; " if a.records >= 1_000_000 else "the 60 s target is for 1,000,000 records; ") + f"{cpu / a.records * 1e6:.0f} CPU-us/record, "
                     f"so about {cpu / 2:.0f} s on 2 free cores (CPU time / 2, an estimate)"))
        # RES: the coco_mini objects whose images are present
        coco = json.loads((SHARED / "coco_mini" / "instances_val2017.json").read_text())
        have = {int(f.name[:-4]) for f in (SHARED / "coco_mini" / "val2017").glob("*.jpg")}
        coco["annotations"] = [x for x in coco["annotations"] if x["image_id"] in have][: a.res_limit]
        (tmp / "instances_val2017.json").write_text(json.dumps(coco))
        n = len(coco["annotations"])
        s, secs, cpu = convert(["coco", "--input", tmp / "instances_val2017.json", "--image-root", SHARED / "coco_mini" / "val2017",
                           "--task", "res", "--output", tmp / "res.jsonl", "--workers", a.workers, "--on-error", "skip", "--no-progress"])
        recs = [json.loads(line) for line in open(tmp / "res.jsonl")]
        pts = sum(len(r["getok"]["shapes"][0]["points"]) for r in recs) / max(1, len(recs))
        iou = res_quality(recs, SHARED / "coco_mini" / "val2017")
        rows.append((f"coco RES, {n} real masks of 15 images (SLIC 512 superpixels, greedy tau 0.8); {s['written']} written, "
                     f"{pts:.1f} anchors/mask", a.workers, f"{secs:.1f} s", f"{cpu:.1f} s", f"{s['written'] / secs:.1f} masks/s",
                     f"decoded anchors vs ground truth: mean mask IoU {iou:.3f} (the weight-free ceiling)"))
    cpu = f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    lines = [
        "# convert-datasets throughput", "",
        f"Machine: {cpu}. Generating the input took {gen_s:.1f} s (not counted).", "",
        f"Load average when the run ended: {os.getloadavg()[0]:.1f} (wall time includes waiting for the CPU; "
        "CPU time is this job's own, workers included).", "",
        "| job | workers | wall time | CPU time | throughput (wall) | note |", "|---|---|---|---|---|---|",
    ] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [
        "", "Reproduce: `.venv/bin/python bench/convert_throughput.py --records 1000000 --workers 2`", ""]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / "convert_throughput.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()

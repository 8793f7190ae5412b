"""Does GETok help a model learn to ground? The paper's claim at small scale, through the product itself.

Every run is ``llava-getok demo`` (python -m llava_getok.demo): ``convert-datasets shapes --format ...``, training
with ``python -m llava_getok.train``, ``llava-getok predict`` and ``llava-getok eval``; nothing here encodes or
parses a location. Same tiny LLaVA recipe, same shapes data, same steps and seeds; only the location
representation changes, each with its best settings in the trainer:

  getok           GETok grid 8 + one offset round, the trainer's defaults (box-token loss, sincos2d rows)
  getok-factored  the same with --getok_rows factored (grid rows = column part + row part + per-cell residual)
  getok-2rounds   GETok grid 8 + two offset rounds (a quarter-cell step: 32 positions per axis, 2 px at 64 px)
  getok-sigma-half, getok-onehot
                  GETok with the box-token loss's soft grid target 0.5 cell wide (4 px: the bins' 1 bin) or one-hot;
                  every other condition runs with the trainer's default, 1 (a GETok cell: 8 px; a bin: 4 px)
  bins            Pix2Seq / PaliGemma 1D tokens <loc_k>, 16 bins per axis (the precision of GETok with one round),
                  with their 1D distance-aware loss and sincos initialisation (the trainer's defaults for bins)
  text            LLaVA-1.5's text coordinates "[0.12, 0.34, 0.56, 0.78]" (2 decimals; plain LM loss)

A constant learning rate, so a flat curve means the representation stopped learning, not that the schedule
stopped it. Every ``--eval-every`` steps a checkpoint is scored on the first ``--curve-n`` held-out expressions;
the final model on all of them. For each representation: Acc@0.5, Acc@0.8, mean IoU, tokens per answer, train
and eval time (mean ± standard deviation over seeds), the step where its mean curve plateaus, and the curves
(PNG).

    .venv/bin/python bench/learning.py                                  # 4 representations x seeds 0,1,2
    .venv/bin/python bench/learning.py --conditions getok,bins --seeds 0 --steps 600 --eval-every 200   # a quick one

Runs go to --work/<representation>/s<seed> (summary.json, log); a rerun reuses the finished ones, so an
interrupted sweep loses only its unfinished runs. Writes bench/results/NAME.md, NAME.json, NAME_curve.png and
NAME_curve_miou.png (--name, default learning; learning_long: ``--conditions getok,getok-2rounds,text --steps 8000
--eval-every 1000 --name learning_long``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llava_getok.atomic import atomic_path, write_text_atomic

CONDITIONS = {
    "getok": [],
    "getok-factored": ["--rows", "factored"],
    "getok-2rounds": ["--rounds", "2"],
    "getok-sigma-half": ["--sigma", "0.5"],  # the soft grid target as wide in pixels as the bins' (1 bin = half a cell)
    "getok-onehot": ["--sigma", "0"],  # one-hot grid targets (the demo's default)
    "bins": ["--format", "bins", "--bins", "16"],
    "text": ["--format", "text", "--decimals", "2"],
}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
FLAT = 0.03  # a curve is flat when its last third (at least 3 points) moves less than this


def demo_args(a, condition: str, seed: int, out: Path) -> list[str]:
    """The demo's command line of one run: one shape per image (the location alone is learned, not which shape
    is named), one expression per image, no curriculum, a constant learning rate."""
    return [sys.executable, "-m", "llava_getok.demo", "--out", str(out), "--seed", str(seed), "--threads", "1",
            "--steps", str(a.steps), "--eval-every", str(a.eval_every), "--curve-n", str(a.curve_n),
            "--schedule", "constant", "--objects", a.objects, "--val-objects", a.objects, "--turns", "1",
            "--single-steps", "0", "--colour-steps", "0", "--colour-share", "0", "--kind-share", "0",
            "--position-dims", "16",  # the demo's default when these tables were measured (8 since 2026-12-03)
            "--sigma", "1",  # the trainer's --getok_sigma, which these tables were measured with (the demo's is 0)
            "--train-images", str(a.train_images), "--val-images", str(a.val_images), "--sheet", "8",
            *CONDITIONS[condition]]


def run_one(a, condition: str, seed: int) -> dict:
    """One run's numbers, from the demo's summary.json and eval's metrics file. A finished run (its run.json holds
    the same command) is read, not rerun."""
    out = Path(a.work) / condition / f"s{seed}"
    cmd = demo_args(a, condition, seed, out)
    done = out / "run.json"
    if not (done.exists() and json.loads(done.read_text())["cmd"] == cmd[1:]):
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(out.parent / f"s{seed}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        if rc:
            raise SystemExit(f"bench/learning.py: {condition} seed {seed} failed (exit {rc}); see {out.parent}/s{seed}.log")
        write_text_atomic(done, json.dumps({"cmd": cmd[1:], "wall_s": round(time.time() - t0, 1)}) + "\n")
    s = json.loads((out / "summary.json").read_text())
    stage = lambda word: sum(v for k, v in s["stage_seconds"].items() if k.startswith(word))
    rows = json.loads((out / "predictions.metrics.json").read_text())["ceiling"]["rec"]
    return {"condition": condition, "seed": seed, "acc50": s["metrics"]["acc@0.5"], "acc80": s["metrics"]["acc@0.8"],
            "miou": s["metrics"]["miou"], "n": s["metrics"]["n"], "unparseable": s["metrics"]["unparseable"],
            "tokens": s["tokens_per_answer"], "train_s": stage("fine-tuning"),
            "eval_s": stage("predicting") + stage("evaluating"), "curve": s["curve"],
            # eval's ceiling: the ground truth as the format carries it, scored like a prediction
            "ceiling": next(v for k, v in rows.items() if k != "all"),
            "wall_s": json.loads(done.read_text())["wall_s"]}


def rescore(a, condition: str, seed: int) -> None:
    """Predict and evaluate a finished run's saved models again with the current code (its final model and every
    curve checkpoint), keeping its training: for a fix in decoding or evaluation. Rewrites its summary.json."""
    from llava_getok import quiet
    from llava_getok.demo import parser
    from llava_getok.demo.scoring import learning_curve, predict_args, split_row
    from llava_getok.eval.cli import evaluate
    from llava_getok.predict import main as predict

    quiet.install()
    out = Path(a.work) / condition / f"s{seed}"
    d = parser().parse_args(demo_args(a, condition, seed, out)[3:])
    ckpt, val, data, preds = out / "llava-getok-demo", out / "val.json", out / "data", out / "predictions.jsonl"
    if predict(predict_args(ckpt, val, data, preds, d)):
        raise SystemExit(f"bench/learning.py: predicting {ckpt} failed")
    metrics = split_row(evaluate(preds, val, data, out, False, True, None)["metrics"]["rec"])
    summary = json.loads((out / "summary.json").read_text())
    summary |= {"acc@0.5": metrics["acc@0.5"], "metrics": metrics, "curve": learning_curve(ckpt, val, data, out, d),
                "rescored": time.strftime("%Y-%m-%d %H:%M")}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--curve-n", type=int, default=200, help="held-out expressions scored at each curve point")
    ap.add_argument("--objects", default="1-1", help="shapes per image MIN-MAX")
    ap.add_argument("--train-images", type=int, default=16000)
    ap.add_argument("--val-images", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each trains on one thread)")
    ap.add_argument("--note", default="", help="written under the table header")
    ap.add_argument("--work", default=os.environ.get("GETOK_LEARNING_WORK", "/tmp/getok_learning"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default="learning", help="stem of the files written in --out (NAME.md, NAME.json, "
                    "NAME_curve.png, NAME_curve_miou.png): a longer run of some representations beside the main table")
    ap.add_argument("--rescore", action="store_true", help="predict and evaluate the finished runs' saved models "
                    "again with the current code (no training), then write the table")
    a = ap.parse_args(argv)
    names, seeds = a.conditions.split(","), [int(s) for s in a.seeds.split(",")]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        ap.error(f"unknown condition(s) {unknown}; known: {', '.join(CONDITIONS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    runs = []
    jobs = [(n, s) for s in seeds for n in names]  # seed-major: an interrupted sweep has every representation
    if a.rescore:
        for job in jobs:
            rescore(a, *job)
    with ThreadPoolExecutor(a.jobs) as pool:
        for run in pool.map(lambda job: run_one(a, *job), jobs):
            runs.append(run)
            print(f"{run['condition']} seed {run['seed']}: Acc@0.5 {run['acc50']:.3f} Acc@0.8 {run['acc80']:.3f} "
                  f"mIoU {run['miou']:.3f} tokens {run['tokens']:.1f} train {run['train_s']:.0f} s", flush=True)
            write(a, names, seeds, runs)  # after every run, so an interrupted sweep keeps what it measured
    print((a.out / f"{a.name}.md").read_text())


def _ms(values, fmt="{:.3f}"):
    v = np.asarray(values, dtype=float)
    return (fmt + " ± " + fmt).format(v.mean(), v.std()) if len(v) > 1 else fmt.format(v.mean())


def mean_curve(rs, key: str) -> list[tuple[int, float]]:
    """[(step, mean of the curve metric ``key`` over the runs)] on the steps every run has."""
    by_step: dict[int, list[float]] = {}
    for r in rs:
        for point in r["curve"]:
            by_step.setdefault(point["step"], []).append(point[key])
    return [(s, float(np.mean(v))) for s, v in sorted(by_step.items()) if len(v) == len(rs)]


def plateau(curve) -> tuple[int | None, bool]:
    """(first step whose value is within FLAT of the curve's best, whether the curve's last third is flat)."""
    if not curve:
        return None, False
    best = max(v for _, v in curve)
    tail = [v for _, v in curve[len(curve) - max(3, len(curve) // 3):]]
    return next(s for s, v in curve if v >= best - FLAT), max(tail) - min(tail) < FLAT


CURVES = {"acc@0.5": "Acc@0.5", "miou": "mean IoU", "acc@0.8": "Acc@0.8"}


def write(a, names, seeds, runs):
    header = (f"# Location representations on `shapes` (bench/learning.py)\n\n"
              f"`llava-getok demo` runs (convert-datasets --format, python -m llava_getok.train, predict, eval): tiny "
              f"random LLaVA (LLaMA 64 x 3, CLIP 32 x 2, 64 px / 8 px patches, trainable tower with sine-cosine positions), "
              f"{a.steps} steps x batch 16, lr 0.001 constant, {a.objects} shapes per image, {a.train_images} training "
              f"images, grid 8, seeds {','.join(map(str, seeds))}; final scores on {a.val_images} held-out expressions, "
              f"curve points every {a.eval_every} steps on the first {a.curve_n}; {a.jobs} runs at a time on a 2-core "
              f"CPU, one thread each. Mean ± standard deviation over seeds.\n")
    if a.note:
        header += f"\n**{a.note}**\n"
    rows = ["| representation | seeds | Acc@0.5 | Acc@0.8 | mean IoU | unparseable | tokens / answer | train s / run | "
            "eval s | plateau step: Acc@0.5 / mIoU | flat at the end | ceiling Acc@0.5 / 0.8 / mIoU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_name = {n: [r for r in runs if r["condition"] == n] for n in names}
    by_name = {n: rs for n, rs in by_name.items() if rs}
    curves = {key: {n: mean_curve(rs, key) for n, rs in by_name.items()} for key in CURVES}
    for name, rs in by_name.items():
        g = lambda k: [r[k] for r in rs]
        (s50, flat50), (s_iou, flat_iou) = plateau(curves["acc@0.5"][name]), plateau(curves["miou"][name])
        rows.append(f"| {name} | {len(rs)} | {_ms(g('acc50'))} | {_ms(g('acc80'))} | {_ms(g('miou'))} | "
                    f"{_ms(g('unparseable'), '{:.0f}')} | {_ms(g('tokens'), '{:.1f}')} | {_ms(g('train_s'), '{:.0f}')} | "
                    f"{_ms(g('eval_s'), '{:.0f}')} | {s50} / {s_iou} | {'yes' if flat50 and flat_iou else 'no'} | "
                    + " / ".join(f"{np.mean([r['ceiling'][k] for r in rs]):.3f}" for k in ("acc@0.5", "acc@0.8", "miou"))
                    + " |")
    md = header + "\n" + "\n".join(rows) + "\n"
    md += ("\nceiling: the ground-truth answers as the format carries them, scored like predictions (eval's ceiling): "
           f"what the format's quantisation alone allows. plateau: the first curve point within {FLAT} of the curve's "
           f"best; flat at the end: the last third (at least 3 points) of both curves moves less than {FLAT}.\n")
    for key, label in CURVES.items():
        steps = sorted({s for c in curves[key].values() for s, _ in c})
        md += (f"\nMean {label} along training (step; first {a.curve_n} held-out expressions; the last point is the final "
               "model on them):\n\n| representation | " + " | ".join(f"{s}" for s in steps) + " |\n|---|"
               + "---|" * len(steps) + "\n")
        md += "".join(f"| {n} | " + " | ".join(f"{dict(c)[s]:.3f}" if s in dict(c) else "-" for s in steps) + " |\n"
                      for n, c in curves[key].items())
    md += f"\nLearning curves (mean over seeds): {a.name}_curve.png (Acc@0.5), {a.name}_curve_miou.png (mean IoU)\n"
    write_text_atomic(a.out / f"{a.name}.md", md)
    write_text_atomic(a.out / f"{a.name}.json", json.dumps({"settings": {k: str(v) for k, v in vars(a).items()},
                                                          "runs": runs}, indent=1))
    plot(curves["acc@0.5"], a.out / f"{a.name}_curve.png", "Acc@0.5 (held-out)")
    plot(curves["miou"], a.out / f"{a.name}_curve_miou.png", "mean IoU (held-out)")


def plot(curves: dict, path: Path, label: str, w=720, h=440):
    """A small line plot with PIL (no plotting library in the stack): ``label`` against steps."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 200, 20, h - 50
    steps = [s for c in curves.values() for s, _ in c] or [1]
    xmax = max(steps)
    ymax = max([0.1] + [acc for c in curves.values() for _, acc in c])
    ymax = min(1.0, np.ceil(ymax * 10) / 10)
    X = lambda s: left + (right - left) * s / xmax
    Y = lambda v: bottom - (bottom - top) * v / ymax
    d.rectangle([left, top, right, bottom], outline="black")
    for k in range(6):
        v = ymax * k / 5
        d.line([left - 4, Y(v), left, Y(v)], fill="black")
        d.text((8, Y(v) - 6), f"{v:.2f}", fill="black")
        s = xmax * k / 5
        d.line([X(s), bottom, X(s), bottom + 4], fill="black")
        d.text((X(s) - 12, bottom + 8), f"{s:.0f}", fill="black")
    d.text(((left + right) // 2 - 20, h - 22), "step", fill="black")
    d.text((8, 2), label, fill="black")
    for k, (name, c) in enumerate(curves.items()):
        col = COLORS[k % len(COLORS)]
        pts = [(X(0), Y(0))] + [(X(s), Y(v)) for s, v in c]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        d.line([right + 12, top + 10 + 18 * k, right + 32, top + 10 + 18 * k], fill=col, width=3)
        d.text((right + 38, top + 4 + 18 * k), name, fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


if __name__ == "__main__":
    main()

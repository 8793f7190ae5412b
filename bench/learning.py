"""Does GETok help a model learn to ground? The paper's claim at small scale, measured honestly.

Same tiny LLaVA, same `shapes` data, same steps and seeds; only the location representation changes:

  getok-inline-R1   GETok grid + one offset round (the default), box = <box> g o g o </box>
  getok-grid-R0     GETok grid tokens only
  getok-m5-R1       GETok with a larger offset alphabet (offset_levels = 5, spec section 2)
  text-2dec         LLaVA-1.5 style text coordinates, "[0.12, 0.34, 0.56, 0.78]"
  bins-1d           Pix2Seq / PaliGemma style: 4 tokens from 2n bins per axis (the precision of GETok R1)
  getok-R1-boxloss  GETok inline with the box-token loss (grid 0.5, box 0.5; spec section 7)
  getok-R1-sincos2d GETok inline with sincos2d initialisation of the new rows (instead of mean)
  getok-R1-trainer  both: the defaults of `python -m llava_getok.train` (box-token loss + sincos2d rows)

For each: Acc@0.5, Acc@0.8, mean IoU, parse failures, tokens per answer, wall time per run, as mean ± spread
(standard deviation) over the seeds; a learning curve (Acc@0.5 on held-out scenes against steps) as a PNG.
The recipe (trainable tower with sine-cosine positions, last layer, no clipping, constant lr) comes from
bench/learning_trials.py; see bench/results/learning_trials.md.

    .venv/bin/python bench/learning.py                        # the full configuration (hours on 2 cores)
    .venv/bin/python bench/learning.py --steps 300 --seeds 0,1,2 --n-eval 100   # a reduced one

Writes bench/results/learning.md (table), learning.json (every run), learning_curve.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_trials import Trial, run  # noqa: E402

from llava_getok.atomic import atomic_path, write_text_atomic  # noqa: E402

CONDITIONS = {
    "getok-inline-R1": {},
    "getok-grid-R0": {"rounds": 0},
    "getok-m5-R1": {"offset_levels": 5},
    "text-2dec": {"repr": "text"},
    "bins-1d": {"repr": "bins"},  # bins = 2 * grid, set below
    "getok-R1-boxloss": {"grid_weight": 0.5, "box_weight": 0.5},
    "getok-R1-sincos2d": {"init": "sincos2d"},
    "getok-R1-trainer": {"grid_weight": 0.5, "box_weight": 0.5, "init": "sincos2d"},
}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


def base_trial(a) -> Trial:
    """The shared recipe; only the representation fields change between conditions."""
    return Trial(steps=a.steps, batch=a.batch, lr=a.lr, train_tower=True, select_layer=-1, tower_pos="sincos",
                 clip=0.0, schedule="constant", image_size=a.image_size, patch=a.patch, grid=a.grid, rounds=1,
                 bins=2 * a.grid, n_min=a.objects[0], n_max=a.objects[1], n_eval=a.n_eval, eval_every=a.eval_every,
                 threads=a.threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--objects", default="1-1", help="shapes per image MIN-MAX (1-1: the stage that learns first)")
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=0, help="learning-curve points (default: steps / 6)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="written under the table header (e.g. 'reduced configuration')")
    ap.add_argument("--work", default=os.environ.get("GETOK_TRIALS_WORK", "/tmp/getok_trials"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--merge", nargs="+", type=Path, help="no training: combine the runs of these learning.json "
                    "files (e.g. seeds run in parallel) into one table, curve and json under --out")
    a = ap.parse_args(argv)
    if a.merge:
        return merge(a)
    a.objects = tuple(int(v) for v in a.objects.split("-"))
    a.eval_every = a.eval_every or max(1, a.steps // 6)
    seeds = [int(s) for s in a.seeds.split(",")]
    names = a.conditions.split(",")
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        ap.error(f"unknown condition(s) {unknown}; known: {', '.join(CONDITIONS)}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in names:
        for seed in seeds:
            t = replace(base_trial(a), name=f"{name}/s{seed}", seed=seed, curve=[], **CONDITIONS[name])
            t0 = time.time()
            m = run(t, work, log=None, verbose=False)
            runs.append({"condition": name, "seed": seed, **m, "curve": t.curve, "wall_s": time.time() - t0})
            print(f"{name} seed {seed}: Acc@0.5 {m['acc50']:.3f} Acc@0.8 {m['acc80']:.3f} mIoU {m['miou']:.3f} "
                  f"parse fail {m['parse_fail']:.3f} tokens {m['tokens']:.1f} train {m['train_s']:.0f} s", flush=True)
            write(a, names, seeds, runs)  # after every run, so an interrupted sweep keeps what it measured
    print((a.out / "learning.md").read_text())


def merge(a):
    """Re-render the table from earlier runs; settings come from the first file (they must agree)."""
    runs, names, seeds, settings = [], [], [], None
    for path in a.merge:
        d = json.loads(Path(path).read_text())
        settings = settings or d["settings"]
        runs += d["runs"]
    for r in runs:
        names += [r["condition"]] if r["condition"] not in names else []
        seeds += [r["seed"]] if r["seed"] not in seeds else []
    s = settings
    a.steps, a.batch, a.lr, a.n_eval = int(s["steps"]), int(s["batch"]), float(s["lr"]), int(s["n_eval"])
    a.image_size, a.patch, a.grid, a.threads = int(s["image_size"]), int(s["patch"]), int(s["grid"]), int(s["threads"])
    a.objects = tuple(int(v) for v in s["objects"].strip("()").split(","))
    a.note = a.note or s.get("note", "")
    a.out.mkdir(parents=True, exist_ok=True)
    write(a, names, sorted(seeds), runs)
    print((a.out / "learning.md").read_text())


def _ms(values, fmt="{:.3f}"):
    v = np.asarray(values, dtype=float)
    return (fmt + " ± " + fmt).format(v.mean(), v.std()) if len(v) > 1 else fmt.format(v.mean())


def write(a, names, seeds, runs):
    header = (f"# Location representations on `shapes` (bench/learning.py)\n\n"
              f"Tiny LLaVA (LLaMA 64 x 2, CLIP 32 x 2, {a.image_size} px / {a.patch} px patches, trainable tower with "
              f"sine-cosine positions), {a.steps} steps x batch {a.batch}, lr {a.lr} constant, {a.objects[0]}-{a.objects[1]} "
              f"shapes per image, grid {a.grid}, seeds {','.join(map(str, seeds))}, {a.n_eval} held-out scenes, "
              f"{a.threads} CPU thread(s). Mean ± standard deviation over seeds.\n")
    if a.note:
        header += f"\n**{a.note}**\n"
    rows = ["| representation | seeds | Acc@0.5 | Acc@0.8 | mean IoU | parse failures | tokens / answer | train s / run | eval s | chance (random shape / mean box) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rs = [r for r in runs if r["condition"] == name]
        if not rs:
            continue
        g = lambda k: [r[k] for r in rs]
        rows.append(f"| {name} | {len(rs)} | {_ms(g('acc50'))} | {_ms(g('acc80'))} | {_ms(g('miou'))} | "
                    f"{_ms(g('parse_fail'))} | {_ms(g('tokens'), '{:.1f}')} | {_ms(g('train_s'), '{:.0f}')} | "
                    f"{_ms(g('eval_s'), '{:.1f}')} | {np.mean(g('chance_random_shape')):.3f} / {np.mean(g('chance_mean_box')):.3f} |")
    text_final = [r["acc50"] for r in runs if r["condition"] == "text-2dec"]
    notes = []
    if text_final:
        goal = float(np.mean(text_final))
        for name in names:
            curve = mean_curve([r for r in runs if r["condition"] == name])
            hit = next((s for s, acc in curve if acc >= goal and goal > 0), None)
            notes.append(f"- {name}: first curve point with mean Acc@0.5 >= text-2dec's final {goal:.3f}: "
                         f"{'step ' + str(hit) if hit else 'not reached' if goal > 0 else 'n/a (text final is 0)'}")
    curves = {n: dict(mean_curve([r for r in runs if r["condition"] == n])) for n in names}
    steps = sorted({s for c in curves.values() for s in c})
    curve_rows = ["| representation | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
    curve_rows += [f"| {n} | " + " | ".join(f"{curves[n][s]:.3f}" if s in curves[n] else "-" for s in steps) + " |"
                   for n in names if curves[n]]
    md = header + "\n" + "\n".join(rows) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")
    md += ("\nMean Acc@0.5 along training (intermediate points on the first 200 held-out scenes; wall times "
           "above were measured on a machine shared with other jobs, so compare them only loosely):\n\n"
           + "\n".join(curve_rows) + "\n")
    md += "\nLearning curves (mean Acc@0.5 over seeds): learning_curve.png\n"
    write_text_atomic(a.out / "learning.md", md)
    write_text_atomic(a.out / "learning.json", json.dumps({"settings": {k: str(v) for k, v in vars(a).items()}, "runs": runs}, indent=1))
    plot({n: mean_curve([r for r in runs if r["condition"] == n]) for n in names}, a.out / "learning_curve.png")


def mean_curve(rs):
    """[(step, mean Acc@0.5 over the runs)] on the steps every run has."""
    if not rs:
        return []
    by_step = {}
    for r in rs:
        for step, _, acc, _ in r["curve"]:
            by_step.setdefault(step, []).append(acc)
    return [(s, float(np.mean(v))) for s, v in sorted(by_step.items()) if len(v) == len(rs)]


def plot(curves: dict, path: Path, w=720, h=440):
    """A small line plot with PIL (no plotting library in the stack): Acc@0.5 against steps."""
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
    d.text((8, 2), "Acc@0.5 (held-out)", fill="black")
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

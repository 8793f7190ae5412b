"""``llava-getok demo``: the whole job on a CPU, no GPU, no downloaded weights.

    llava-getok demo [--out runs/demo] [--steps 4000] [--format getok|text|bins] [--quick]

Draws the procedural ``shapes`` referring-expression dataset (``data/``), converts it with ``convert-datasets shapes``
(``train.json``, ``val.json`` and the curriculum's splits), builds a tiny random LLaVA (``tiny-llava/``), fine-tunes
it with ``python -m llava_getok.train`` (``llava-getok-demo/``, a GETok checkpoint), predicts the val split with
grammar-constrained decoding (``predictions.jsonl``), evaluates it (``eval/``), draws ``contact_sheet.png`` and writes
``summary.json``: Acc@0.5 / 0.8 and mIoU, two chance levels that ignore the expression (the box of a random shape of
the image, the mean training box), how often the box is on the named shape, and whether the target is met (Acc@0.5
>= 0.5 and >= 5x the mean-box chance). Exit status 0 when it ran (whether or not the target is met), 2 for
arguments that cannot work together, else the failing stage's status, with one line saying which.

The training recipe (curriculum, schedule, loss settings, tower set-up) is the defaults of the flags below; what
each default measured and what was tried before it are in bench/results/learning_demo.md and learning_trials.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .. import quiet
from ..atomic import write_text_atomic
from ..formats import LocationOptions
from ..options import add_flags
from ..training.settings import ROW_MODES, GETokSettings
from .backends import BACKENDS, build_hf_model, frame, hf_train_args
from .data import FIRST_STAGES, curriculum_file, first_stages, shapes_records, split_annotations
from .model import build_model
from .scoring import (TARGET_ACC, TARGET_FACTOR, chance_levels, learning_curve, predict_args, selection_rate,
                      split_row, tokens_per_answer)
from .training import SCHEDULES, WARMUP_STEPS, log_every, run_training, train_args, train_command


MODEL_NAMES = {"llava": "LLaVA", "qwen2.5-vl": "Qwen2.5-VL", "llava-hf": "llava-hf"}


class DemoError(Exception):
    """A stage cannot go on: its message (one line) and the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-getok demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="working folder (created; reused data is redrawn)")
    p.add_argument("--backend", choices=BACKENDS, default="llava", help="the model family trained: LLaVA 1.2.x, or "
                   "Qwen2.5-VL / llava-hf through trl (llava_getok.hf)")
    p.add_argument("--merge", type=int, default=2, help="--backend qwen2.5-vl: patches merged per side into one image "
                   "token (Qwen2.5-VL's spatial merge)")
    p.add_argument("--rope-theta", type=float, default=10.0, help="--backend qwen2.5-vl: the base of the language "
                   "model's multimodal rotary positions (Qwen2.5-VL's 1e6 leaves a 16-dimension head almost no "
                   "rotation across the image's rows and columns)")
    p.add_argument("--train-images", type=int, default=8000)
    p.add_argument("--val-images", type=int, default=500, help="held-out images, one expression each (500: "
                   "Acc@0.5 within about +-0.02, one standard error)")
    p.add_argument("--objects", default="2-3", help="shapes per training image, MIN-MAX")
    p.add_argument("--val-objects", default="2-3", help="shapes per val image, MIN-MAX")
    p.add_argument("--colour-objects", default="3-4", help="shapes per image of the colour-only records, MIN-MAX: more "
                   "shapes to choose among, and more of them asked about, in each record that teaches the colour words")
    p.add_argument("--colour-turns", type=int, default=4, help="expressions per colour-only image (as many as have a "
                   "colour no other shape of the image has)")
    p.add_argument("--turns", type=int, default=3, help="expressions per training image, one conversation "
                   "(convert-datasets --group-turns, LLaVA-1.5's own REC layout); val images get one each")
    p.add_argument("--layers", type=int, default=3, help="LLaMA layers of the tiny model")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the tiny LLaMA (head size 64 / heads)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8, help="vision tower patch size: (image/patch)^2 image tokens")
    p.add_argument("--vision-width", type=int, default=32, help="width of the random CLIP tower (head size 16)")
    p.add_argument("--position-dims", type=int, default=8, help="dimensions of the vision tower's width that "
                   "hold its 2D sine-cosine patch positions (the rest: patch content alone); 0: all")
    add_flags(p, LocationOptions, dash=True, only=("format", "decimals", "bins", "grid", "rounds"),
              defaults={"grid": 8, "rounds": 1, "bins": 16})  # bins 16 = 2 x grid 8: GETok's precision with one round
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--colour-steps", type=int, default=1600,
                   help="first steps on images of their own whose expressions name the shape by colour alone "
                        "(\"the red shape\"), then the full mix: a curriculum written into the training file and "
                        "trained in file order (--getok_data_order file); 0: the full mix throughout")
    p.add_argument("--single-steps", type=int, default=400,
                   help="first steps, before the colour-only ones, on images of their own that hold one shape: where "
                        "the shape is, learned before which shape is named")
    p.add_argument("--kind-steps", type=int, default=0,
                   help="steps after the colour-only ones on images asked about by kind alone (\"the circle\"), "
                        "before the full mix")
    p.add_argument("--colour-share", type=float, default=0.3,
                   help="share of the mixed stage's records that are colour-only ones again (0-1), so the first "
                        "stage's skill keeps its training signal")
    p.add_argument("--kind-share", type=float, default=0.2,
                   help="share of the mixed stage's records from images of their own asked about by kind alone "
                        "(\"the circle\")")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="warmup_stable_decay", choices=SCHEDULES, help="learning-rate schedule "
                   "(transformers' lr_scheduler_type; every one but constant starts with "
                   f"{WARMUP_STEPS} warm-up steps)")
    p.add_argument("--decay-steps", type=int, default=None, help="--schedule warmup_stable_decay: the last N steps "
                   "decay (cosine) to 0 after a constant learning rate (default: a quarter of --steps)")
    p.add_argument("--sigma", type=float, default=0.0, help="--getok_sigma of the training run: width of the box-token "
                   "loss's soft target, in grid cells (bins: in bins); 0: one-hot, which on these multi-shape scenes "
                   "puts more box corners in the right cell than the trainer's default of 1")
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping (0: none)")
    p.add_argument("--eval-every", type=int, default=0, help="also save a checkpoint every N steps and score it on "
                   "the first --curve-n val records: the learning curve in summary.json (0: none)")
    p.add_argument("--curve-n", type=int, default=200, help="val records scored at each --eval-every checkpoint")
    p.add_argument("--rows", default="auto", choices=ROW_MODES, help="--getok_rows of the training run (factored: "
                   "the grid rows as column + row + cell parts)")
    p.add_argument("--template", default="getok_mistral_instruct", help="conversation template (training and prediction)")
    p.add_argument("--processes", type=int, default=2, help="training processes (data parallel on CPU ranks, torchrun "
                   "over gloo), each with its share of every batch of --batch records and preparing it itself; 2 keeps "
                   "both cores of a small machine busy (bench/results/learning_demo.md)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheet", type=int, default=16, help="samples on the contact sheet")
    p.add_argument("--quick", action="store_true", help="tiny settings that only check the plumbing (~1 min)")
    return p


def checked(a) -> dict:
    """Apply ``--quick``; raise DemoError (status 2) for arguments that cannot work together, before anything is
    drawn. Returns the shapes per image of each split that takes a range."""
    from data_converters import shapes

    if a.quick:
        a.single_steps, a.colour_steps, a.kind_steps = (min(n, 1) for n in first_stages(a).values())
        a.train_images, a.val_images, a.sheet = 32, 4, 4
        a.steps = 1 + sum(first_stages(a).values())
    first = first_stages(a)
    if min(first.values()) < 0 or sum(first.values()) >= a.steps:
        raise DemoError(f"--single-steps, --colour-steps and --kind-steps must be >= 0 and leave steps of the full mix "
                        f"(--steps {a.steps}), got {a.single_steps}, {a.colour_steps} and {a.kind_steps}", 2)
    stable_max = a.steps - WARMUP_STEPS
    if a.decay_steps is not None and (a.schedule != "warmup_stable_decay" or not 0 < a.decay_steps <= stable_max):
        raise DemoError(f"--decay-steps goes with --schedule warmup_stable_decay and must be between 1 and --steps - "
                        f"{WARMUP_STEPS} warm-up steps ({stable_max}), got {a.decay_steps} with --schedule "
                        f"{a.schedule}", 2)
    try:  # the training run's own checks, before minutes of drawing: the demo's flags are its flags without getok_
        GETokSettings(grid=a.grid, rounds=a.rounds, sigma=a.sigma, rows=a.rows)
        objects = {"train": shapes.parse_range(a.objects), "val": shapes.parse_range(a.val_objects),
                   "colour": shapes.parse_range(a.colour_objects), "single": (1, 1)}
    except ValueError as e:
        raise DemoError(str(e).replace("--getok_", "--"), 2) from None
    if a.processes < 1 or a.batch % a.processes:
        raise DemoError(f"--processes must be >= 1 and divide --batch {a.batch}, got {a.processes}", 2)
    if min(a.turns, a.colour_turns) < 1:
        raise DemoError(f"--turns and --colour-turns must be >= 1, got {a.turns} and {a.colour_turns}", 2)
    if min(a.colour_share, a.kind_share) < 0 or a.colour_share + a.kind_share > 1:
        raise DemoError(f"--colour-share and --kind-share must be >= 0 and sum to at most 1, got {a.colour_share} and "
                        f"{a.kind_share}", 2)
    return objects


class Stages:
    """Numbered stage headers with elapsed time, so a user sees where the minutes go."""

    def __init__(self, total: int):
        self.total, self.n, self.t0, self.times = total, 0, time.time(), {}
        self._name, self._start = None, None

    def start(self, name: str):
        self.end()
        self.n += 1
        self._name, self._start = name, time.time()
        print(f"\n[demo {self.n}/{self.total}] {name}  (t = {time.time() - self.t0:.0f} s)", flush=True)

    def end(self):
        if self._name:
            self.times[self._name] = round(time.time() - self._start, 1)
            self._name = None


def draw(a, out: Path, objects: dict) -> tuple[Path, dict, dict]:
    """Draw the shapes dataset into ``out/data``: (data folder, images per split, expressions per image of each)."""
    from data_converters import shapes

    first = first_stages(a)
    n_mixed = (a.steps - sum(first.values())) * a.batch
    splits, refs = {"train": a.train_images, "val": a.val_images}, {"train": a.turns, "val": 1}
    extra = {"single": first["single"] * a.batch, "colour": first["colour"] * a.batch or round(a.colour_share * n_mixed),
             "kind": first["kind"] * a.batch or round(a.kind_share * n_mixed)}
    for split, n in extra.items():  # one image per record of a stage, so no image is seen twice in it
        if n:
            splits[split], refs[split] = n, a.colour_turns if split == "colour" else a.turns
    data = out / "data"
    shapes.generate(data, splits, seed=a.seed, image_size=a.image_size,
                    n_objects={split: objects.get(split, objects["train"]) for split in splits}, refs_per_image=refs,
                    progress=True, attributes={"colour": ("color",), "kind": ("kind",)}, workers=os.cpu_count() or 1)
    return data, splits, refs


def convert(a, data: Path, out: Path, splits: dict, refs: dict, records: dict) -> tuple[dict[str, Path], Path]:
    """``convert-datasets shapes`` for each split (``records``: the annotations by split, :func:`shapes_records`), then
    the curriculum: ({split: converted file}, training file)."""
    from data_converters.cli import main as convert_datasets

    conv, inputs = {}, split_annotations(data, records)
    for split in splits:
        conv[split] = out / f"{split}.json"
        rc = convert_datasets([
            "shapes", "--input", str(inputs[split]), "--image-root", str(data), "--output", str(conv[split]),
            "--split", split, "--grid", str(a.grid), "--rounds", str(a.rounds), "--seed", str(a.seed),
            "--frame", frame(a.backend),
            "--format", a.format, "--bins", str(a.bins), "--decimals", str(a.decimals),
            "--group-turns", str(refs[split]), "--no-resume", "--workers", str(os.cpu_count() or 1)])
        if rc:
            raise DemoError(f"convert-datasets failed for {split} (exit {rc})", rc)
    print(f"example answer: {json.loads(conv['val'].read_text())[0]['conversations'][1]['value']}")
    first = {split: n for split, n in first_stages(a).items() if n}
    if set(splits) == {"train", "val"}:
        return conv, conv["train"]
    n_mixed = (a.steps - sum(first.values())) * a.batch
    shares = {"colour": a.colour_share, "kind": a.kind_share}
    mixed = {conv[k]: v for k, v in shares.items() if v} | {conv["train"]: 1 - sum(shares.values())}
    stages = [(n * a.batch, {conv[split]: 1.0}) for split, n in first.items()]
    try:
        train_file = curriculum_file(out / "train_curriculum.json", [*stages, (n_mixed, mixed)], a.seed)
    except ValueError as e:  # the converter rejected records (its rejects file says which and why)
        raise DemoError(str(e)) from None
    words = [f"{n} steps {FIRST_STAGES[split]}" for split, n in first.items()]
    mix = f"{n_mixed // a.batch} steps of the full mix"
    print(f"curriculum: {', '.join([*words, 'then ' + mix] if words else [mix])} "
          f"({a.colour_share:.0%} colour-only, {a.kind_share:.0%} kind-only) -> {train_file.name}")
    return conv, train_file


def train(a, model_dir: Path, train_file: Path, data: Path, ckpt: Path, file_order: bool) -> None:
    """``python -m llava_getok.train`` as a child process, its progress as a bar."""
    shutil.rmtree(ckpt, ignore_errors=True)  # LLaVA's train() would resume from an earlier run's checkpoint-* there
    args = (train_args(model_dir, train_file, data, ckpt, a, file_order=file_order) if a.backend == "llava" else
            hf_train_args(model_dir, train_file, data, ckpt, a, file_order))  # the transformers-native backends
    cmd = train_command(args, a.processes, "llava_getok.train" if a.backend == "llava" else "llava_getok.hf.train")
    print("$ " + " ".join(cmd), flush=True)
    rc = run_training(cmd, {**os.environ, "OMP_NUM_THREADS": str(a.threads)}, a.steps, log_every(a.steps))
    if rc:
        raise DemoError(f"training failed (exit {rc})", rc)


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        objects = checked(a)
        return run(a, objects)
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return e.status


def run(a, objects: dict) -> int:
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    quiet.install()  # messages that tell a CPU user nothing (llava_getok/quiet.py), before the libraries load
    st = Stages(8 if a.eval_every else 7)

    st.start(f"drawing the shapes dataset: {a.train_images} train ({a.objects} shapes) + {a.val_images} val "
             f"({a.val_objects} shapes) images of {a.image_size} px")
    data, splits, refs = draw(a, out, objects)

    st.start(f"convert-datasets shapes --format {a.format} -> LLaVA conversations")
    records = shapes_records(data)
    conv, train_file = convert(a, data, out, splits, refs, records)

    st.start(f"building a tiny random {MODEL_NAMES[a.backend]} (no weights downloaded)")
    model_dir = build_model(out, a) if a.backend == "llava" else build_hf_model(out, a)

    entry = "llava_getok.train" if a.backend == "llava" else "llava_getok.hf.train"
    st.start(f"fine-tuning with python -m {entry}: {a.steps} steps x batch {a.batch}, {a.processes} "
             f"process(es) x {a.threads} thread(s)")
    ckpt = out / "llava-getok-demo"
    train(a, model_dir, train_file, data, ckpt, file_order=train_file != conv["train"])

    st.start("predicting the val split with constrained decoding")
    from ..eval.cli import evaluate
    from ..predict import main as predict
    from ..viz import main as show

    preds = out / "predictions.jsonl"
    rc = predict(predict_args(ckpt, conv["val"], data, preds, a))
    if rc:
        raise DemoError(f"prediction failed (exit {rc})", rc)

    st.start("evaluating")
    result = evaluate(preds, conv["val"], data, out, False, True, None)
    print(result["markdown"], end="")
    chance = chance_levels(records)
    selection = selection_rate(preds, records["val"])
    answer_tokens = tokens_per_answer(ckpt, conv["val"])
    curve = []
    if a.eval_every:
        st.start(f"scoring the checkpoints saved every {a.eval_every} steps on {a.curve_n} val expressions")
        curve = learning_curve(ckpt, conv["val"], data, out, a)

    st.start("drawing the contact sheet")
    sheet = out / "contact_sheet.png"
    show(["--annotations", str(conv["val"]), "--image-root", str(data), "--output", str(sheet),
          "--limit", str(a.sheet), "--no-masks", "--predictions", str(preds)])
    st.end()

    summary = report(result["metrics"]["rec"], chance, st, a, sheet, selection) | {
        "curve": curve, "tokens_per_answer": answer_tokens, "ceiling": split_row(result["ceiling"]["rec"])}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if a.backend == "llava":
        from ..web import web_command  # the one command that opens this model in the web demo

        print(f"talk to the model, see its boxes: {web_command(ckpt, data / 'images' / 'val')}")
    return 0


def report(metrics, chance, st: Stages, a, sheet: Path, selection: dict) -> dict:
    """Print the summary block; return what OUT/summary.json holds."""
    total = time.time() - st.t0
    row = split_row(metrics)
    acc = row["acc@0.5"]
    best_chance = max(chance["random_shape"], chance["mean_box"])
    ok = acc >= TARGET_ACC and acc >= TARGET_FACTOR * chance["mean_box"]
    print("\n" + "=" * 72)
    print(f"llava-getok demo: tiny random {MODEL_NAMES[a.backend]}, {a.steps} steps on {a.train_images} shapes images, "
          f"{total / 60:.1f} min")
    print(f"Acc@0.5 {acc:.3f}   Acc@0.8 {row['acc@0.8']:.3f}   mIoU {row['miou']:.3f}   (n = {row['n']})")
    print(f"chance: box of a random shape of the image {chance['random_shape']:.3f}, mean training box "
          f"{chance['mean_box']:.3f}; Acc@0.5 = {acc / max(best_chance, 1e-9):.1f}x the better of the two")
    print(f"the box is on the named shape (best overlap) for {selection['all']:.3f} of the expressions "
          f"(a random shape: {chance['random_shape_pick']:.3f}); by what the expression names: "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(selection.items()) if k != "all"))
    print(f"target (Acc@0.5 >= {TARGET_ACC} and >= {TARGET_FACTOR:g}x the mean-box chance): {'met' if ok else 'NOT met'}")
    print(f"contact sheet: {sheet}")
    print("stage times (s): " + ", ".join(f"{k.split(':')[0]} {v}" for k, v in st.times.items()))
    print("=" * 72)
    return {"acc@0.5": acc, "metrics": row, "chance": chance, "selection": selection["all"],
            "selection_by_type": selection, "verdict": "grounds" if ok else "below target",
            "seconds": round(total, 1), "stage_seconds": st.times, "settings": {k: str(v) for k, v in vars(a).items()}}

"""``llava-getok demo``: the whole job on a laptop CPU, no GPU, no downloaded weights.

    llava-getok demo [--out runs/demo] [--steps 4000] [--quick]

1. draw the procedural ``shapes`` dataset (PNG images + annotations.jsonl),
2. ``convert-datasets shapes`` -> LLaVA conversations with GETok locations (``--format text|bins``: LLaVA-1.5's text
   coordinates or 1D bin tokens; train: every shape of an image asked about in one conversation, ``--group-turns``;
   val: one expression per image),
3. build a tiny random LLaVA (LLaMA 64 x 3 layers, CLIP tower 64 px / 8 px patches),
4. fine-tune it with ``python -m llava_getok.train`` (LLaVA's own train() with the GETok hooks),
5. predict on the held-out split with constrained decoding, 6. evaluate (Acc@0.5 / 0.8, mIoU),
7. draw a contact sheet of predictions (and ground truth) -> OUT/contact_sheet.png.

It prints Acc@0.5 next to two chance levels computed on the same split (the box of a random shape of the
image, and the mean training box), how often the box lands on the named shape, and whether the target is met
(Acc@0.5 >= 0.5 and >= 5x the mean-box chance); OUT/summary.json holds the same numbers. Training shows as a
progress bar with the loss and the time left. The recipe: a trainable vision tower (``--unfreeze_mm_vision_tower``;
LLaVA freezes it and runs it under no_grad) with 2D sine-cosine patch positions in a quarter of its dimensions (the
rest left to patch content), the tower's last layer, no gradient clipping, a constant learning rate decayed over the
last quarter (warmup_stable_decay), ``getok_mistral_instruct`` (no system prompt), the box-token loss with one-hot
grid targets (``--sigma 0``; the trainer's default is a Gaussian one cell wide), sincos2d rows, shapes that span
several patches, 2-3 shapes per training image with all their expressions in one conversation, 3 LM layers, and a
curriculum written in order into the training file and trained
in file order (``--getok_data_order file``): ``--single-steps`` on one-shape images (where, before which), then
``--colour-steps`` on other images of 3-4 shapes, each shape of its own colour asked about by colour alone, then
the full mix with colour-only and kind-only records again, so that neither skill is lost. What each choice gave,
and what the defaults measure (accuracy over seeds, wall time), is in bench/results/learning_trials.md and
bench/results/learning_demo.md.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import quiet
from .atomic import write_text_atomic

WARMUP_STEPS = 50  # linear warm-up before every schedule but constant
TARGET_ACC, TARGET_FACTOR = 0.5, 5.0  # what "it grounds" means here: Acc@0.5 and its ratio to the mean-box chance


# the stages before the full mix, in training order: the split their images are drawn into -> what they hold
FIRST_STAGES = {"single": "on one-shape images", "colour": "of colour-only expressions", "kind": "of kind-only ones"}


# transformers' lr_scheduler_type values that need nothing but the step counts (warmup_stable_decay: --decay-steps)
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
             "inverse_sqrt", "warmup_stable_decay")


def first_stages(a) -> dict[str, int]:
    """Steps of each of the :data:`FIRST_STAGES`, in training order."""
    return {"single": a.single_steps, "colour": a.colour_steps, "kind": a.kind_steps}


def _parser():
    p = argparse.ArgumentParser(prog="llava-getok demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="working folder (created; reused data is redrawn)")
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
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1)
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
                   "loss's soft target, in grid cells (bins: in bins); 0: one-hot, which on these multi-shape scenes puts more "
                   "box corners in the right cell than the trainer's default of 1 (bench/results/learning_trials.md)")
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping (0: none)")
    p.add_argument("--format", choices=("getok", "text", "bins"), default="getok",
                   help="location format of the answers (convert-datasets --format): GETok tokens, LLaVA-1.5's text "
                   "coordinates, or 1D bin tokens <loc_k>")
    p.add_argument("--bins", type=int, default=16, help="--format bins: bins per axis (16 = 2 x grid 8: the "
                   "precision of GETok with one offset round)")
    p.add_argument("--decimals", type=int, default=2, help="--format text: decimals per coordinate")
    p.add_argument("--eval-every", type=int, default=0, help="also save a checkpoint every N steps and score it on "
                   "the first --curve-n val records: the learning curve in summary.json (0: none)")
    p.add_argument("--curve-n", type=int, default=200, help="val records scored at each --eval-every checkpoint")
    p.add_argument("--rows", default="auto", help="--getok_rows of the training run (auto; factored: the grid rows "
                                                  "as column + row + cell parts)")
    p.add_argument("--template", default="getok_mistral_instruct", help="conversation template (training and prediction)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest for this tiny model, and 2 threads on a busy 2-core machine "
                        "were 10x slower in our measurements (OpenMP threads waiting on each other)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheet", type=int, default=16, help="samples on the contact sheet")
    p.add_argument("--quick", action="store_true", help="tiny settings that only check the plumbing (~1 min)")
    return p


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


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.quick:
        a.single_steps, a.colour_steps, a.kind_steps = (min(n, 1) for n in first_stages(a).values())
        a.train_images, a.val_images, a.sheet = 32, 4, 4
        a.steps = 1 + sum(first_stages(a).values())
    first = first_stages(a)
    staged = sum(first.values())
    if min(first.values()) < 0 or staged >= a.steps:
        print(f"demo: --single-steps, --colour-steps and --kind-steps must be >= 0 and leave steps of the full mix "
              f"(--steps {a.steps}), got {a.single_steps}, {a.colour_steps} and {a.kind_steps}", file=sys.stderr)
        return 2
    stable_max = a.steps - WARMUP_STEPS
    if a.decay_steps is not None and (a.schedule != "warmup_stable_decay" or not 0 < a.decay_steps <= stable_max):
        print(f"demo: --decay-steps goes with --schedule warmup_stable_decay and must be between 1 and --steps - "
              f"{WARMUP_STEPS} warm-up steps ({stable_max}), got {a.decay_steps} with --schedule {a.schedule}", file=sys.stderr)
        return 2
    from data_converters import shapes

    try:
        n_objects = {"train": shapes.parse_range(a.objects), "val": shapes.parse_range(a.val_objects)}
        colour_objects = shapes.parse_range(a.colour_objects)
    except ValueError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    if a.sigma < 0:
        print(f"demo: --sigma must be >= 0 (0: one-hot), got {a.sigma}", file=sys.stderr)
        return 2
    if min(a.turns, a.colour_turns) < 1:
        print(f"demo: --turns and --colour-turns must be >= 1, got {a.turns} and {a.colour_turns}", file=sys.stderr)
        return 2
    if min(a.colour_share, a.kind_share) < 0 or a.colour_share + a.kind_share > 1:
        print(f"demo: --colour-share and --kind-share must be >= 0 and sum to at most 1, got {a.colour_share} and "
              f"{a.kind_share}", file=sys.stderr)
        return 2
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
    data = out / "data"
    splits, refs = {"train": a.train_images, "val": a.val_images}, {"train": a.turns, "val": 1}
    n_mixed = (a.steps - staged) * a.batch
    extra = {"single": a.single_steps * a.batch, "colour": a.colour_steps * a.batch or round(a.colour_share * n_mixed),
             "kind": a.kind_steps * a.batch or round(a.kind_share * n_mixed)}
    for split, n in extra.items():  # one image per record of a stage, so no image is seen twice in it
        if n:
            splits[split], refs[split] = n, a.colour_turns if split == "colour" else a.turns
            n_objects[split] = {"single": (1, 1), "colour": colour_objects}.get(split, n_objects["train"])
    shapes.generate(data, splits, seed=a.seed, image_size=a.image_size, n_objects=n_objects, refs_per_image=refs,
                    progress=True, attributes={"colour": ("color",), "kind": ("kind",)}, workers=os.cpu_count() or 1)

    st.start(f"convert-datasets shapes --format {a.format} -> LLaVA conversations")
    from data_converters.cli import main as convert

    records = shapes_records(data)
    conv, inputs = {}, split_annotations(data, records)
    for split in splits:
        conv[split] = out / f"{split}.json"
        rc = convert(["shapes", "--input", str(inputs[split]), "--image-root", str(data), "--output", str(conv[split]),
                      "--split", split, "--grid", str(a.grid), "--rounds", str(a.rounds), "--seed", str(a.seed),
                      "--format", a.format, "--bins", str(a.bins), "--decimals", str(a.decimals),
                      "--group-turns", str(refs[split]), "--no-resume",
                      "--workers", str(os.cpu_count() or 1)])
        if rc:
            print(f"demo: convert-datasets failed for {split} (exit {rc})", file=sys.stderr)
            return rc
    train_file = conv["train"]
    if any(extra.values()):
        mixed = {"colour": a.colour_share, "kind": a.kind_share}
        mixed = {conv[k]: v for k, v in mixed.items() if v} | {conv["train"]: 1 - sum(mixed.values())}
        stages = [(n * a.batch, {conv[split]: 1.0}) for split, n in first.items() if n]
        try:
            train_file = curriculum_file(out / "train_curriculum.json", [*stages, (n_mixed, mixed)], a.seed)
        except ValueError as e:  # the converter rejected records (its rejects file says which and why)
            print(f"demo: {e}", file=sys.stderr)
            return 1
        words = [f"{n} steps {FIRST_STAGES[split]}" for split, n in first.items() if n]
        mix = f"{n_mixed // a.batch} steps of the full mix"
        print(f"curriculum: {', '.join([*words, 'then ' + mix] if words else [mix])} "
              f"({a.colour_share:.0%} colour-only, {a.kind_share:.0%} kind-only) -> {train_file.name}")
    print(f"example answer: {json.loads(conv['val'].read_text())[0]['conversations'][1]['value']}")

    st.start("building a tiny random LLaVA (no weights downloaded)")
    model_dir = build_model(out, a)

    st.start(f"fine-tuning with python -m llava_getok.train: {a.steps} steps x batch {a.batch}, {a.threads} thread(s)")
    ckpt = out / "llava-getok-demo"
    shutil.rmtree(ckpt, ignore_errors=True)  # LLaVA's train() would resume from an earlier run's checkpoint-* there
    cmd = [sys.executable, "-m", "llava_getok.train",
           *train_args(model_dir, train_file, data, ckpt, a, file_order=train_file != conv["train"])]
    print("$ " + " ".join(cmd), flush=True)
    rc = run_training(cmd, {**os.environ, "OMP_NUM_THREADS": str(a.threads)}, a.steps, log_every(a.steps))
    if rc:
        print(f"demo: training failed (exit {rc})", file=sys.stderr)
        return rc

    st.start("predicting the val split with constrained decoding")
    from .eval.cli import evaluate
    from .predict import main as predict
    from .viz import main as show

    preds = out / "predictions.jsonl"
    rc = predict(predict_args(ckpt, conv["val"], data, preds, a))
    if rc:
        print(f"demo: prediction failed (exit {rc})", file=sys.stderr)
        return rc

    st.start("evaluating")
    result = evaluate(preds, conv["val"], data, out, False, True, None)
    print(result["markdown"], end="")
    metrics = result["metrics"]["rec"]
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

    summary = report(metrics, chance, st, a, sheet, selection) | {
        "curve": curve, "tokens_per_answer": answer_tokens, "ceiling": split_row(result["ceiling"]["rec"])}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return 0


def build_model(out: Path, a) -> Path:
    """The tiny LLaVA, with 2D sine-cosine position embeddings in its (random) CLIP tower."""
    import torch
    from transformers import CLIPVisionModel

    from .llava.tiny import TinyLlavaConfig, build_tiny_llava, train_tokenizer

    torch.set_num_threads(a.threads)
    tok = train_tokenizer(out / "tokenizer", seed=a.seed)
    cfg = TinyLlavaConfig(image_size=a.image_size, patch_size=a.patch, num_layers=a.layers, num_heads=a.heads,
                          mm_vision_select_layer=-1,
                          vision_hidden_size=a.vision_width, vision_heads=max(1, a.vision_width // 16), seed=a.seed)
    model_dir = build_tiny_llava(out / "tiny-llava", tok, cfg)
    tower_dir = model_dir / "vision_tower"
    tower = CLIPVisionModel.from_pretrained(tower_dir)
    set_sincos_positions(tower, dims=a.position_dims or None)
    tower.save_pretrained(tower_dir, safe_serialization=True)
    return model_dir


def set_sincos_positions(clip_vision_model, scale: float = 1.0, dims: int | None = None) -> None:
    """Overwrite a CLIP tower's patch position embeddings with 2D sine-cosine codes in their first ``dims``
    dimensions (None: all; the rest zero) and zeros at the CLS position.

    Random CLIP position embeddings (std 0.02) are ~14x weaker than the patch content and a random tower
    does not learn to use them within minutes. A code in every dimension, though, is what the tower's
    features then hold most of: leaving half the dimensions to the patch content alone keeps colour and kind
    readable and more expressions get the right shape (bench/results/learning_trials.md)."""
    import torch

    pe = clip_vision_model.vision_model.embeddings.position_embedding.weight
    side = int(round((pe.shape[0] - 1) ** 0.5))
    dim = pe.shape[1]
    q = (dim if dims is None else dims) // 4
    freq = 1.0 / (100.0 ** (np.arange(q) / q))
    j, i = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    i, j = i.reshape(-1, 1) * freq, j.reshape(-1, 1) * freq
    code = np.concatenate([np.sin(i), np.cos(i), np.sin(j), np.cos(j)], 1)
    code = np.pad(code, ((0, 0), (0, dim - code.shape[1])))
    with torch.no_grad():
        pe[1:] = torch.as_tensor(code, dtype=pe.dtype) * scale
        pe[0] = 0


def log_every(steps: int) -> int:
    """Training steps between two logged losses: 50, or a tenth of a short run."""
    return max(1, min(50, steps // 10))


def run_training(cmd: list[str], env: dict, steps: int, every: int) -> int:
    """Run the training command and return its exit status. Its logged losses (the Trainer's ``{'loss': ...}``
    lines, one every ``every`` steps) drive a progress bar with the loss and the time left; every other line
    is passed on, except the known noise of :mod:`llava_getok.quiet`."""
    from tqdm import tqdm

    env = {**env, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": quiet.python_warnings_option()}
    lines = quiet.LineFilter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            tqdm(total=steps, desc="training", unit="step", dynamic_ncols=True) as bar:
        for line in proc.stdout:
            logs = trainer_log(line)
            if logs is None:
                if lines.keep(line):
                    bar.write(line.rstrip("\n"))
            elif "loss" in logs:
                bar.update(min(every, steps - bar.n))
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
            elif "train_runtime" in logs:
                bar.update(steps - bar.n)
    return proc.returncode


def trainer_log(line: str) -> dict | None:
    """The dict of a Trainer log line (``{'loss': 9.33, 'learning_rate': ..., 'epoch': 0.5}``), else None."""
    if not (line.startswith("{'") and line.rstrip().endswith("}")):
        return None
    try:
        logs = ast.literal_eval(line.strip())
    except (ValueError, SyntaxError):
        return None
    return logs if isinstance(logs, dict) else None


def train_args(model_dir: Path, data_json: Path, image_root: Path, ckpt: Path, a,
               file_order: bool = False) -> list[str]:
    """``python -m llava_getok.train`` arguments; ``file_order``: ``data_json`` is a curriculum, trained in order."""
    return [
        "--model_name_or_path", str(model_dir), "--version", a.template,
        "--data_path", str(data_json), "--image_folder", str(image_root),
        "--vision_tower", str(model_dir / "vision_tower"), "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-1", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--unfreeze_mm_vision_tower", "True",
        "--getok_grid", str(a.grid), "--getok_rounds", str(a.rounds), "--getok_rows", a.rows, "--getok_sigma", str(a.sigma),
        "--output_dir", str(ckpt), "--max_steps", str(a.steps), "--per_device_train_batch_size", str(a.batch),
        "--learning_rate", str(a.lr), "--lr_scheduler_type", a.schedule, "--warmup_steps", str(WARMUP_STEPS),
        *(["--lr_scheduler_kwargs", json.dumps({"num_decay_steps": a.decay_steps or a.steps // 4})]
          if a.schedule == "warmup_stable_decay" else []),
        "--max_grad_norm", str(a.max_grad_norm), "--weight_decay", "0",
        *(["--save_strategy", "steps", "--save_steps", str(a.eval_every), "--save_only_model", "True"]
          if a.eval_every else ["--save_strategy", "no"]), "--logging_steps", str(log_every(a.steps)), "--report_to", "none",
        "--disable_tqdm", "True",  # the demo shows its own bar from the logged losses (run_training)
        # one worker prepares batches (LLaVA's image processing and tokenisation, ~12 % of a step) on the
        # second core while the main process trains on one thread
        "--model_max_length", "256", "--dataloader_num_workers", "1" if a.threads == 1 else "0", "--seed", str(a.seed),
        "--use_cpu", "True", "--group_by_modality_length", "False",
        # LLaVA's preprocessing check on 1000 records spread over the file (all 28,000 distinct ones: ~2.5 min
        # of the slow tokenizer, for records that one converter wrote alike)
        "--getok_check_data", "1000",
        *(["--getok_data_order", "file"] if file_order else []),
    ]


def predict_args(model: Path, data_json: Path, image_root: Path, preds: Path, a, limit: int | None = None) -> list[str]:
    """``llava-getok predict`` arguments: constrained decoding for GETok and bins (text answers are free), room for
    the longest answer of the format (a text box is ~24 tokens of the demo's tokenizer, a GETok or bins box <= 10)."""
    return ["--model-path", str(model), "--data", str(data_json), "--image-root", str(image_root),
            "--output", str(preds), "--constrained", "--shape-only", "--batch-size", "32", "--conv-mode", a.template,
            "--max-new-tokens", "40" if a.format == "text" else "16", "--device", "cpu",
            *(["--limit", str(limit)] if limit else [])]


def learning_curve(ckpt: Path, val_json: Path, image_root: Path, out: Path, a) -> list[dict]:
    """Acc@0.5, Acc@0.8 and mIoU of every ``checkpoint-N`` the training run saved (``--eval-every``), on the
    first ``--curve-n`` val records, in step order; the last point is the final model on the same records."""
    from .eval.cli import evaluate
    from .predict import main as predict

    points = sorted((int(d.name.split("-")[1]), d) for d in ckpt.glob("checkpoint-*") if d.is_dir())
    curve = []
    for step, model in [*points, (a.steps, ckpt)]:
        if curve and curve[-1]["step"] == step:
            continue
        preds = out / "curve" / f"step-{step}.jsonl"
        if predict(predict_args(model, val_json, image_root, preds, a, limit=a.curve_n)):
            raise SystemExit(f"demo: prediction of {model} failed")  # predict printed why
        row = split_row(evaluate(preds, val_json, image_root, None, True, False, None)["metrics"]["rec"])
        curve.append({"step": step, "acc@0.5": row["acc@0.5"], "acc@0.8": row["acc@0.8"], "miou": row["miou"],
                      "n": row["n"]})
        print(f"curve: step {step}: Acc@0.5 {row['acc@0.5']:.3f} (n = {row['n']})", flush=True)
    return curve


def tokens_per_answer(ckpt: Path, val_json: Path) -> float:
    """Mean number of tokens of the val answers, with the trained tokenizer (its GETok / bin tokens added)."""
    from transformers import AutoTokenizer

    from .llava.sidecar import read_sidecar
    from .llava.tokens import location_tokens_as_content

    tok = AutoTokenizer.from_pretrained(ckpt, use_fast=False)
    location_tokens_as_content(tok, read_sidecar(ckpt).location_format)  # as the builder loads it
    answers = [r["conversations"][1]["value"] for r in json.loads(val_json.read_text())]
    return float(np.mean([len(tok(t, add_special_tokens=False).input_ids) for t in answers]))


def curriculum_file(out: Path, stages: list[tuple[int, dict[Path, float]]], seed: int) -> Path:
    """One training file in the order it is trained (``--getok_data_order file``): for each stage
    ``(n, {source: share})``, ``n`` records drawn from its sources by share, shuffled together. Each source is
    read in shuffled passes that go on from stage to stage, so every record comes once a pass (a file read in
    order needs its epochs written out); a first stage must not need a record twice. Deterministic in
    ``seed``; written atomically."""
    rng = np.random.default_rng(seed)
    records = {path: json.loads(Path(path).read_text()) for _, shares in stages for path in shares}
    queues: dict[Path, list] = {path: [] for path in records}
    order: list = []
    for k, (n, shares) in enumerate(stages):
        if min(shares.values()) < 0 or not np.isclose(sum(shares.values()), 1):
            raise ValueError(f"curriculum: the shares of stage {k + 1} must be >= 0 and sum to 1, got "
                             + ", ".join(f"{Path(p).name} {v}" for p, v in shares.items()))
        counts = [round(n * v) for v in shares.values()]
        counts[-1] = n - sum(counts[:-1])
        stage: list = []
        for path, c in zip(shares, counts):
            have = len(records[path])
            if not have or (k == 0 and c > have):
                raise ValueError(f"curriculum: {path} has {have} records (needs {c})")
            q = queues[path]
            while len(q) < c:
                q += [records[path][i] for i in rng.permutation(have)]
            stage += q[:c]
            del q[:c]
        order += stage if len(shares) == 1 else [stage[i] for i in rng.permutation(len(stage))]
    write_text_atomic(out, json.dumps(order))
    return out


def split_annotations(data: Path, records: dict[str, list[dict]]) -> dict[str, Path]:
    """The shapes dataset's annotation lines (``records``, :func:`shapes_records`), one file per split beside its own
    (``annotations.{split}.jsonl``, written as ``shapes.generate`` writes them), so each split's conversion reads its
    records alone: from the one file, every conversion read all ~86,000 lines of the five splits and wrote a skip
    reason for each line of another split."""
    paths = {split: data / f"annotations.{split}.jsonl" for split in records}
    for split, path in paths.items():
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records[split]))
    return paths


def shapes_records(data: Path) -> dict[str, list[dict]]:
    """The shapes dataset's annotation lines, by split."""
    from data_converters.shapes import ANNOTATIONS

    by_split: dict[str, list[dict]] = {}
    with open(data / ANNOTATIONS) as f:
        for line in f:
            r = json.loads(line)
            by_split.setdefault(r["split"], []).append(r)
    return by_split


def chance_levels(records: dict[str, list[dict]]) -> dict:
    """Acc@0.5 of two answers that ignore the expression, on the val split: the box of a random shape of the
    image (expected value) and the mean box of the training targets; and how often a random shape is the
    named one (``random_shape_pick``, the chance level of :func:`selection_rate`)."""
    from .geometry import box_iou

    mean_box = np.mean([np.asarray(r["box"], float) / r["width"] for r in records["train"]], 0)
    rand, mean = [], []
    for r in records["val"]:
        gt = np.asarray(r["box"], float)
        scene = np.asarray(r["scene_boxes"], float)
        rand.append(np.mean(np.asarray(box_iou(scene, gt[None])).reshape(-1) >= 0.5))
        mean.append(float(np.asarray(box_iou(mean_box[None] * r["width"], gt[None])).reshape(-1)[0] >= 0.5))
    return {"random_shape": float(np.mean(rand)), "mean_box": float(np.mean(mean)),
            "random_shape_pick": float(np.mean([1 / len(r["scene_boxes"]) for r in records["val"]]))}


def selection_rate(predictions: Path, val: list[dict]) -> dict[str, float]:
    """Share of val expressions whose predicted box overlaps the named shape more than any other shape of the
    image: whether the model picks the right shape, apart from how precisely it boxes it. {"all": share, and
    one share per expression type (``shapes.expression_type``: "color", "kind", "relation", ...)}."""
    from data_converters.shapes import expression_type

    scenes = {r["id"]: (r, expression_type(r["expression"])) for r in val}
    hits: dict[str, list[bool]] = {"all": []}
    with open(predictions) as f:
        for line in f:
            p = json.loads(line)
            record, kind = scenes[p["id"].rsplit("-", 1)[0]]
            box = predicted_box(p)
            hit = box is not None and on_named_shape(box, record)
            hits["all"].append(hit)
            hits.setdefault(kind, []).append(hit)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}


def predicted_box(prediction: dict) -> np.ndarray | None:
    """[x1, y1, x2, y2] (pixels) of the first box of a ``llava-getok predict`` line, None when it has none."""
    shape = next((s for s in prediction["shapes"] if s["kind"] == "box"), None)
    return None if shape is None else np.asarray([*shape["points"][0], *shape["points"][1]], float)


def on_named_shape(box: np.ndarray, record: dict) -> bool:
    """Whether ``box`` overlaps the shape a shapes annotation ``record`` names (its ``box``) more than any other shape
    of its image (``scene_boxes``): the right shape picked, however precisely it is boxed."""
    from .geometry import box_iou

    scene = np.asarray(record["scene_boxes"], float)
    target = [list(b) for b in record["scene_boxes"]].index(list(record["box"]))
    return int(np.argmax(np.asarray(box_iou(scene, box[None])).reshape(-1))) == target


def split_row(metrics: dict) -> dict:
    """The val split's row of eval's REC metrics (the one split there is; "all" when eval names none)."""
    return next((v for k, v in metrics.items() if k != "all"), None) or metrics["all"]


def report(metrics, chance, st: Stages, a, sheet: Path, selection: dict) -> dict:
    """Print the summary block; return what OUT/summary.json holds."""
    total = time.time() - st.t0
    row = split_row(metrics)
    acc = row["acc@0.5"]
    best_chance = max(chance["random_shape"], chance["mean_box"])
    ok = acc >= TARGET_ACC and acc >= TARGET_FACTOR * chance["mean_box"]
    print("\n" + "=" * 72)
    print(f"llava-getok demo: tiny random LLaVA, {a.steps} steps on {a.train_images} shapes images, {total / 60:.1f} min")
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


if __name__ == "__main__":
    sys.exit(main())

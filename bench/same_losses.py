"""The logged losses of fixed short training runs, to show that a change of code left training as it was.

    python bench/same_losses.py --out bench/results/same_losses.json          # record
    python bench/same_losses.py --compare bench/results/same_losses.json      # rerun, compare (relative 1e-5)

Each run is ``python -m llava_getok.train`` on a tiny random LLaVA (built here, seed 0) and COCO boxes from
tests/fixtures/data, with torch seeded before anything is built (the process runs ``torch.manual_seed(seed)``
first, so code that does not seed early itself is compared fairly). Every step's ``loss`` and GETok parts
(``loss_lm``, ``loss_grid``, ``loss_box``) are read from the run's ``trainer_state.json``. The runs cover the loss
paths: GETok with full fine-tuning, with LoRA (row deltas), with factored rows, the bins format, text (LLaVA's
own loss) and GETok under bf16 autocast. Compare on one machine: float rounding differs between machines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data" / "coco_mini"
STEPS = 6
RUNS = {  # name -> (location format, extra training flags)
    "getok-full": ("getok", []),
    "getok-lora": ("getok", ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8"]),
    "getok-factored": ("getok", ["--getok_rows", "factored", "--weight_decay", "0"]),
    "getok-bf16": ("getok", ["--bf16", "True"]),
    "bins": ("bins", []),
    "text": ("text", []),
}
KEYS = ("loss", "loss_lm", "loss_grid", "loss_box")
SEEDED_MAIN = "import sys, torch; torch.manual_seed(0); from llava_getok.train import main; main(sys.argv[1:])"


def build(work: Path) -> dict[str, Path]:
    """The tiny model and one 4-record REC file per location format."""
    from llava_getok import formats
    from llava_getok.llava.tiny import build_tiny_llava, make_grounding_data, train_tokenizer

    tok = train_tokenizer(work / "tokenizer")
    paths = {"model": build_tiny_llava(work / "tiny-llava", tok)}
    fmts = {"getok": formats.GETokConfig(grid=8), "text": formats.TextFormat(), "bins": formats.BinsFormat(bins=16)}
    for name, fmt in fmts.items():
        paths[name] = make_grounding_data(work / f"data-{name}", FIXTURES, fmt, n_records=4)
    return paths


def run(paths: dict[str, Path], name: str, work: Path) -> list[dict]:
    fmt, extra = RUNS[name]
    model, data, out = paths["model"], paths[fmt], work / f"run-{name}"
    argv = [
        "--model_name_or_path", str(model), "--version", "getok_v1", "--data_path", str(data),
        "--image_folder", str(data.parent / "images"), "--vision_tower", str(model / "vision_tower"),
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad", "--getok_grid", "8",
        "--output_dir", str(out), "--max_steps", str(STEPS), "--per_device_train_batch_size", "2",
        "--learning_rate", "3e-3", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
        "--model_max_length", "256", "--dataloader_num_workers", "0", "--seed", "0", "--disable_tqdm", "True",
        "--use_cpu", "True", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SEEDED_MAIN, *argv], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name}: training failed:\n{proc.stderr[-3000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [{k: h[k] for k in KEYS if k in h} for h in history if "loss" in h]


def compare(old: dict, new: dict, rtol: float) -> list[str]:
    """Lines naming every logged value that differs by more than ``rtol`` (relative)."""
    bad = []
    for name, steps in old.items():
        for k, (a, b) in enumerate(zip(steps, new.get(name, []))):
            for key in KEYS:
                x, y = a.get(key), b.get(key)
                if (x is None) != (y is None) or (x is not None and abs(x - y) > rtol * max(abs(x), 1e-12)):
                    bad.append(f"{name} step {k + 1} {key}: {x} -> {y}")
        if len(steps) != len(new.get(name, [])):
            bad.append(f"{name}: {len(steps)} logged steps -> {len(new.get(name, []))}")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the losses (JSON) here")
    p.add_argument("--compare", type=Path, help="compare with the losses recorded in this file")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    a = p.parse_args(argv)
    names = a.runs.split(",")
    with tempfile.TemporaryDirectory(prefix="same-losses-") as tmp:  # no 'mpt' (tmpt...) in the path: LLaVA reads it
        work = Path(tmp)
        paths = build(work)
        got = {name: run(paths, name, work) for name in names}
    print(f"| run | {' | '.join(KEYS)} (step 1 ... step {STEPS}) |\n|---|---|")
    for name, steps in got.items():
        cols = [" ".join(f"{s[k]:.4f}" for s in steps) if k in steps[0] else "-" for k in KEYS]
        print(f"| {name} | {' | '.join(cols)} |")
    if a.out:
        a.out.write_text(json.dumps(got, indent=1) + "\n")
    if a.compare:
        old = {k: v for k, v in json.loads(a.compare.read_text()).items() if k in names}
        bad = compare(old, got, a.rtol)
        print("\n".join(bad) if bad else f"same losses as {a.compare} (relative {a.rtol})")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

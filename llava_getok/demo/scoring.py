"""How the demo scores its model: predictions on the held-out split, chance levels that ignore the expression, how
often the box is on the shape the expression names, a learning curve from saved checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TARGET_ACC, TARGET_FACTOR = 0.5, 5.0  # what "it grounds" means here: Acc@0.5 and its ratio to the mean-box chance


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
    from ..eval.cli import evaluate
    from ..predict import main as predict

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

    from ..training.sidecar import read_sidecar
    from ..training.tokens import location_tokens_as_content

    tok = AutoTokenizer.from_pretrained(ckpt, use_fast=False)
    location_tokens_as_content(tok, read_sidecar(ckpt).location_format)  # as the builder loads it
    answers = [r["conversations"][1]["value"] for r in json.loads(val_json.read_text())]
    return float(np.mean([len(tok(t, add_special_tokens=False).input_ids) for t in answers]))


def chance_levels(records: dict[str, list[dict]]) -> dict:
    """Acc@0.5 of two answers that ignore the expression, on the val split: the box of a random shape of the
    image (expected value) and the mean box of the training targets; and how often a random shape is the
    named one (``random_shape_pick``, the chance level of :func:`selection_rate`)."""
    from ..geometry import box_iou

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
    from ..geometry import box_iou

    scene = np.asarray(record["scene_boxes"], float)
    target = [list(b) for b in record["scene_boxes"]].index(list(record["box"]))
    return int(np.argmax(np.asarray(box_iou(scene, box[None])).reshape(-1))) == target


def split_row(metrics: dict) -> dict:
    """The val split's row of eval's REC metrics (the one split there is; "all" when eval names none)."""
    return next((v for k, v in metrics.items() if k != "all"), None) or metrics["all"]

"""``llava-getok eval``: score a predictions JSONL against the converted annotations.

    llava-getok eval --predictions P.jsonl --annotations A.json [--image-root DIR] [--output-dir DIR]
                     [--only-predicted] [--no-ceiling] [--sam-checkpoint CKPT]

Writes ``STEM.metrics.json`` (every number), ``STEM.metrics.md`` (per-task tables, one row per split) and
``STEM.scores.jsonl`` (one line per record) next to the predictions or into ``--output-dir``, and prints the
tables. Each table carries the quantisation ceiling: the same metrics for the ground-truth answer as the
tokens carry it (what a perfect model could score with this location format and frame), and the format itself
(GETok's grid and rounds, text's decimals, the bins' K).

Predictions are ``llava-getok predict``'s lines, or any model's raw answers ``{"id", "text"}`` (LLaVA's
``model_vqa`` writes ``question_id``: accepted): a line without ``shapes`` is parsed here, in the annotations'
location format (GETok tokens, bins tokens, or text boxes anywhere in free text) and frame.

Exit status: 0 done, 1 bad input (one line naming file, record and field), 2 bad arguments, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..formats import describe
from ..messages import one_line
from ..records import (RecordsError, check_format, check_getok, decode_record, parse_answer, read_predictions,
                       read_records, short)
from .metrics import TASKS, THRESHOLDS, aggregate, score_all, scores_as_dicts, split_name


def image_loader_for(root: Path | None):
    """record -> (H, W, 3) uint8 array from ``root / record["image"]``; a clear error when it is missing."""
    if root is None:
        return None
    from ..images import ImageError, load_image

    def load(record):
        path = Path(root) / str(record.get("image"))
        if not isinstance(record.get("image"), str) or not record["image"] or not path.is_file():
            raise RecordsError(f"record {record.get('id')}: field 'image': {path} not found (under --image-root {root})")
        try:
            return np.asarray(load_image(path))  # upright, as the model saw it
        except ImageError as e:  # not an image, truncated, too big, too small
            raise RecordsError(f"record {record.get('id')}: field 'image': cannot read {e}") from None

    return load


def ceiling_predictions(records: list[dict]) -> dict[str, dict]:
    """The ground truth as its tokens carry it, decoded like a prediction (refinements applied)."""
    out = {}
    for r in records:
        if (r.get("getok") or {}).get("task") in TASKS:
            try:
                out[str(r["id"])] = decode_record(r)
            except RecordsError as e:
                raise RecordsError(f"record {r.get('id')}: {e}") from None
    return out


def check_annotations(records: list[dict], path, ceiling: bool) -> None:
    """Every record's ``getok`` holds what scoring it reads (scored tasks: frame, size, shapes, and config for
    the ceiling); else a RecordsError naming the file, the record and the field."""
    for k, r in enumerate(records):
        if not r.get("getok"):
            continue  # not converted: counted, not scored
        where = f"{path}: record {k} (id {r.get('id')}): getok"
        g = check_getok(r["getok"], where, needs=("task",))
        if g["task"] in TASKS:
            check_getok(g, where, needs=("task", "frame", "size", "shapes") + (("config",) if ceiling else ()))
            w, h = g["size"]  # ground truth lies in its image (converters clip it there; 1 px for rounding)
            for j, s in enumerate(g["shapes"]):
                if not all(-1 <= x <= w + 1 and -1 <= y <= h + 1 for x, y in s["points"]):
                    raise RecordsError(f"{where}: shapes[{j}]: a point lies outside the {w} x {h} image: {short(s['points'])}")


def answers_parsed(records: list[dict], preds: dict[str, dict]) -> dict[str, dict]:
    """``preds`` with every line that has no ``shapes`` (a model's raw answer) parsed from its ``text`` in its record's
    format and frame (:func:`llava_getok.records.parse_answer`); lines of records that are not scored stay as they
    are."""
    out = dict(preds)
    for r in records:
        rid = str(r.get("id"))
        p = preds.get(rid)
        if p is not None and "shapes" not in p and (r.get("getok") or {}).get("task") in TASKS:
            out[rid] = parse_answer(r, p.get("text", ""), p.get("id", p.get("question_id")))
    return out


def formats_by_split(records: list[dict], metrics: dict) -> dict:
    """{task: {split: the location format(s) of its records' answers}} for the rows of ``metrics``."""
    seen: dict = {}
    for r in records:
        g = r.get("getok") or {}
        if g.get("task") in TASKS:
            name = describe(check_format(g, f"record {r.get('id')}: getok"))
            for split in (split_name(r), "all"):
                seen.setdefault(g["task"], {}).setdefault(split, set()).add(name)
    return {task: {split: "; ".join(sorted(seen[task].get(split, ()))) for split in rows}
            for task, rows in metrics.items() if task in seen}


def _fmt(v, pct=True):
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else str(v)


COLUMNS = {  # task -> (title, [(header, key)])
    "rec": ("REC", [(f"Acc@{t}", f"acc@{t}") for t in THRESHOLDS] + [("mIoU", "miou")]),
    "res": ("RES", [("cIoU", "ciou"), ("gIoU", "giou")]),
    "point": ("Pointing", [("Acc", "acc")]),
}


def markdown(metrics: dict, ceiling: dict | None, formats: dict | None = None) -> str:
    """One table per task, one row per split; metrics in percent, counts as numbers (``outside`` where a record's
    every target lies outside the crop the model sees); with the ceiling, the answers' location format (``formats``:
    :func:`formats_by_split`)."""
    parts = []
    for task, (title, cols) in COLUMNS.items():
        if task not in metrics:
            continue
        counts = ["unparseable", "no_shape", "missing", "skipped"]
        if any(row.get("outside") for row in metrics[task].values()):  # a crop frame cut every target of a record
            counts.append("outside")
        head = ["split", "n"] + [h for h, _ in cols] + [c.replace("_", " ") for c in counts]
        if ceiling is not None:
            head += [f"ceiling {h}" for h, _ in cols] + (["format"] if formats else [])
        lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for split, row in metrics[task].items():
            cells = [split, str(row["n"])] + [_fmt(row[k]) for _, k in cols]
            cells += [str(row[k]) for k in counts]
            if ceiling is not None:
                crow = ceiling.get(task, {}).get(split, {})
                cells += [_fmt(crow.get(k)) for _, k in cols]
                cells += [formats.get(task, {}).get(split, "–")] if formats else []
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else "No record of a scored task (rec, res, point).\n"


def evaluate(predictions: Path, annotations: Path, image_root: Path | None = None, output_dir: Path | None = None,
             only_predicted: bool = False, ceiling: bool = True, generator=None) -> dict:
    """Score, write the three outputs, return ``{"metrics", "ceiling", "counts", "files"}``."""
    records = read_records(annotations, one_question=True)
    check_annotations(records, annotations, ceiling)
    preds = answers_parsed(records, read_predictions(predictions))
    ids = {str(r["id"]) for r in records}
    unknown = sorted(set(preds) - ids)
    if only_predicted:
        records = [r for r in records if str(r["id"]) in preds]
    loader = image_loader_for(image_root)
    if loader is None and any((r.get("getok") or {}).get("task") == "res" for r in records):
        raise RecordsError(f"{annotations}: RES records need the images (pass --image-root)")
    if generator is None and loader is not None:
        from ..masks import SuperpixelGenerator

        generator = SuperpixelGenerator()
    try:
        scores = score_all(records, preds, loader, generator)
        ceiling_scores = score_all(records, ceiling_predictions(records), loader, generator) if ceiling else None
    except RecordsError as e:
        raise RecordsError(f"{annotations}: {e}") from None
    result = {"metrics": aggregate(scores), "ceiling": None,
              "counts": {"records": len(records), "predictions": len(preds), "unknown_ids": len(unknown),
                         "no_getok": sum(not r.get("getok") for r in records)}}
    if ceiling:
        result["ceiling"] = aggregate(ceiling_scores)
        result["formats"] = formats_by_split(records, result["ceiling"])
    out_dir = Path(output_dir) if output_dir else Path(predictions).parent
    stem = Path(predictions).stem
    files = {k: out_dir / f"{stem}.{k}" for k in ("metrics.json", "metrics.md", "scores.jsonl")}
    md = markdown(result["metrics"], result["ceiling"], result.get("formats"))
    notes = []
    if result["ceiling"] is not None and md.startswith("###"):
        notes.append("ceiling: the ground-truth answer as its tokens carry it, scored like a prediction: the best "
                     "this location format (column format), frame (and, for RES, proposal generator) allow.")
    other = Counter(str((r.get("getok") or {}).get("task")) for r in records
                    if r.get("getok") and (r.get("getok") or {}).get("task") not in COLUMNS)
    if other:
        notes.append("not scored (no metric for the task): " + ", ".join(f"{t}: {n}" for t, n in sorted(other.items())))
    outside = sum(row["outside"] for task in result["metrics"].values() for split, row in task.items()
                  if split != "all" or len(task) == 1)
    if outside:
        notes.append(f"outside: {outside} record(s) whose every target lies outside the crop the model sees, counted "
                     f"apart (not in n, neither a hit nor a miss).")
    if unknown:
        notes.append(f"{len(unknown)} prediction id(s) not in the annotations (first: {unknown[0]!r}), not scored.")
    if result["counts"]["no_getok"]:
        notes.append(f"{result['counts']['no_getok']} record(s) without a getok field, skipped.")
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_text_atomic(files["metrics.json"], json.dumps(result, indent=1) + "\n")
    write_text_atomic(files["metrics.md"], md)
    write_text_atomic(files["scores.jsonl"], "".join(json.dumps(s) + "\n" for s in scores_as_dicts(scores)))
    result["files"] = {k: str(v) for k, v in files.items()}
    result["markdown"] = md
    return result


def _parser():
    p = argparse.ArgumentParser(prog="llava-getok eval", description=__doc__.split("\n")[0])
    p.add_argument("--predictions", type=Path, required=True,
                   help="JSONL from llava-getok predict, or raw answers {id or question_id, text} (LLaVA's model_vqa)")
    p.add_argument("--annotations", type=Path, required=True, help="the converted file (JSON list or JSONL)")
    p.add_argument("--image-root", type=Path, help="images (RES: masks from proposals at the predicted anchors)")
    p.add_argument("--output-dir", type=Path, help="where to write STEM.metrics.json/.md and STEM.scores.jsonl "
                                                   "(default: next to the predictions)")
    p.add_argument("--only-predicted", action="store_true",
                   help="score only the records that have a prediction (e.g. after predict --limit); "
                        "default: a record without a prediction is a miss")
    p.add_argument("--no-ceiling", action="store_true", help="skip the quantisation ceiling")
    p.add_argument("--sam-checkpoint", help="RES: Segment Anything proposals (use what the data was converted with)")
    p.add_argument("--sam-model-type", default="vit_h")
    return p


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("llava-getok eval: interrupted", file=sys.stderr)
        return 130


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    generator = None
    if args.sam_checkpoint:
        from ..masks import SamGenerator

        generator = SamGenerator(args.sam_checkpoint, args.sam_model_type)
    for what, path in (("--predictions", args.predictions), ("--annotations", args.annotations)):
        if not path.is_file():
            print(f"llava-getok eval: {what} {path}: no such file", file=sys.stderr)
            return 2
    try:
        result = evaluate(args.predictions, args.annotations, args.image_root, args.output_dir,
                          args.only_predicted, not args.no_ceiling, generator)
    except ValueError as e:  # RecordsError, or a record the metrics cannot score (named in the message)
        print(f"llava-getok eval: {one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # the outputs cannot be written
        print(f"llava-getok eval: cannot write the results: {e}", file=sys.stderr)
        return 1
    print(result["markdown"], end="")
    print(f"\nwrote {', '.join(result['files'].values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Converted records (docs/data-format.md): reading a file of them, and the ground truth their tokens carry.

Shared by evaluation, prediction, ``check-data``, GRPO and ``convert-datasets decode``; the records are
written by :func:`data_converters.records.build_record`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .codec import apply_refinement
from .geometry import boxes_from_frame, points_from_frame
from .parse import parse
from .vocab import GETokConfig

# The human turn of a refine-mode record (spec section 5): it restates the first answer.
REFINE_PROMPT = "Your answer was {answer}. Refine it: one offset for each point, or delete the points that are wrong."


class RecordsError(ValueError):
    """A records file that cannot be read; the message names the file and the line or record."""


def read_records(path, require_id: bool = True, one_question: bool = False) -> list[dict]:
    """A LLaVA-format JSON list or JSONL file -> list of record dicts.

    Raises :class:`RecordsError` naming the file and line (JSONL) for anything that is not a list of
    objects, with ``require_id`` the index of a record without an ``id``, and with ``one_question`` a
    record that groups several questions (``convert-datasets --group-turns``: training data only).
    """
    path = Path(path)
    if not path.is_file():
        raise RecordsError(f"{path}: no such file (expected converted data: a JSON list or JSONL)")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordsError(f"{path}: not valid JSON ({e})") from None
    else:
        records = []
        for k, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RecordsError(f"{path}:{k}: not valid JSON ({e.msg}); expected a JSON list or JSONL") from None
    for k, r in enumerate(records):
        if not isinstance(r, dict):
            raise RecordsError(f"{path}: record {k} is a {type(r).__name__}, not an object")
        if require_id and "id" not in r:
            raise RecordsError(f"{path}: record {k} has no 'id' field")
        if one_question and "turns" in (r.get("getok") or {}):
            raise RecordsError(f"{path}: record {r.get('id', k)} groups {len(r['getok']['turns'])} questions about one "
                               f"image (convert-datasets --group-turns): that is training data; predict, evaluate "
                               f"and reward on a split converted with --group-turns 1")
    return records


def decode_record(record: dict) -> dict:
    """A converted record -> ``{"id", "text", "shapes", "errors"}`` with every shape in original pixels.

    Shapes are read from every turn in order (the region of a REG question included); in refine mode the
    human turn that restates the previous answer adds nothing; a refine answer replaces the shapes of the answer it refines. This is the ground truth as the tokens carry it: the
    same keys as a prediction line, so a decoded file is also the quantisation ceiling's "prediction".
    """
    g = record.get("getok")
    if not g:
        return {"id": record.get("id"), "text": "", "shapes": [], "errors": ["no getok field: nothing was converted"]}
    cfg = GETokConfig.from_dict(g["config"])
    size, frame = g["size"], g["frame"]
    shapes, errors, last, text = [], [], [], ""
    for turn in record["conversations"]:
        r = parse(turn["value"], cfg)
        errors += [f"{turn['from']}: {e.message}" for e in r.errors]
        if r.refinements:
            try:
                refined = apply_refinement(last, r.refinements, cfg)
            except ValueError as e:
                errors.append(str(e))
                refined = last
            shapes = shapes[: len(shapes) - len(last)] + refined
            last = refined
        elif r.shapes and not (cfg.mode == "refine" and turn["from"] == "human" and r.shapes == last):  # restated answer
            shapes += r.shapes
            last = r.shapes
        if turn["from"] == "gpt":
            text = turn["value"]
    out = []
    for s in shapes:
        if s.kind == "box":
            b = boxes_from_frame(np.asarray(s.box, dtype=np.float64), size, frame)
            out.append({"kind": "box", "points": [_r(b[:2]), _r(b[2:])]})
        else:
            out.append({"kind": s.kind, "points": [_r(p) for p in points_from_frame(np.asarray(s.points), size, frame)]})
    return {"id": record.get("id"), "text": text, "shapes": out, "errors": errors}


def _r(p):
    return [round(float(v), 3) for v in p]

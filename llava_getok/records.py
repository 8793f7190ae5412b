"""Converted records and predictions (docs/data-format.md): the one schema every reader and writer shares.

A record is LLaVA's ``{"id", "image", "conversations"}`` plus a ``getok`` field whose shapes are in pixels of
the original image; a prediction line is ``{"id", "text", "shapes", "errors"}`` with shapes in the same pixels.
This module is the layer below the converters, prediction, evaluation, GRPO and viz: it reads and validates
both (one error type, :class:`RecordsError`), maps shapes between pixels and the model's frame
(:func:`shapes_to_pixels` / :func:`shapes_from_pixels`, rounded in one place, :func:`json_shape`), decodes
``getok.mask`` (:func:`record_mask`, with :mod:`llava_getok.rle`) and holds the prompts the records are written
with.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .codec import Shape, apply_refinement
from .formats import LocationFormat, for_image, parse, record_format
from .geometry import FRAME_NAMES, check_frame, points_from_frame, points_to_frame
from .messages import short
from .parse import ParseError, ParseResult
from .rle import rle_problem, rle_to_mask
from .vocab import SHAPE_KINDS, GETokConfig

# Pixel coordinates in files (records and predictions) are rounded to this many decimals.
PIXEL_DECIMALS = 3

# The human turns records are written with: LLaVA-1.5's own REC / REG wording, so converted data mixes with
# llava_v1_5_mix665k; one fixed prompt per task, so a converted file depends on the data and the seed only.
PROMPTS = {
    "rec": "Please provide the bounding box coordinate of the region this sentence describes: {expression}.",
    "det": "Please provide the bounding box coordinates of every {expression} in the image.",
    "reg": "Please provide a short description for this region: {region}.",
    "point": "Please point to the region this sentence describes: {expression}.",
    "res": "Please provide the segmentation mask of the region this sentence describes: {expression}.",
}
TASK_SHAPES = {"rec": "box", "point": "point", "res": "mask"}  # the one shape each task's answer is
NO_MATCH = "There is no such object in the image."  # the answer when the expression names nothing
# The human turn of a refine-mode record (spec section 5): it restates the first answer.
REFINE_PROMPT = "Your answer was {answer}. Refine it: one offset for each point, or delete the points that are wrong."


class RecordsError(ValueError):
    """A records or predictions file, or a record in it, that breaks this schema; the message names the file
    and the line or record, and the field."""


# -- files ------------------------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    """A records / predictions file as UTF-8 text; a missing, unreadable or undecodable file is a RecordsError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordsError(f"{path}: no such file (expected converted data: a JSON list or JSONL)") from None
    except OSError as e:
        raise RecordsError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordsError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _json(text: str, where: str):
    """``json.loads`` whose every failure (malformed JSON, an integer beyond Python's 4300 digits, nesting deeper
    than Python's recursion limit) is a RecordsError naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordsError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except ValueError as e:
        raise RecordsError(f"{where}: not valid JSON ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise RecordsError(f"{where}: not valid JSON (nested deeper than Python can read)") from None


def check_id(value, where: str) -> str:
    """A record or prediction id: a string or an integer (not a boolean, a float or null) -> its string form, the
    key predictions and records are joined on."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise RecordsError(f"{where}: 'id' must be a string or an integer, got {short(value)}")


def read_records(path, require_id: bool = True, one_question: bool = False) -> list[dict]:
    """A LLaVA-format JSON list or JSONL file -> list of record dicts.

    Raises :class:`RecordsError` naming the file and line (JSONL) or record for anything that is not a list of
    objects; with ``require_id`` (files keyed by id: predict, eval, show) a record without an id, an id that is
    not a string or an integer, or an id that repeats an earlier record's; with ``one_question`` a record that
    groups several questions (``convert-datasets --group-turns``: training data only). Training data
    (``require_id=False``) may repeat ids: LLaVA-1.5's own mix665k does.
    """
    path = Path(path)
    text = _read_text(path)
    if text.lstrip().startswith("["):
        records, where = _json(text, str(path)), None
        if not isinstance(records, list):
            raise RecordsError(f"{path}: expected a JSON list of records or JSONL")
    else:
        records, where = [], []
        for k, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(_json(line, f"{path}:{k}"))
                where.append(f"{path}:{k}")
    seen: dict[str, str] = {}
    for k, r in enumerate(records):
        at = where[k] if where else f"{path}: record {k}"
        label = f"line {where[k].rsplit(':', 1)[1]}" if where else f"record {k}"
        if not isinstance(r, dict):
            raise RecordsError(f"{at}: a record must be an object, got {short(r)}")
        if require_id:
            if r.get("id") is None:
                raise RecordsError(f"{at}: no 'id' field")
            rid = check_id(r["id"], at)
            if rid in seen:
                raise RecordsError(f"{at}: id {rid!r} repeats the id of {seen[rid]}")
            seen[rid] = label
        if one_question and isinstance(r.get("getok"), dict) and "turns" in r["getok"]:
            raise RecordsError(f"{path}: record {r.get('id', k)} groups {len(r['getok']['turns'])} questions about one "
                               f"image (convert-datasets --group-turns): that is training data; predict, evaluate "
                               f"and reward on a split converted with --group-turns 1")
    return records


def read_predictions(path) -> dict[str, dict]:
    """Predictions JSONL -> {id: prediction}. A line is ``llava-getok predict``'s ``{"id", "text", "shapes",
    "errors"}`` or just the model's raw answer, ``{"id", "text"}`` (LLaVA's ``llava.eval.model_vqa`` writes
    ``question_id`` for the id: accepted when there is no ``id``); a line without ``shapes`` is parsed from its text
    later, in the annotations' format and frame (:func:`parse_answer`). A line that is not a JSON object, a missing
    or repeated id, an id that is not a string or an integer, a ``text`` that is not a string or a malformed shape is
    a :class:`RecordsError` naming the line."""
    path = Path(path)
    out: dict[str, dict] = {}
    for k, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        p = _json(line, f"{path}:{k}")
        key = "id" if isinstance(p, dict) and p.get("id") is not None else "question_id"
        if not isinstance(p, dict) or p.get(key) is None:
            raise RecordsError(f"{path}:{k}: a prediction must be an object with an 'id' (or 'question_id') field")
        rid = check_id(p[key], f"{path}:{k}")
        if not isinstance(p.get("shapes", []), list) or not isinstance(p.get("errors", []), list):
            raise RecordsError(f"{path}:{k} (id {rid}): 'shapes' and 'errors' must be lists")
        if not isinstance(p.get("text", ""), str):
            raise RecordsError(f"{path}:{k} (id {rid}): 'text' must be a string, got {short(p['text'])}")
        check_shapes(p.get("shapes", []), f"{path}:{k} (id {rid})")
        if rid in out:
            raise RecordsError(f"{path}:{k}: id {p[key]!r} appears twice")
        out[rid] = p
    return out


# -- validation -------------------------------------------------------------------------------------------------

def _number(v) -> bool:
    """A finite JSON number (a boolean is not one, though Python's bool is an int)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def check_shapes(shapes: list, where: str) -> list[dict]:
    """JSON shapes ``[{"kind", "points"}, ...]`` (pixels): each kind one of ``SHAPE_KINDS``, each ``points`` a
    non-empty list of [x, y] finite numbers; returns them, else :class:`RecordsError` naming ``where`` and the
    shape."""
    if not isinstance(shapes, list):
        raise RecordsError(f"{where}: 'shapes' must be a list, got {short(shapes)}")
    for k, shape in enumerate(shapes):
        at = f"{where}: shapes[{k}]"
        if not isinstance(shape, dict) or not isinstance(shape.get("kind"), str) or shape["kind"] not in SHAPE_KINDS:
            raise RecordsError(f"{at}: 'kind' must be one of {', '.join(SHAPE_KINDS)}")
        pts = shape.get("points")
        if not (isinstance(pts, (list, tuple)) and pts
                and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_number, p)) for p in pts)):
            raise RecordsError(f"{at}: 'points' must be a non-empty list of [x, y] numbers (pixels)")
    return shapes


def check_config(config, where: str) -> GETokConfig:
    """``getok.config`` -> the GETokConfig it describes, else :class:`RecordsError` naming ``where``."""
    if not isinstance(config, dict) or any(isinstance(v, bool) for v in config.values()):
        raise RecordsError(f"{where}: 'config' must be an object like {{\"grid\": 32, \"mode\": \"inline\"}}, got {short(config)}")
    try:
        return GETokConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise RecordsError(f"{where}: 'config': {e}") from None


def check_format(getok: dict, where: str) -> LocationFormat:
    """The location format of a record's ``getok`` field: ``format`` (text, bins) or ``config`` (GETok), else a
    :class:`RecordsError` naming ``where`` and the field."""
    if "format" not in getok:
        if "config" not in getok:
            raise RecordsError(f"{where} lacks 'config' (GETok) or 'format' (text, bins) (docs/data-format.md); "
                               f"keys: {sorted(getok)}")
        return check_config(getok["config"], where)
    f = getok["format"]
    if not isinstance(f, dict) or any(isinstance(v, bool) for v in f.values()):
        raise RecordsError(f"{where}: 'format' must be an object like {{\"name\": \"text\", \"decimals\": 2}}, got {short(f)}")
    try:
        return record_format(getok)
    except (TypeError, ValueError) as e:
        raise RecordsError(f"{where}: 'format': {e}") from None


def check_getok(getok, where: str = "getok field", needs=("task", "frame", "size", "shapes")) -> dict:
    """A record's ``getok`` field with the keys ``needs`` checked (present; ``task`` a string; ``frame`` a frame of
    :mod:`llava_getok.geometry`; ``size`` two positive numbers; ``shapes`` valid JSON shapes; ``config``: a valid
    location format, GETok's ``config`` or the ``format`` of the others, :func:`check_format`) and, when
    present, ``mask`` (COCO RLE of ``size``) and ``boxes`` (lists of 4 numbers); returns it, else
    :class:`RecordsError` naming the field."""
    if not isinstance(getok, dict):
        raise RecordsError(f"{where}: expected an object, got {short(getok)}")
    for key in needs:  # a null value is present, and refused by its own check below
        if key not in getok and not (key == "config" and "format" in getok):
            raise RecordsError(f"{where} lacks {key!r} (docs/data-format.md); keys: {sorted(getok)}")
    if "task" in needs and not isinstance(getok["task"], str):
        raise RecordsError(f"{where}: 'task' must be a string, got {short(getok['task'])}")
    if "frame" in needs:
        try:
            check_frame(getok["frame"])
        except ValueError:
            raise RecordsError(f"{where}: 'frame' must be one of {FRAME_NAMES}, got {short(getok['frame'])}") from None
    size = getok.get("size")
    if "size" in needs and not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_number(v) and v > 0 for v in size)):
        raise RecordsError(f"{where}: 'size' must be [width, height] in pixels, got {short(size)}")
    if "shapes" in needs:
        check_shapes(getok["shapes"], where)
    if "config" in needs:
        check_format(getok, where)
    if getok.get("mask") is not None:
        problem = rle_problem(getok["mask"])
        if problem:
            raise RecordsError(f"{where}: 'mask{'.' + problem[0] if problem[0] else ''}': {problem[1]}")
    boxes = getok.get("boxes")
    if boxes is not None and not (isinstance(boxes, (list, tuple)) and all(
            isinstance(b, (list, tuple)) and len(b) == 4 and all(map(_number, b)) for b in boxes)):
        raise RecordsError(f"{where}: 'boxes' must be a list of [x1, y1, x2, y2] numbers, got {short(boxes)}")
    return getok


# -- shapes: pixels of the original image <-> the model's frame ---------------------------------------------------

def round_pixels(values) -> list[float]:
    """Pixel coordinates as files hold them: floats rounded to PIXEL_DECIMALS.

    >>> round_pixels([7.02, 167.8349])
    [7.02, 167.835]
    """
    return [round(float(v), PIXEL_DECIMALS) for v in values]


def json_shape(kind: str, points) -> dict:
    """A shape as files hold it: ``{"kind", "points"}`` with pixel points rounded (:func:`round_pixels`).

    >>> json_shape("box", [[7.02, 167.8349], [156.3, 262.7]])
    {'kind': 'box', 'points': [[7.02, 167.835], [156.3, 262.7]]}
    """
    return {"kind": kind, "points": [round_pixels(p) for p in points]}


def read_shapes(shapes: list[dict]) -> list[Shape]:
    """JSON shapes -> :class:`Shape` objects with the points as stored (pixels), e.g. for ``Shape.box``."""
    return [Shape(s["kind"], tuple(tuple(float(v) for v in p) for p in s["points"])) for s in shapes]


def shapes_to_pixels(shapes: list[Shape], size, frame: str) -> list[dict]:
    """Shapes normalised in ``frame`` -> JSON shapes in pixels of the original image of ``size`` (W, H),
    clamped to it (boxes as their two sorted corners). The inverse of :func:`shapes_from_pixels`.

    >>> shapes_to_pixels([Shape("box", ((0.25, 0.25), (0.5, 0.75)))], (480, 640), "pad")  # 80 px padding left
    [{'kind': 'box', 'points': [[80.0, 160.0], [240.0, 480.0]]}]
    """
    out = []
    for s in shapes:
        pts = np.reshape(s.box, (2, 2)) if s.kind == "box" else np.asarray(s.points, dtype=np.float64)
        out.append(json_shape(s.kind, points_from_frame(pts, size, frame)))
    return out


def shapes_from_pixels(shapes: list[dict], size, frame: str) -> list[Shape]:
    """JSON shapes in pixels of the original image of ``size`` (W, H) -> shapes normalised in ``frame``.

    >>> shapes_from_pixels([{"kind": "point", "points": [[240, 320]]}], (480, 640), "pad")[0].points
    ((0.5, 0.5),)
    """
    return [Shape(s.kind, tuple(map(tuple, points_to_frame(np.asarray(s.points), size, frame).tolist())))
            for s in read_shapes(shapes)]


def prediction_line(rid, text: str, shapes: list[Shape], errors: list[str], size, frame: str) -> dict:
    """A prediction line (``{"id", "text", "shapes", "errors"}``) from shapes normalised in ``frame``."""
    return {"id": rid, "text": text, "shapes": shapes_to_pixels(shapes, size, frame), "errors": list(errors)}


def decode_record(record: dict) -> dict:
    """A converted record -> its prediction line: the ground truth as the tokens carry it, in original pixels.

    Shapes are read from every turn in order (the region of a REG question included); in refine mode the
    human turn that restates the previous answer adds nothing; a refine answer replaces the shapes of the
    answer it refines. The same keys as a prediction line, so a decoded file is also the quantisation
    ceiling's "prediction".
    """
    if not isinstance(record, dict):
        raise RecordsError(f"a record must be an object, got {short(record)}")
    g = record.get("getok")
    if not g:
        return {"id": record.get("id"), "text": "", "shapes": [], "errors": ["no getok field: nothing was converted"]}
    check_getok(g, "getok", needs=("config", "frame", "size"))
    fmt = for_image(check_format(g, "getok"), g["size"])
    refine = getattr(fmt, "mode", None) == "refine"
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise RecordsError(f"'conversations' must be a list of turns, got {short(turns)}")
    for k, t in enumerate(turns):
        if not (isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)):
            raise RecordsError(f"'conversations[{k}]' must be a turn with 'from' and 'value' strings, got {short(t)}")
    shapes, errors, last, text = [], [], [], ""
    for turn in turns:
        r = parse(turn["value"], fmt)
        errors += [f"{turn['from']}: {e.message}" for e in r.errors]
        if r.refinements:
            try:
                refined = apply_refinement(last, r.refinements, fmt)
            except ValueError as e:
                errors.append(str(e))
                refined = last
            shapes = shapes[: len(shapes) - len(last)] + refined
            last = refined
        elif r.shapes and not (refine and turn["from"] == "human" and r.shapes == last):  # restated answer
            shapes += r.shapes
            last = r.shapes
        if turn["from"] == "gpt":
            text = turn["value"]
    return prediction_line(record.get("id"), text, shapes, errors, g["size"], g["frame"])


def parse_answer(record: dict, text: str, rid=None) -> dict:
    """A model's raw answer to a converted record -> its prediction line, parsed in the record's location format
    (GETok tokens, bins tokens, or text boxes anywhere in free text) and mapped from the record's frame to pixels of
    the original image. A GETok refine-mode answer is both turns in one text (as ``predict`` writes it): the
    refinement is applied to the first answer's shapes. Parse problems are the line's ``errors``; a record that is
    not a converted one is a :class:`RecordsError`."""
    g = check_getok(record.get("getok"), f"record {record.get('id')}: getok", needs=("config", "frame", "size"))
    fmt = for_image(check_format(g, f"record {record.get('id')}: getok"), g["size"])
    r = parse(text, fmt)
    result = ParseResult(shapes=r.shapes, errors=list(r.errors))
    if r.refinements:
        try:
            result.shapes = apply_refinement(r.shapes, r.refinements, fmt)
        except ValueError as e:
            result.errors.append(ParseError(0, f"refinement does not fit the first answer: {e}"))
    return prediction_line(record.get("id") if rid is None else rid, text, result.shapes,
                           [e.message for e in result.errors], g["size"], g["frame"])


# -- masks --------------------------------------------------------------------------------------------------------

def record_mask(getok: dict) -> np.ndarray | None:
    """The ground-truth mask of a record's ``getok`` field, (H, W) bool in original pixels; None without
    ``getok.mask``; :class:`RecordsError` when it is not a valid RLE or its size is not ``getok.size``."""
    if not getok.get("mask"):
        return None
    try:
        mask = rle_to_mask(getok["mask"])
    except ValueError as e:
        raise RecordsError(str(e)) from None
    if getok.get("size") and mask.shape != tuple(round(v) for v in getok["size"][::-1]):
        raise RecordsError(f"getok.mask is {mask.shape[::-1]} (W, H) but getok.size is {getok['size']}")
    return mask

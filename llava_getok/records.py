"""Converted records and predictions (docs/data-format.md): the one schema every reader and writer shares.

A record is LLaVA's ``{"id", "image", "conversations"}`` plus a ``getok`` field whose shapes are in pixels of
the original image; a prediction line is ``{"id", "text", "shapes", "errors"}`` with shapes in the same pixels.
This module is the layer below the converters, prediction, evaluation, GRPO and viz: it reads and validates
both (one error type, :class:`RecordsError`), maps shapes between pixels and the model's frame
(:func:`shapes_to_pixels` / :func:`shapes_from_pixels`, rounded in one place, :func:`json_shape`), decodes
``getok.mask`` (:func:`rle_to_mask`) and holds the prompts the records are written with.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .codec import Shape, apply_refinement
from .geometry import FRAMES, points_from_frame, points_to_frame
from .parse import parse
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
NO_MATCH = "There is no such object in the image."  # the answer when the expression names nothing
# The human turn of a refine-mode record (spec section 5): it restates the first answer.
REFINE_PROMPT = "Your answer was {answer}. Refine it: one offset for each point, or delete the points that are wrong."


class RecordsError(ValueError):
    """A records or predictions file, or a record in it, that breaks this schema; the message names the file
    and the line or record, and the field."""


# -- files ------------------------------------------------------------------------------------------------------

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


def read_predictions(path) -> dict[str, dict]:
    """Predictions JSONL -> {id: prediction}; a repeated id, a line without id or a malformed shape is a
    :class:`RecordsError` naming the line."""
    out: dict[str, dict] = {}
    for k, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordsError(f"{path}:{k}: not valid JSON ({e})") from None
        if not isinstance(p, dict) or "id" not in p:
            raise RecordsError(f"{path}:{k}: a prediction needs an 'id' field")
        if not isinstance(p.get("shapes", []), list) or not isinstance(p.get("errors", []), list):
            raise RecordsError(f"{path}:{k} (id {p['id']}): 'shapes' and 'errors' must be lists")
        check_shapes(p.get("shapes", []), f"{path}:{k} (id {p['id']})")
        if str(p["id"]) in out:
            raise RecordsError(f"{path}:{k}: id {p['id']!r} appears twice")
        out[str(p["id"])] = p
    return out


# -- validation -------------------------------------------------------------------------------------------------

def check_shapes(shapes: list, where: str) -> list[dict]:
    """JSON shapes ``[{"kind", "points"}, ...]`` (pixels): each kind one of ``SHAPE_KINDS``, each ``points`` a
    non-empty list of finite [x, y]; returns them, else :class:`RecordsError` naming ``where`` and the shape."""
    for k, shape in enumerate(shapes):
        at = f"{where}: shapes[{k}]"
        if not isinstance(shape, dict) or shape.get("kind") not in SHAPE_KINDS:
            raise RecordsError(f"{at}: 'kind' must be one of {', '.join(SHAPE_KINDS)}")
        pts = np.asarray(shape.get("points", []), dtype=object)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0 or not all(
                isinstance(v, (int, float)) and np.isfinite(v) for v in pts.ravel()):
            raise RecordsError(f"{at}: 'points' must be a non-empty list of [x, y] numbers (pixels)")
    return shapes


def check_getok(getok, where: str = "getok field", needs=("task", "frame", "size", "shapes")) -> dict:
    """A record's ``getok`` field with the keys ``needs`` checked (present; ``frame`` one of FRAMES; ``size``
    two positive numbers; ``shapes`` valid JSON shapes); returns it, else :class:`RecordsError`."""
    if not isinstance(getok, dict):
        raise RecordsError(f"{where}: expected an object, got {type(getok).__name__}")
    for key in needs:
        if key not in getok:
            raise RecordsError(f"{where} lacks {key!r} (docs/data-format.md); keys: {sorted(getok)}")
    if "frame" in needs and getok["frame"] not in FRAMES:
        raise RecordsError(f"{where}: 'frame' must be one of {FRAMES}, got {getok['frame']!r}")
    size = getok.get("size")
    if "size" in needs and not (isinstance(size, (list, tuple)) and len(size) == 2
                                and all(isinstance(v, (int, float)) and v > 0 for v in size)):
        raise RecordsError(f"{where}: 'size' must be [width, height] in pixels, got {size!r}")
    if "shapes" in needs:
        if not isinstance(getok["shapes"], list):
            raise RecordsError(f"{where}: 'shapes' must be a list")
        check_shapes(getok["shapes"], where)
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
    g = record.get("getok")
    if not g:
        return {"id": record.get("id"), "text": "", "shapes": [], "errors": ["no getok field: nothing was converted"]}
    check_getok(g, f"record {record.get('id')}: getok", needs=("config", "frame", "size"))
    cfg = GETokConfig.from_dict(g["config"])
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
    return prediction_line(record.get("id"), text, shapes, errors, g["size"], g["frame"])


# -- masks --------------------------------------------------------------------------------------------------------

def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """A COCO segmentation of an (height, width) image: polygons ``[[x1, y1, x2, y2, ...], ...]`` or RLE
    (uncompressed, ``counts`` a list, or compressed, bytes or str) -> compressed RLE with ``counts`` a str,
    as ``getok.mask`` stores it."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed, ``counts`` str or bytes, or uncompressed, ``counts`` a list) -> (H, W) bool."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(segmentation_to_rle(rle, *rle["size"])).astype(bool)


def record_mask(getok: dict) -> np.ndarray | None:
    """The ground-truth mask of a record's ``getok`` field, (H, W) bool in original pixels; None without
    ``getok.mask``; :class:`RecordsError` when its size is not ``getok.size``."""
    if not getok.get("mask"):
        return None
    mask = rle_to_mask(getok["mask"])
    if getok.get("size") and mask.shape != tuple(round(v) for v in getok["size"][::-1]):
        raise RecordsError(f"getok.mask is {mask.shape[::-1]} (W, H) but getok.size is {getok['size']}")
    return mask

"""Scores for grounding predictions, in pixels of the original image.

- REC: IoU of the first predicted box with the ground-truth box; Acc@0.5, Acc@0.8 and mean IoU.
- RES: the predicted mask is the union of the proposals at the predicted anchors (spec section 6); cIoU is
  the cumulative intersection over the cumulative union, gIoU the mean per-sample IoU.
- Pointing: the first predicted point lies inside the target mask (``getok.mask``), else inside a target box,
  else (records that carry target points only) within one grid cell of one, as the GRPO point reward.

Strictness: an output with any parse error is a miss (``unparseable``); so is an answer without the shape
the task asks for (``no_shape``). Both are counted separately, so a format problem is not mistaken for a
localisation problem.

Nothing to find (``getok.shapes`` empty, and no ``getok.mask`` pixels / ``getok.boxes``: gRefCOCO's no-target
expressions, VLM-R1's null solutions): an answer without the shape ("There is no such object") is a hit with IoU
1, an answer with one a miss with IoU 0, as gRefCOCO counts them (its gIoU takes 1 for a correct empty answer;
cIoU adds the wrongly predicted mask's pixels to the union). Rows count such records as ``no_target``.
A record whose ground truth cannot be scored otherwise (e.g. RES without ``getok.mask``) is skipped and counted.

The ground truth is scored as the model could see it: in a crop frame (``geometry.frame_region``) target boxes are
clipped to the crop, target points outside it dropped and the target mask cut to it (converted records already are);
a record whose every target lies wholly outside is ``outside``: counted apart, neither a hit nor a miss, and not in
``n`` (no answer in the model's frame can reach it).

The inputs are the converted records (docs/data-format.md) and prediction dicts
``{"id", "text", "shapes": [{"kind", "points"}], "errors"}`` with points in original pixels, both read
through :mod:`llava_getok.records`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from ..geometry import box_iou, frame_region, pixels_in_region, points_to_frame
from ..records import RecordsError, read_shapes, record_mask, shapes_from_pixels

TASKS = ("rec", "res", "point")
THRESHOLDS = (0.5, 0.8)
MISS_STATUSES = ("unparseable", "no_shape", "missing")


@dataclass
class SampleScore:
    """One record's score. status: ok, unparseable, no_shape, missing (a miss each), skipped (not scored) or outside
    (every target lies outside the crop the model sees: counted apart).

    iou: REC box IoU / RES mask IoU; inter, union: RES pixel counts; hit: pointing (or IoU >= 0.5 for REC).
    """

    id: str
    task: str
    split: str
    status: str
    iou: float = 0.0
    inter: int = 0
    union: int = 0
    hit: bool = False
    reason: str = ""


NO_TARGET = "no target: the answer should name nothing"
OUTSIDE = "every target lies outside the crop the model sees"


def split_name(record: dict) -> str:
    """The table row a record belongs to: ``source/split`` (either may be absent; neither: "default")."""
    g = record.get("getok") or {}
    return "/".join(str(x) for x in (g.get("source"), g.get("split")) if x) or "default"


def _shapes(pred: dict, kind: str) -> list[dict]:
    return [s for s in pred.get("shapes") or [] if s.get("kind") == kind]


def _boxes(shapes: list[dict]) -> list[tuple]:
    """The boxes (x1, y1, x2, y2) of the box shapes among JSON ``shapes``, in pixels."""
    return [s.box for s in read_shapes(shapes) if s.kind == "box"]


def score_record(record: dict, pred: dict | None, image_loader=None, generator=None) -> SampleScore:
    """Score one prediction against its converted record.

    image_loader(record) -> (H, W, 3) array: needed for RES only (proposals at the predicted anchors).
    generator: the proposal generator (default :class:`llava_getok.masks.SuperpixelGenerator`); use the one
    the data was converted with.
    """
    g = record.get("getok") or {}
    task, rid = g.get("task"), str(record.get("id"))
    base = dict(id=rid, task=str(task), split=split_name(record))
    if task not in TASKS:
        return SampleScore(**base, status="skipped", reason=f"task {task!r} is not scored (scored: {', '.join(TASKS)})")
    g = in_view(g)
    if g is None:
        return SampleScore(**base, status="outside", reason=OUTSIDE)
    if pred is None:
        return _miss(task, base, "missing", g)
    if pred.get("errors"):
        return _miss(task, base, "unparseable", g, "; ".join(map(str, pred["errors"]))[:200])
    if task == "rec":
        gt = _boxes(g.get("shapes") or [])
        w, h = g["size"]  # predicted boxes are clamped to the image, as predict writes them (a hand-made 1e308 too)
        boxes = [tuple(float(np.clip(v, 0, w if k % 2 == 0 else h)) for k, v in enumerate(b)) for b in _boxes(pred.get("shapes") or [])]
        if not gt:
            return _no_target(base, found=bool(boxes))
        if not boxes:
            return _miss(task, base, "no_shape", g, "no box in the answer")
        iou = float(max(box_iou(boxes[0], b) for b in gt))
        return SampleScore(**base, status="ok", iou=iou, hit=iou >= 0.5)
    target = _target_mask(g)
    if task == "res":
        masks = _shapes(pred, "mask")
        no_target = not g.get("shapes") and target is None
        if no_target and not masks:
            return _no_target(base, found=False)
        if not no_target and target is None:
            return SampleScore(**base, status="skipped", reason="no getok.mask (RES needs the ground-truth mask)")
        if not masks:
            return _miss(task, base, "no_shape", g, "no mask in the answer")
        if image_loader is None:
            raise ValueError(f"record {rid}: RES needs the image to turn anchors into a mask (pass --image-root)")
        from ..masks import mask_from_anchors

        image = image_loader(record)
        w, h = (round(v) for v in g["size"])
        if image.shape[:2] != (h, w):
            raise ValueError(f"record {rid}: image is {image.shape[1]}x{image.shape[0]}, getok.size is {w}x{h}")
        norm = [p for s in shapes_from_pixels(masks, (w, h), g["frame"]) for p in s.points]
        mask = mask_from_anchors(norm, image, g["frame"], generator)
        if no_target:  # a mask where there is nothing: a miss that adds its pixels to the union
            return SampleScore(**base, status="ok", union=int(mask.sum()), reason=NO_TARGET)
        inter, union = int((mask & target).sum()), int((mask | target).sum())
        iou = inter / union if union else 0.0
        return SampleScore(**base, status="ok", iou=iou, inter=inter, union=union, hit=iou >= 0.5)
    # pointing
    points = _shapes(pred, "point")
    boxes = _boxes(g.get("shapes") or []) + [tuple(b) for b in g.get("boxes") or []]
    gt_points = [p for s in g.get("shapes") or [] if s.get("kind") == "point" for p in s["points"]]
    if target is None and not boxes and not gt_points:
        return _no_target(base, found=bool(points))
    if not points:
        return _miss(task, base, "no_shape", g, "no point in the answer")
    x, y = np.asarray(points[0]["points"][0], dtype=np.float64)
    if target is not None:
        h, w = target.shape
        hit = bool(target[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)])
    elif boxes:
        hit = any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes)
    else:  # only target points: within one grid cell (L-infinity, in the model's frame), as the RL reward
        size, frame = tuple(g["size"]), g["frame"]
        cell = 1.0 / int((g.get("config") or {}).get("grid", 32))
        d = np.abs(points_to_frame([[x, y]], size, frame) - points_to_frame(gt_points, size, frame)).max(-1)
        hit = bool((d <= cell + 1e-9).any())
    return SampleScore(**base, status="ok", hit=hit)


def in_view(getok: dict) -> dict | None:
    """``getok`` with its targets as the model sees them (its frame's region of the image): boxes clipped to it,
    points outside it dropped, the mask (``_region_mask``) cut to it; None when targets existed and none is in view.
    The whole image for ``pad`` and ``orig``: ``getok`` itself."""
    region = frame_region(tuple(getok["size"]), getok["frame"])
    w, h = getok["size"]
    if region == (0.0, 0.0, float(w), float(h)):
        return getok
    x0, y0, x1, y1 = region
    shapes = []
    for s in getok.get("shapes") or []:
        pts = np.asarray(s["points"], dtype=np.float64)
        if s["kind"] == "box":
            lo, hi = np.maximum(pts.min(0), [x0, y0]), np.minimum(pts.max(0), [x1, y1])
            if (hi > lo).all():
                shapes.append({"kind": "box", "points": [lo.tolist(), hi.tolist()]})
        else:
            inside = pts[((pts >= [x0, y0]) & (pts <= [x1, y1])).all(1)]
            if len(inside):
                shapes.append({"kind": s["kind"], "points": inside.tolist()})
    boxes = [b for b in ([max(b[0], x0), max(b[1], y0), min(b[2], x1), min(b[3], y1)] for b in getok.get("boxes") or [])
             if b[2] > b[0] and b[3] > b[1]]
    out = {**getok, "shapes": shapes, "boxes": boxes, "region": region}
    had = bool(getok.get("shapes") or getok.get("boxes") or _target_mask(getok) is not None)
    return out if not had or shapes or boxes or _target_mask(out) is not None else None


def _target_mask(getok: dict):
    """The ground-truth mask (cut to the frame's region, set by :func:`in_view`), or None when there is none or it
    holds no pixel (nothing to find)."""
    mask = record_mask(getok)
    if mask is not None and "region" in getok:
        mask = mask & pixels_in_region(*mask.shape, getok["region"])
    return mask if mask is not None and mask.any() else None


def _no_target(base, found: bool) -> SampleScore:
    """A record whose expression names nothing: answering with no shape is the hit (gRefCOCO)."""
    return SampleScore(**base, status="ok", iou=0.0 if found else 1.0, hit=not found, reason=NO_TARGET)


def _miss(task, base, status, getok, reason=""):
    union = 0
    if task == "res":  # a missed mask still adds the target's area (as the model sees it) to the cumulative union
        m = _target_mask(getok)
        union = int(m.sum()) if m is not None else 0
    return SampleScore(**base, status=status, union=union, reason=reason)


def aggregate(scores: list[SampleScore]) -> dict:
    """Per task, per split (and ``all``): the metrics and the counts of misses by kind and of skips.

    >>> s = [SampleScore("a", "rec", "val", "ok", iou=0.9), SampleScore("b", "rec", "val", "unparseable")]
    >>> aggregate(s)["rec"]["val"]["acc@0.5"], aggregate(s)["rec"]["val"]["miou"]
    (0.5, 0.45)
    """
    groups: dict[str, dict[str, list[SampleScore]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        groups[s.task][s.split].append(s)
        groups[s.task]["all"].append(s)
    out: dict = {}
    for task, splits in sorted(groups.items()):
        out[task] = {}
        for split, ss in sorted(splits.items(), key=lambda kv: (kv[0] == "all", kv[0])):
            if len(splits) == 2 and split == "all":
                continue  # one split only: its "all" row would repeat it
            out[task][split] = summarize(task, ss)
    return out


def summarize(task: str, scores: list[SampleScore]) -> dict:
    scored = [s for s in scores if s.status not in ("skipped", "outside")]
    n = len(scored)
    row: dict = {"n": n}
    for status in MISS_STATUSES:
        row[status] = sum(s.status == status for s in scored)
    row["skipped"] = sum(s.status == "skipped" for s in scores)
    row["outside"] = sum(s.status == "outside" for s in scores)
    row["no_target"] = sum(s.reason == NO_TARGET for s in scored)
    if task == "rec":
        iou = np.array([s.iou for s in scored])
        for t in THRESHOLDS:
            row[f"acc@{t}"] = float((iou >= t).mean()) if n else None
        row["miou"] = float(iou.mean()) if n else None
    elif task == "res":
        inter, union = sum(s.inter for s in scored), sum(s.union for s in scored)
        row["ciou"] = inter / union if union else None
        row["giou"] = float(np.mean([s.iou for s in scored])) if n else None
    elif task == "point":
        row["acc"] = float(np.mean([s.hit for s in scored])) if n else None
    return row


def score_all(records: list[dict], predictions: dict[str, dict], image_loader=None, generator=None) -> list[SampleScore]:
    """Score every record (a record without a prediction is ``missing``); a record that cannot be scored is a
    ValueError (RecordsError) naming it."""
    out = []
    for k, r in enumerate(records):
        try:
            out.append(score_record(r, predictions.get(str(r.get("id"))), image_loader, generator))
        except ValueError as e:
            message = str(e)
            raise RecordsError(message if message.startswith("record ") else f"record {k} (id {r.get('id')}): {message}") from None
    return out


def scores_as_dicts(scores: list[SampleScore]) -> list[dict]:
    return [asdict(s) for s in scores]

"""Scores of grounding answers for GRPO: plain functions of parsed shapes and ground truth in the normalised frame,
unit-tested with hand-computed values (``format_score``, ``repetition_score``, ``box_score``, ``mask_score``,
``points_score``, ``refine_score``), and the ground truth of a record (:class:`Target`). :mod:`llava_getok.rl.rewards`
wraps them as trl reward callables.

Why these shapes of score (docs/pitfalls.md, "GRPO with grounding"): IoU alone is sparse and teaches whole-image
boxes, so the box score adds an L1 term on the corners and penalises near-whole-image and extra boxes; an empty or
hedged answer must not score, so parse errors, missing shapes and GETok look-alikes in text all give 0.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np

from ..codec import Shape, apply_refinement
from ..geometry import box_area, box_iou, mask_iou, points_from_frame
from ..parse import ParseResult, parse, parse_ids
from ..records import check_getok, record_mask, shapes_from_pixels
from ..vocab import TOKEN_RE, GETokConfig

GRID_TASKS = ("rec", "det", "res", "point")  # tasks judged by the grid stage
BOX_TASKS = ("rec", "det")


def record_task(getok: dict) -> str:
    """The task a reward judges: "refine" for two-turn refine records (convert-datasets writes them as
    ``task`` rec/res with ``config.mode`` refine), else ``getok.task``."""
    if getok.get("task") == "refine" or (getok.get("config") or {}).get("mode") == "refine":
        return "refine"
    return getok["task"]


@dataclass(frozen=True)
class RewardConfig:
    """Weights and thresholds of every reward (the defaults are the documented ones).

    think: the answer must be ``<think>...</think><answer>...</answer>`` (exactly one of each, in order).
    box_iou: weight of IoU per matched box pair.
    box_l1: weight of (1 - L1) per matched pair, L1 = mean |corner difference| in the normalised frame: a dense
        term that still ranks misses by distance when IoU is 0.
    extra_box_penalty: subtracted per predicted box beyond the number of ground-truth boxes.
    whole_image_area: a predicted box covering at least this share of the image counts as "whole image"...
    whole_image_penalty: ...and costs this much, unless a ground-truth box is that large too.
    point_inside: reward for the share of predicted points inside the target.
    points_per_target: predicted points allowed per ground-truth object before the penalty applies.
    too_many_points_penalty: subtracted per point beyond that allowance.
    refine_point: weight of the mean per-point refinement score (+1 / 0 / -1).
    refine_iou_gain: weight of IoU(refined box) - IoU(first-answer box), summed over matched boxes.
    repetition_penalty: weight of the share of repeated sentences (the reward is minus this times the share).
    """

    think: bool = False
    box_iou: float = 1.0
    box_l1: float = 1.0
    extra_box_penalty: float = 0.5
    whole_image_area: float = 0.9
    whole_image_penalty: float = 1.0
    point_inside: float = 1.0
    points_per_target: int = 1
    too_many_points_penalty: float = 0.25
    refine_point: float = 1.0
    refine_iou_gain: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "think" and (not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"RewardConfig.{f.name} must be a non-negative number, got {v!r}")
        if not 0 < self.whole_image_area <= 1:
            raise ValueError(f"RewardConfig.whole_image_area must be in (0, 1], got {self.whole_image_area}")

    def to_dict(self) -> dict:
        return asdict(self)


# -- ground truth --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Ground truth of one record in the model's normalised frame (built from the ``getok`` column)."""

    task: str  # see record_task
    boxes: np.ndarray  # (N, 4) normalised
    points: np.ndarray  # (M, 2) normalised: ground-truth points (point task)
    size: tuple[int, int]  # (W, H) of the original image
    frame: str
    mask: np.ndarray | None  # (H, W) bool in original pixels, when the record carries one
    config: GETokConfig
    proposals: dict | None = None  # the proposal generator the converter used for the mask anchors


def target_from_getok(getok) -> Target:
    """The ``getok`` field of a converted record (dict or its JSON text) -> :class:`Target`."""
    g = check_getok(json.loads(getok) if isinstance(getok, str) else getok)
    size = (int(g["size"][0]), int(g["size"][1]))
    shapes = shapes_from_pixels(g["shapes"], size, g["frame"])
    return Target(
        task=record_task(g),
        boxes=np.asarray([s.box for s in shapes if s.kind == "box"], dtype=np.float64).reshape(-1, 4),
        points=np.asarray([s.points[0] for s in shapes if s.kind == "point"], dtype=np.float64).reshape(-1, 2),
        size=size,
        frame=g["frame"],
        mask=record_mask(g),
        config=GETokConfig.from_dict(g.get("config", {})),
        proposals=g.get("proposals"),
    )


@lru_cache(maxsize=64)
def _cached_target(getok_json: str) -> Target:
    return target_from_getok(getok_json)


def target_of(getok) -> Target:
    return _cached_target(getok if isinstance(getok, str) else json.dumps(getok, sort_keys=True))


# -- parsing a completion strictly ---------------------------------------------------------------------------

THINK_RE = re.compile(
    r"\A\s*<think>((?:(?!</?think>|</?answer>).)*)</think>\s*<answer>((?:(?!</?think>|</?answer>).)*)</answer>\s*\Z",
    re.DOTALL,  # without DOTALL a multi-line answer never matches (open-r1#237)
)


def answer_span(text: str, think: bool) -> tuple[int, int] | None:
    """Character span of the answer in ``text``; None when ``think`` and the structure is wrong.

    >>> answer_span("<think>a\\nb</think><answer>x</answer>", True)
    (26, 27)
    >>> answer_span("<think>a</think><answer>x</answer><answer>y</answer>", True) is None  # repeated block
    True
    """
    if not think:
        return 0, len(text)
    m = THINK_RE.match(text)
    return m.span(2) if m else None


def parse_completion(text: str, ids, id_to_token: dict[int, str] | None, cfg: GETokConfig, think: bool = False):
    """Parse the answer of one completion. Returns (ParseResult, None) or (None, reason).

    With ``id_to_token`` (training) the shapes come from the token ids, and the decoded text must hold exactly
    as many GETok tokens as the ids do: a GETok-looking string spelled with ordinary pieces is rejected. The
    think/answer structure is read from the text; with ``think`` only the GETok tokens inside ``<answer>`` count.
    Without ``id_to_token`` the text is parsed (ground truth and offline use).
    """
    span = answer_span(text, think)
    if span is None:
        return None, "format"
    if id_to_token is None:
        res = parse(text[span[0] : span[1]], cfg)
    else:
        ids = [int(t) for t in ids]
        getok_positions = [k for k, t in enumerate(ids) if t in id_to_token]
        if len(getok_positions) != len(TOKEN_RE.findall(text)):
            return None, "lookalike"
        before = len(TOKEN_RE.findall(text[: span[0]]))
        inside = len(TOKEN_RE.findall(text[span[0] : span[1]]))
        if inside == 0:
            res = ParseResult()
        else:
            first, last = getok_positions[before], getok_positions[before + inside - 1]
            res = parse_ids(ids[first : last + 1], id_to_token, cfg)
    if res.errors:
        return None, "parse"
    return res, None


# -- pure scores ---------------------------------------------------------------------------------------------

def format_score(text: str, result: ParseResult | None, expect_shapes: bool, think: bool) -> float:
    """1.0 when the structure is right (think/answer blocks if asked), the GETok groups parse without error
    and shapes are present exactly when expected; else 0.0."""
    if result is None or answer_span(text, think) is None:
        return 0.0
    has = bool(result.shapes) or bool(result.refinements)
    return 1.0 if has == expect_shapes else 0.0


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;\n])\s*|\s*</?(?:think|answer)>\s*")


def repetition_score(text: str) -> float:
    """Minus the share of sentences that repeat an earlier one (case and spacing ignored); 0 for < 2 sentences.

    >>> repetition_score("A cat. A cat. a  cat. A dog.")
    -0.5
    """
    sents = [" ".join(s.lower().split()) for s in _SENTENCE_SPLIT.split(text)]
    sents = [s for s in sents if s and s not in ".!?;"]
    if len(sents) < 2:
        return 0.0
    return -(len(sents) - len(set(sents))) / len(sents)


def _match(cost: np.ndarray):
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(cost)


def image_coverage(boxes, image_box=(0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    """Share of the image (its box in the frame: with ``pad`` the image is a band of the square) that each
    normalised box covers.

    >>> image_coverage([[0, 0.125, 1, 0.875], [0, 0, 1, 0.5]], (0, 0.125, 1, 0.875)).tolist()
    [1.0, 0.5]
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    im = np.asarray(image_box, dtype=np.float64)
    inter = np.concatenate([np.maximum(b[:, :2], im[:2]), np.minimum(b[:, 2:], im[2:])], -1)
    area = box_area(im)
    return box_area(inter) / area if area > 0 else np.zeros(len(b))


def box_score(pred, gt, cfg: RewardConfig = RewardConfig(), image_box=(0.0, 0.0, 1.0, 1.0)) -> float:
    """Reward of predicted boxes (P, 4) against ground-truth boxes (G, 4), both normalised.

    Pairs are matched one-to-one (Hungarian on -(w_iou IoU + w_l1 (1 - L1))); each matched pair earns
    ``box_iou * IoU + box_l1 * (1 - L1)``; the sum is divided by max(P, G), so missed and extra objects both
    dilute it; then ``extra_box_penalty`` per box beyond G and ``whole_image_penalty`` per predicted box that
    covers ``whole_image_area`` of the image (``image_box``: where the image lies in the frame), unless a
    ground-truth box does too. No ground truth and no prediction: full marks (box_iou + box_l1).

    >>> round(box_score([[0, 0, 0.5, 0.5]], [[0, 0, 0.5, 0.25]]), 4)  # IoU 0.5, L1 0.0625
    1.4375
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    if len(p) == 0 and len(g) == 0:
        return cfg.box_iou + cfg.box_l1
    score = 0.0
    if len(p) and len(g):
        iou = box_iou(p[:, None, :], g[None, :, :])
        l1 = np.abs(p[:, None, :] - g[None, :, :]).mean(-1)
        gain = cfg.box_iou * iou + cfg.box_l1 * (1.0 - l1)
        rows, cols = _match(-gain)
        score = float(gain[rows, cols].sum()) / max(len(p), len(g))
    score -= cfg.extra_box_penalty * max(0, len(p) - len(g))
    gt_whole = len(g) and bool((image_coverage(g, image_box) >= cfg.whole_image_area).any())
    if not gt_whole and len(p):
        score -= cfg.whole_image_penalty * int((image_coverage(p, image_box) >= cfg.whole_image_area).sum())
    return score


def inside_target(points, target: Target, tol: float | None = None) -> np.ndarray:
    """Which normalised points (N, 2) lie inside the target: its mask if the record has one, else any of its
    boxes, else within ``tol`` (default: one grid cell, L-infinity) of one of its points."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if target.mask is not None:
        w, h = target.size
        px = points_from_frame(p, target.size, target.frame, clamp=False)
        on_image = ((px >= 0) & (px < (w, h))).all(1)  # points on the padding are outside
        ij = np.clip(np.floor(px).astype(int), 0, (w - 1, h - 1))
        return target.mask[ij[:, 1], ij[:, 0]] & on_image
    if len(target.boxes):
        b = target.boxes
        return ((p[:, None, 0] >= b[None, :, 0]) & (p[:, None, 0] <= b[None, :, 2])
                & (p[:, None, 1] >= b[None, :, 1]) & (p[:, None, 1] <= b[None, :, 3])).any(1)
    if len(target.points):
        tol = 1.0 / target.config.grid if tol is None else tol
        return (np.abs(p[:, None, :] - target.points[None]).max(-1) <= tol).any(1)
    return np.zeros(len(p), dtype=bool)


def points_score(inside, n_targets: int, cfg: RewardConfig = RewardConfig()) -> float:
    """``point_inside`` x (share of predicted points inside the target) minus ``too_many_points_penalty`` per
    point beyond ``points_per_target * n_targets``. No points predicted: 0.

    >>> points_score([True, True, False], n_targets=1)  # 2/3 inside, 2 points too many
    0.16666666666666663
    """
    inside = np.asarray(inside, dtype=bool)
    if len(inside) == 0:
        return 0.0
    allowed = cfg.points_per_target * max(1, n_targets)
    return cfg.point_inside * float(inside.mean()) - cfg.too_many_points_penalty * max(0, len(inside) - allowed)


def mask_score(pred_mask, gt_mask) -> float:
    """IoU of the predicted and ground-truth masks (same shape)."""
    return mask_iou(pred_mask, gt_mask)


def refine_point_scores(first_points, offsets, inside_fn, step: float, half: int) -> list[int]:
    """Per earlier point: +1 if it ends inside (moved or kept), or is deleted validly; -1 if an offset moves it
    from inside to outside; 0 otherwise (kept outside, moved outside from outside, invalid delete).

    A ``<delete>`` (offset None) is valid only if no position of the point's offset neighbourhood
    (p + (dx, dy) * step for |dx|, |dy| <= half: the 3 x 3 step neighbourhood for m = 3) is inside.
    ``inside_fn`` maps (N, 2) normalised points to (N,) bools.
    """
    first = np.asarray(first_points, dtype=np.float64).reshape(-1, 2)
    was_in = inside_fn(first)
    d = np.arange(-half, half + 1)
    ring = np.stack(np.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2) * step
    scores = []
    for k, (p, o) in enumerate(zip(first, offsets)):
        if o is None:
            near = np.clip(p[None] + ring, 0.0, 1.0)
            scores.append(0 if inside_fn(near).any() else 1)
            continue
        now_in = bool(inside_fn(np.clip(p + np.asarray(o) * step, 0.0, 1.0)[None])[0])
        scores.append(1 if now_in else (-1 if was_in[k] else 0))
    return scores


def corner_inside_fn(corner, step: float):
    """Inside test for a box corner: within step / 2 (L-infinity) of the ground-truth corner, the precision one
    refinement round can reach."""
    c = np.asarray(corner, dtype=np.float64)
    return lambda pts: (np.abs(np.asarray(pts, dtype=np.float64).reshape(-1, 2) - c).max(-1) <= step / 2 + 1e-12)


def refine_score(first: list[Shape], refinements, target: Target, cfg: RewardConfig = RewardConfig()) -> float:
    """Refinement-stage reward: ``refine_point`` x mean per-point score + ``refine_iou_gain`` x the IoU gain of
    the refined boxes over the first answer's (boxes matched to ground truth one-to-one by first-answer IoU).

    Targets per point: box corners -> the matched ground-truth corner (:func:`corner_inside_fn`); points and
    mask anchors -> :func:`inside_target`. Raises ValueError when the refinement does not have the structure
    of the first answer (the caller scores that 0).
    """
    gcfg = target.config
    step, half = gcfg.step(1), gcfg.half
    apply_refinement(first, refinements, gcfg)  # raises ValueError on a structure mismatch
    first_boxes = [k for k, s in enumerate(first) if s.kind == "box"]
    match = {}
    if first_boxes and len(target.boxes):
        fb = np.array([first[k].box for k in first_boxes])
        rows, cols = _match(-box_iou(fb[:, None], target.boxes[None]))
        match = {first_boxes[r]: c for r, c in zip(rows, cols)}
    per_point, gain = [], 0.0
    for k, (shape, ref) in enumerate(zip(first, refinements)):
        if shape.kind == "box":
            if k not in match:  # an unmatched box: every corner should go
                per_point += [1 if o is None else 0 for o in ref.offsets]
                continue
            g = target.boxes[match[k]]
            for corner, gc, o in zip(shape.points, (g[:2], g[2:]), ref.offsets):
                per_point += refine_point_scores([corner], [o], corner_inside_fn(gc, step), step, half)
            after = apply_refinement([shape], [ref], gcfg)
            after_iou = float(box_iou(after[0].box, g)) if after else 0.0
            gain += after_iou - float(box_iou(shape.box, g))
        else:
            per_point += refine_point_scores(shape.points, ref.offsets, lambda q: inside_target(q, target), step, half)
    mean_point = float(np.mean(per_point)) if per_point else 0.0
    return cfg.refine_point * mean_point + cfg.refine_iou_gain * gain

"""Shapes <-> GETok tokens (spec sections 3-5). Pure numpy; the inverse of :mod:`llava_getok.parse`.

Convention: points are (x, y) and boxes (x1, y1, x2, y2) normalised to [0, 1] in the model's frame
(see :mod:`llava_getok.geometry`). Cell (i, j) has column i (x) and row j (y); its anchor is
``cfg.anchors``, offsets (dx, dy) of round r move by dx * s_r, dy * s_r (``cfg.step``); dy > 0 moves down.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .vocab import DELETE, KIND_TAGS, TAGS, GETokConfig

# Values this far outside [0, 1] are clipped silently; further out they are an error (a wrong frame or
# a pixel box passed as normalised is the usual cause).
CLIP_TOLERANCE = 0.01


@dataclass(frozen=True)
class Shape:
    """One grounded object: kind in ``vocab.SHAPE_KINDS``, its points in order, normalised in the model's
    frame (or in pixels where :mod:`llava_getok.records` reads a record's pixel shapes).

    A box has two points, (x1, y1) and (x2, y2) with x1 <= x2 and y1 <= y2. ``span`` is where the shape
    stood in parsed text (start, end) and takes no part in equality.
    """

    kind: str
    points: tuple[tuple[float, float], ...]
    span: tuple[int, int] = field(default=(0, 0), compare=False)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Bounding box of the points (the box itself for a box)."""
        p = np.asarray(self.points, dtype=np.float64)
        return (*p.min(0).tolist(), *p.max(0).tolist())


@dataclass(frozen=True)
class Refinement:
    """A refine-mode second answer for one shape: one (dx, dy) per earlier point, None for ``<delete>``."""

    kind: str
    offsets: tuple[tuple[int, int] | None, ...]
    span: tuple[int, int] = field(default=(0, 0), compare=False)


# -- validation ------------------------------------------------------------------------------------------

def check_points(points, what="point") -> np.ndarray:
    """Validate normalised points (N, 2): finite, within [0, 1] up to CLIP_TOLERANCE; return them clipped."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[-1] != 2 or len(p) == 0:
        raise ValueError(f"{what}: expected an (N >= 1, 2) array of (x, y), got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{what}: coordinates must be finite, got {p[~np.isfinite(p).all(1)][0].tolist()}")
    bad = (p < -CLIP_TOLERANCE) | (p > 1 + CLIP_TOLERANCE)
    if bad.any():
        raise ValueError(
            f"{what}: coordinate {p[bad.any(1)][0].tolist()} is outside the normalised frame [0, 1] "
            f"(tolerance {CLIP_TOLERANCE}); were pixel or 0-1000 coordinates passed as normalised?"
        )
    return np.clip(p, 0.0, 1.0)


def check_boxes(boxes, what="box") -> np.ndarray:
    """Validate normalised boxes (N, 4) as (x1, y1, x2, y2) with x1 <= x2, y1 <= y2; return them clipped."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[-1] != 4:
        raise ValueError(f"{what}: expected an (N, 4) array of (x1, y1, x2, y2), got shape {b.shape}")
    flipped = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if flipped.any():
        raise ValueError(f"{what}: x2 < x1 or y2 < y1 in {b[flipped][0].tolist()} (expected x1, y1, x2, y2)")
    return check_points(b.reshape(-1, 2), what).reshape(-1, 4)


# -- the two pure functions: points <-> (cells, offsets) -------------------------------------------------

def quantize(points, cfg: GETokConfig, rounds: int | None = None):
    """Normalised points (N, 2) in [0, 1] -> (cells (N, 2) int, offsets (N, R, 2) int).

    cells: ``cfg.cells``, i = min(floor(x n), n - 1); each round picks the d in {-h..h} that brings the
    running estimate (from the anchor, ``cfg.anchors``) closest to the target, ties to the smaller |d|.

    >>> cells, offs = quantize([[0.3, 0.99]], GETokConfig(grid=4, rounds=1))
    >>> cells.tolist(), offs.tolist()
    ([[1, 3]], [[[-1, 1]]])
    """
    rounds = cfg.rounds if rounds is None else rounds
    p = np.clip(np.asarray(points, dtype=np.float64).reshape(-1, 2), 0.0, 1.0)
    h = cfg.half
    cells = cfg.cells(p)
    est = cfg.anchors(cells)
    offsets = np.zeros((len(p), rounds, 2), dtype=np.int64)
    cand = np.arange(-h, h + 1)[np.argsort(np.abs(np.arange(-h, h + 1)), kind="stable")]  # 0, -1, 1, -2, 2...
    for r in range(rounds):
        s = cfg.step(r + 1)
        # distances for every candidate d, in order of increasing |d|; argmin takes the first minimum,
        # and rounding to 1e-12 makes exact ties (in real arithmetic) ties in floating point too.
        dist = np.round(np.abs(p[:, None, :] - (est[:, None, :] + cand[None, :, None] * s)), 12)
        d = cand[np.argmin(dist, axis=1)]
        offsets[:, r] = d
        est = est + d * s
    return cells, offsets


def dequantize(cells, offsets, cfg: GETokConfig) -> np.ndarray:
    """(cells (N, 2), offsets (N, R, 2)) -> normalised points (N, 2): anchor + sum_r d_r s_r, clipped.

    >>> dequantize([[1, 3]], [[[0, 1]]], GETokConfig(grid=4, rounds=1)).tolist()
    [[0.375, 1.0]]
    """
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
    offsets = np.asarray(offsets, dtype=np.float64).reshape(len(cells), -1, 2)
    p = cfg.anchors(cells) + (offsets * cfg.steps(offsets.shape[1])[None, :, None]).sum(1)
    return np.clip(p, 0.0, 1.0)


# -- tokens ---------------------------------------------------------------------------------------------

def _points_tokens(points, cfg: GETokConfig) -> list[str]:
    """Token string of each point: its grid token, plus its offsets in inline mode."""
    rounds = cfg.inline_rounds
    cells, offsets = quantize(points, cfg, rounds)
    n, h, m = cfg.grid, cfg.half, cfg.offset_levels
    grid, off = cfg.grid_tokens, cfg.offset_tokens
    gi = (cells[:, 1] * n + cells[:, 0]).tolist()
    if rounds == 0:
        return [grid[k] for k in gi]
    oi = ((offsets[..., 1] + h) * m + offsets[..., 0] + h).tolist()
    return [grid[k] + "".join(off[o] for o in os) for k, os in zip(gi, oi)]


def _wrap(kind: str, body: str) -> str:
    if kind == "point":
        return body
    open_, close = TAGS[KIND_TAGS[kind]]
    return open_ + body + close


def encode_point(xy, cfg: GETokConfig) -> str:
    """Normalised (x, y) -> tokens.

    >>> encode_point((0.3, 0.99), GETokConfig(grid=4, rounds=1))
    '<grid_1_3><off_-1_1>'
    """
    return _points_tokens(check_points([xy], "point"), cfg)[0]


def encode_box(box, cfg: GETokConfig) -> str:
    """Normalised (x1, y1, x2, y2) -> ``<box>`` P(top-left) P(bottom-right) ``</box>``.

    >>> encode_box((0.1, 0.2, 0.6, 0.9), GETokConfig(grid=4, mode="grid"))
    '<box><grid_0_0><grid_2_3></box>'
    """
    return encode_boxes([box], cfg)[0]


def encode_boxes(boxes, cfg: GETokConfig) -> list[str]:
    """Batch of normalised boxes (N, 4) -> one token string per box (vectorised)."""
    b = check_boxes(boxes)
    t = _points_tokens(b.reshape(-1, 2), cfg)
    open_, close = TAGS["box"]
    return [open_ + t[2 * k] + t[2 * k + 1] + close for k in range(len(b))]


def _lattice(points, cfg: GETokConfig) -> np.ndarray:
    """Where each point decodes to (its quantised position on the token lattice of cfg's mode)."""
    return dequantize(*quantize(points, cfg, cfg.inline_rounds), cfg)


def decode_boxes(texts, cfg: GETokConfig) -> np.ndarray:
    """Batch inverse of :func:`encode_boxes` (vectorised): each text must be exactly one box as written by
    ``encode_boxes`` with the same config; otherwise ValueError naming the first bad text's index."""
    rounds = cfg.inline_rounds
    point = r"<grid_(\d+)_(\d+)>" + r"<off_(-?\d+)_(-?\d+)>" * rounds
    texts = list(texts)
    nums = re.findall(TAGS["box"][0] + point + point + TAGS["box"][1], "\n".join(texts))
    if len(nums) != len(texts):
        for k, t in enumerate(texts):
            if not re.fullmatch(TAGS["box"][0] + point + point + TAGS["box"][1], t):
                raise ValueError(f"text {k} is not one box of this config (grid={cfg.grid}, rounds={rounds}): {t!r}")
    a = np.asarray(nums, dtype=np.int64).reshape(len(texts), 2, 2 + 2 * rounds)
    cells = a[:, :, :2].reshape(-1, 2)
    if (cells >= cfg.grid).any():
        raise ValueError(f"a grid index is outside the {cfg.grid}x{cfg.grid} grid")
    pts = dequantize(cells, a[:, :, 2:].reshape(len(cells), rounds, 2), cfg)
    return pts.reshape(-1, 4)


def encode_polyline(points, cfg: GETokConfig) -> str:
    """Vertices in order -> ``<pl>`` ... ``</pl>``; consecutive vertices that quantise to the same lattice
    point (the same cell in grid mode) are merged."""
    p = check_points(points, "polyline")
    q = _lattice(p, cfg)
    keep = np.ones(len(p), dtype=bool)
    keep[1:] = (q[1:] != q[:-1]).any(1)
    return _wrap("polyline", "".join(_points_tokens(p[keep], cfg)))


def encode_mask_points(points, cfg: GETokConfig) -> str:
    """Mask anchor points -> ``<seg>`` ... ``</seg>``, row-major (j, then i), each lattice point once (one
    point per cell in grid mode). Order and duplicates are judged on the quantised points, so that
    re-encoding decoded points reproduces the same sequence."""
    p = check_points(points, "mask anchors")
    q = _lattice(p, cfg)
    cell = cfg.cells(q)
    order = np.lexsort((q[:, 0], q[:, 1], cell[:, 0], cell[:, 1]))
    q_sorted = q[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = (q_sorted[1:] != q_sorted[:-1]).any(1)
    return _wrap("mask", "".join(_points_tokens(p[order[keep]], cfg)))


def encode_shape(shape: Shape, cfg: GETokConfig) -> str:
    if shape.kind == "box":
        return encode_box(shape.box, cfg)
    if shape.kind == "point":
        return encode_point(shape.points[0], cfg)
    if shape.kind == "polyline":
        return encode_polyline(shape.points, cfg)
    if shape.kind == "mask":
        return encode_mask_points(shape.points, cfg)
    raise ValueError(f"unknown shape kind {shape.kind!r}; expected point, box, polyline or mask")


def render(shapes, cfg: GETokConfig, sep: str = " ") -> str:
    """Shapes -> one answer string, groups separated by ``sep``; the inverse of ``parse(...).shapes``."""
    return sep.join(encode_shape(s, cfg) for s in shapes)


# -- refine mode (spec section 5) -----------------------------------------------------------------------

def refinement_offsets(first_points, target_points, cfg: GETokConfig) -> list[tuple[int, int]]:
    """For each earlier (decoded) point, the round-1 offset that moves it closest to its target."""
    first = np.asarray(first_points, dtype=np.float64).reshape(-1, 2)
    target = check_points(target_points, "refinement target")
    h, s = cfg.half, cfg.step(1)
    x = (target - first) / s
    d = np.clip(np.sign(x) * np.ceil(np.round(np.abs(x) - 0.5, 12)), -h, h).astype(int)  # ties to smaller |d|
    return [tuple(x) for x in d.tolist()]


def encode_refinement(refinements, cfg: GETokConfig) -> str:
    """Refinements (one per earlier shape) -> ``<offset>`` same structure with offsets ``</offset>``."""
    open_, close = TAGS["offset"]
    body = " ".join(
        _wrap(r.kind, "".join(DELETE if o is None else cfg.offset_token(*o) for o in r.offsets)) for r in refinements
    )
    return open_ + body + close


def apply_refinement(shapes, refinements, cfg: GETokConfig) -> list[Shape]:
    """Move each earlier shape's points by its refinement; ``<delete>`` drops a point (a box with a deleted
    corner is dropped whole). Raises ValueError when the structures differ."""
    if len(shapes) != len(refinements):
        raise ValueError(f"refinement has {len(refinements)} groups for {len(shapes)} earlier shapes")
    s = cfg.step(1)
    out = []
    for k, (shape, ref) in enumerate(zip(shapes, refinements)):
        if shape.kind != ref.kind or len(shape.points) != len(ref.offsets):
            raise ValueError(
                f"refinement group {k} is a {ref.kind} with {len(ref.offsets)} offsets, earlier shape is a "
                f"{shape.kind} with {len(shape.points)} points"
            )
        pts = [
            (min(max(x + o[0] * s, 0.0), 1.0), min(max(y + o[1] * s, 0.0), 1.0))
            for (x, y), o in zip(shape.points, ref.offsets)
            if o is not None
        ]
        if not pts or (shape.kind == "box" and len(pts) != 2):
            continue
        if shape.kind == "box":
            (x1, y1), (x2, y2) = pts
            pts = [(min(x1, x2), min(y1, y2)), (max(x1, x2), max(y1, y2))]
        out.append(Shape(shape.kind, tuple(pts), shape.span))
    return out

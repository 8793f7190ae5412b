"""Frames and overlap: pixels <-> the normalised frame the model sees, and (generalised) IoU.

Frames (spec section 1; which one a model sees is read off its image processor: :mod:`llava_getok.frames`):
- ``pad``: LLaVA's ``expand2square`` pastes the W x H image into an S x S square, S = max(W, H), at the
  integer offset ((S - W) // 2, (S - H) // 2). Normalised x' = (x + (S - W) // 2) / S, likewise y.
  We use LLaVA's integer offset rather than (S - W) / 2 so coordinates follow the pixels the model saw.
- ``orig``: x' = x / W, y' = y / H (the whole image, stretched or not: Qwen2-VL's ``smart_resize`` too).
- ``crop``: what a CLIP-style processor keeps: the shortest edge resized to E, the long one to
  ``int(E * long / short)`` (transformers' ``get_resize_output_image_size``), then a centre crop of CW x CH at
  ``((W' - CW) // 2, (H' - CH) // 2)`` of the resized W' x H' image (transformers' ``center_crop``; a crop larger
  than the image pads it at the same offset). x' = (x W' / W - (W' - CW) // 2) / CW, likewise y. Named ``crop``
  for LLaVA-1.5's tower (clip-vit-large-patch14-336: E = CW = CH = 336), ``crop:E`` for a square crop of side E,
  ``crop:E:CWxCH`` otherwise; with E = CW = CH it keeps the central min(W, H) square (up to the processor's
  rounding, which these formulas repeat).

Every function is vectorised: points are arrays (..., 2), boxes (..., 4) as (x1, y1, x2, y2).
"""
from __future__ import annotations

import math
import re

import numpy as np

FRAMES = ("pad", "orig", "crop")
FRAME_NAMES = "pad, orig or crop (crop:E, crop:E:WxH: E the processor's shortest edge, W x H its crop)"
CLIP_336 = (336, 336, 336)  # LLaVA-1.5's tower: shortest edge, crop width, crop height; the frame called "crop"
_CROP_RE = re.compile(r"crop(?::([1-9][0-9]{0,5})(?::([1-9][0-9]{0,5})x([1-9][0-9]{0,5}))?)?")


def crop_frame(shortest_edge: int, crop_width: int, crop_height: int) -> str:
    """The name of the frame of a processor that resizes the shortest edge to ``shortest_edge`` and centre-crops
    ``crop_width`` x ``crop_height``.

    >>> crop_frame(336, 336, 336), crop_frame(224, 224, 224), crop_frame(256, 224, 224)
    ('crop', 'crop:224', 'crop:256:224x224')
    """
    e, cw, ch = (int(v) for v in (shortest_edge, crop_width, crop_height))
    if min(e, cw, ch) <= 0:
        raise ValueError(f"a crop frame needs positive sizes, got shortest edge {e}, crop {cw} x {ch}")
    if (e, cw, ch) == CLIP_336:
        return "crop"
    return f"crop:{e}" if cw == ch == e else f"crop:{e}:{cw}x{ch}"


def crop_sizes(frame: str) -> tuple[int, int, int] | None:
    """(shortest edge, crop width, crop height) of a crop frame; None for ``pad`` and ``orig``; ValueError for a
    name that is not a frame."""
    if frame in ("pad", "orig"):
        return None
    m = _CROP_RE.fullmatch(frame) if isinstance(frame, str) else None
    if m is None:
        raise ValueError(f"frame must be one of {FRAME_NAMES}, got {frame!r}")
    e, cw, ch = m.groups()
    if e is None:
        return CLIP_336
    return (int(e), int(cw or e), int(ch or e))


def check_frame(frame) -> str:
    """``frame`` in its one spelling (``crop:336`` is ``crop``); ValueError for anything that is not a frame."""
    sizes = crop_sizes(frame)
    return frame if sizes is None else crop_frame(*sizes)


def _crop_affine(w, h, e, cw, ch):
    """(offset, scale) of the crop frame, with the processor's own integer arithmetic."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(e * long / short)  # transformers: int(requested_new_short * long / short)
    rw, rh = (e, new_long) if w <= h else (new_long, e)
    left, top = (rw - cw) // 2, (rh - ch) // 2
    return (np.array([-left * w / rw, -top * h / rh], dtype=np.float64),
            np.array([cw * w / rw, ch * h / rh], dtype=np.float64))


def _frame_affine(size, frame):
    """Return (offset_xy, scale_xy) with normalised = (pixel + offset) / scale."""
    w, h = size
    if not (np.isfinite(w) and np.isfinite(h)) or w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive and finite, got {size!r}")
    if frame == "pad":
        s = max(w, h)
        return np.array([(s - w) // 2, (s - h) // 2], dtype=np.float64), np.array([s, s], dtype=np.float64)
    if frame == "orig":
        return np.zeros(2), np.array([w, h], dtype=np.float64)
    return _crop_affine(w, h, *crop_sizes(frame))


def frame_region(size, frame) -> tuple[float, float, float, float]:
    """The part of the W x H image the model sees in ``frame``, as a pixel box (x1, y1, x2, y2): the whole image for
    ``pad`` and ``orig``, what the centre crop keeps for a crop frame.

    >>> [round(v, 2) for v in frame_region((640, 426), "crop")]  # 640 x 426 -> 504 x 336, 84 px cut each side
    [106.67, 0.0, 533.33, 426.0]
    """
    off, scale = _frame_affine(size, frame)
    lo, hi = np.maximum(-off, 0.0), np.minimum(scale - off, np.asarray(size, dtype=np.float64))
    return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


def pixels_in_region(height: int, width: int, region) -> np.ndarray:
    """(height, width) bool: the pixels whose centre lies in ``region`` = (x1, y1, x2, y2), e.g. :func:`frame_region`.

    >>> pixels_in_region(2, 4, (1.0, 0.0, 2.6, 2.0)).astype(int).tolist()
    [[0, 1, 1, 0], [0, 1, 1, 0]]
    """
    x0, y0, x1, y1 = region
    keep = np.zeros((height, width), dtype=bool)
    keep[max(0, math.ceil(y0 - 0.5)) : max(0, math.floor(y1 - 0.5) + 1),
         max(0, math.ceil(x0 - 0.5)) : max(0, math.floor(x1 - 0.5) + 1)] = True
    return keep


def points_to_frame(points, size, frame):
    """Pixel points (..., 2) of an image of ``size`` = (W, H) -> normalised points in ``frame``.

    >>> points_to_frame([[0, 0], [640, 480]], (640, 480), "pad").tolist()
    [[0.0, 0.125], [1.0, 0.875]]
    """
    off, scale = _frame_affine(size, frame)
    return (np.asarray(points, dtype=np.float64) + off) / scale


def points_from_frame(points, size, frame, clamp=True):
    """Normalised points (..., 2) in ``frame`` -> pixels of the original image, clamped to the part of it the model
    sees (:func:`frame_region`: the whole image but for a crop frame)."""
    off, scale = _frame_affine(size, frame)
    px = np.asarray(points, dtype=np.float64) * scale - off
    if clamp:
        x1, y1, x2, y2 = frame_region(size, frame)
        px = np.clip(px, [x1, y1], [x2, y2])
    return px


def boxes_to_frame(boxes, size, frame):
    """Pixel boxes (..., 4) -> normalised boxes in ``frame``."""
    b = np.asarray(boxes, dtype=np.float64)
    return points_to_frame(b.reshape(*b.shape[:-1], 2, 2), size, frame).reshape(b.shape)


def boxes_from_frame(boxes, size, frame, clamp=True):
    """Normalised boxes (..., 4) in ``frame`` -> pixel boxes of the original image, clamped as :func:`points_from_frame`."""
    b = np.asarray(boxes, dtype=np.float64)
    return points_from_frame(b.reshape(*b.shape[:-1], 2, 2), size, frame, clamp).reshape(b.shape)


def xywh_to_xyxy(boxes):
    """COCO [x, y, w, h] -> [x1, y1, x2, y2]."""
    b = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def box_area(boxes):
    b = np.asarray(boxes, dtype=np.float64)
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def _inter_union(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    lt = np.maximum(a[..., :2], b[..., :2])
    rb = np.minimum(a[..., 2:], b[..., 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def box_iou(a, b):
    """IoU of boxes a and b (broadcast over leading axes); 0 where the union is empty.

    >>> float(box_iou([0, 0, 2, 2], [1, 1, 3, 3]))
    0.14285714285714285
    """
    inter, union = _inter_union(a, b)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_giou(a, b):
    """Generalised IoU (Rezatofighi et al. 2019) in [-1, 1]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    inter, union = _inter_union(a, b)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    hull = box_area(np.concatenate([np.minimum(a[..., :2], b[..., :2]), np.maximum(a[..., 2:], b[..., 2:])], -1))
    return iou - np.divide(hull - union, hull, out=np.zeros_like(hull), where=hull > 0)


def mask_iou(a, b):
    """IoU of two boolean masks of the same shape; 0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0

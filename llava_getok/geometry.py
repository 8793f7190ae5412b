"""Frames and overlap: pixels <-> the normalised frame the model sees, and (generalised) IoU.

Frames (spec section 1):
- ``pad``: LLaVA's ``expand2square`` pastes the W x H image into an S x S square, S = max(W, H), at the
  integer offset ((S - W) // 2, (S - H) // 2). Normalised x' = (x + (S - W) // 2) / S, likewise y.
  We use LLaVA's integer offset rather than (S - W) / 2 so coordinates follow the pixels the model saw.
- ``orig``: x' = x / W, y' = y / H.

Every function is vectorised: points are arrays (..., 2), boxes (..., 4) as (x1, y1, x2, y2).
"""
from __future__ import annotations

import numpy as np

FRAMES = ("pad", "orig")


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
    raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")


def points_to_frame(points, size, frame):
    """Pixel points (..., 2) of an image of ``size`` = (W, H) -> normalised points in ``frame``.

    >>> points_to_frame([[0, 0], [640, 480]], (640, 480), "pad").tolist()
    [[0.0, 0.125], [1.0, 0.875]]
    """
    off, scale = _frame_affine(size, frame)
    return (np.asarray(points, dtype=np.float64) + off) / scale


def points_from_frame(points, size, frame, clamp=True):
    """Normalised points (..., 2) in ``frame`` -> pixels of the original image, clamped to it."""
    off, scale = _frame_affine(size, frame)
    px = np.asarray(points, dtype=np.float64) * scale - off
    if clamp:
        px = np.clip(px, 0.0, np.asarray(size, dtype=np.float64))
    return px


def boxes_to_frame(boxes, size, frame):
    """Pixel boxes (..., 4) -> normalised boxes in ``frame``."""
    b = np.asarray(boxes, dtype=np.float64)
    return points_to_frame(b.reshape(*b.shape[:-1], 2, 2), size, frame).reshape(b.shape)


def boxes_from_frame(boxes, size, frame, clamp=True):
    """Normalised boxes (..., 4) in ``frame`` -> pixel boxes of the original image, clamped to it."""
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

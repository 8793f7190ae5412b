"""Masks <-> GETok anchor points (spec section 6): proposal generators, the greedy, refine offsets.

A mask is written as a set of grid anchors; it is read back as the union of the proposals a generator
returns at those anchors. Generators are pluggable:

- :class:`SuperpixelGenerator` (default, no weights): the SLIC superpixel (scikit-image) containing the
  point. SLIC is deterministic, so the same image and point always give the same proposal.
- :class:`SamGenerator`: Segment Anything with a point prompt; imports ``segment_anything`` only when used.

All masks are boolean arrays (H, W) in pixels of the original image; points are normalised (x, y) in the
model's frame (:mod:`llava_getok.geometry`). Core module: numpy, scikit-image and pycocotools only.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from .geometry import points_from_frame, points_to_frame
from .vocab import GETokConfig

DEFAULT_TAU = 0.8
DEFAULT_MAX_POINTS = 64  # about 64-128 tokens per mask: beyond that an answer costs more than it says


def _as_rgb(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image array (H, W, 3), got shape {a.shape}")
    return a[..., :3]


def _image_key(image: np.ndarray) -> bytes:
    return hashlib.blake2b(image.tobytes(), digest_size=16, key=repr(image.shape).encode()).digest()


class SuperpixelGenerator:
    """The weight-free default: the SLIC superpixel containing each point (deterministic).

    n_segments: superpixels per image. The default 512 (half the cells of a 32 x 32 grid) keeps a typical
    COCO object at a few dozen anchors; finer segments fit masks better but cost more anchors and most
    superpixels then hold no anchor. Segmentations of the last ``cache_size`` images are kept, so several
    objects of one image cost one SLIC run.
    """

    def __init__(self, n_segments: int | None = 512, compactness: float = 10.0, cache_size: int = 8):
        self.n_segments, self.compactness, self.cache_size = n_segments, compactness, cache_size
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def config(self) -> dict:
        """What decoding needs to rebuild the same proposals (written to RES records as getok.proposals)."""
        return {"generator": "superpixel", "n_segments": self.n_segments, "compactness": self.compactness}

    def segments(self, image) -> np.ndarray:
        """Integer label map (H, W), labels 0..L-1."""
        from skimage.segmentation import slic

        rgb = _as_rgb(image)
        key = _image_key(rgb)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        labels = slic(rgb, n_segments=self.n_segments, compactness=self.compactness, start_label=0)
        self._cache[key] = labels
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return labels

    def masks_at(self, image, points_px) -> list[np.ndarray]:
        """One proposal per pixel point (x, y): the superpixel that contains it."""
        labels = self.segments(image)
        xy = _pixel_index(points_px, labels.shape)
        return [labels == labels[y, x] for x, y in xy]


class SamGenerator:
    """Segment Anything with one positive point prompt; the highest-scoring of SAM's masks.

    Needs ``pip install segment-anything`` (extra ``llava-getok[sam]``) and a checkpoint file; nothing is
    imported or loaded until the first call.
    """

    def __init__(self, checkpoint: str, model_type: str = "vit_h", device: str = "cpu"):
        self.checkpoint, self.model_type, self.device = checkpoint, model_type, device
        self._predictor = None
        self._key = None

    def config(self) -> dict:
        return {"generator": "sam", "model_type": self.model_type, "checkpoint": self.checkpoint}

    def _predictor_for(self, rgb):
        if self._predictor is None:
            try:
                from segment_anything import SamPredictor, sam_model_registry
            except ImportError:
                raise ImportError(
                    "SamGenerator needs the segment-anything package: pip install 'llava-getok[sam]' "
                    "(or pip install segment-anything); without a checkpoint use SuperpixelGenerator"
                ) from None
            if self.model_type not in sam_model_registry:
                raise ValueError(f"unknown SAM model_type {self.model_type!r}; one of {sorted(sam_model_registry)}")
            sam = sam_model_registry[self.model_type](checkpoint=self.checkpoint).to(self.device)
            self._predictor = SamPredictor(sam)
        key = _image_key(rgb)
        if key != self._key:
            self._predictor.set_image(rgb)
            self._key = key
        return self._predictor

    def masks_at(self, image, points_px) -> list[np.ndarray]:
        rgb = np.ascontiguousarray(_as_rgb(image).astype(np.uint8))
        predictor = self._predictor_for(rgb)
        out = []
        for x, y in np.asarray(points_px, dtype=np.float64).reshape(-1, 2):
            masks, scores, _ = predictor.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]), multimask_output=True)
            out.append(np.asarray(masks[int(np.argmax(scores))], dtype=bool))
        return out


def generator_from_config(config: dict | None, sam_checkpoint: str | None = None):
    """The generator a RES record was made with (its ``getok.proposals``); None gives the default.

    >>> generator_from_config({"generator": "superpixel", "n_segments": 40, "compactness": 10.0}).n_segments
    40
    """
    config = dict(config or {"generator": "superpixel"})
    kind = config.pop("generator")
    if kind == "superpixel":
        return SuperpixelGenerator(**config)
    if kind == "sam":
        checkpoint = sam_checkpoint or config.get("checkpoint")
        return SamGenerator(checkpoint, config.get("model_type", "vit_h"))
    raise ValueError(f"unknown proposal generator {kind!r}; expected superpixel or sam")


def _pixel_index(points_px, shape) -> np.ndarray:
    """Pixel points (N, 2) -> integer (x, y) indices inside an (H, W) image."""
    h, w = shape[:2]
    p = np.floor(np.asarray(points_px, dtype=np.float64).reshape(-1, 2)).astype(np.int64)
    return np.clip(p, 0, [w - 1, h - 1])


def _anchors_on_image(cfg, size, frame):
    """Anchors whose pixel falls inside the image (pad-frame anchors in the padding are useless)."""
    a = cfg.grid_anchors
    px = points_from_frame(a, size, frame, clamp=False)
    inside = (px >= 0).all(1) & (px[:, 0] < size[0]) & (px[:, 1] < size[1])
    return a[inside], px[inside]


def greedy_mask_anchors(gt_mask, image, cfg: GETokConfig, frame: str, generator=None, tau: float = DEFAULT_TAU,
                        max_points: int = DEFAULT_MAX_POINTS) -> list[tuple[float, float]]:
    """The smallest anchor set the greedy of spec section 6 finds for ``gt_mask`` (H, W) bool.

    Candidates: one proposal per grid anchor on the image (for generators without a partition, such as
    SAM, only the anchors within one cell of the mask's bounding box: a model call each). Sorted by IoU with the ground truth (highest
    first, ties in row-major anchor order); a candidate is kept only if the union's IoU rises; stop at
    IoU >= tau, when candidates run out, or at ``max_points``. Anchors whose proposal equals an earlier
    anchor's are dropped first (the first in row-major order stands for them). Returns normalised anchors
    in row-major order; empty when no proposal overlaps the mask. Deterministic.
    """
    gt = np.asarray(gt_mask, dtype=bool)
    h, w = gt.shape
    generator = generator or SuperpixelGenerator()
    anchors, px = _anchors_on_image(cfg, (w, h), frame)
    if gt.sum() == 0 or len(anchors) == 0:
        return []
    if hasattr(generator, "segments"):
        chosen = _greedy_disjoint(gt, generator.segments(image), px, tau, max_points)
    else:
        # one model call per anchor (SAM): only anchors within a cell of the mask's box can plausibly help
        ys, xs = np.nonzero(gt)
        cell = points_from_frame([[1 / cfg.grid] * 2], (w, h), frame, clamp=False)[0] - points_from_frame([[0, 0]], (w, h), frame, clamp=False)[0]
        near = np.nonzero((px[:, 0] >= xs.min() - cell[0]) & (px[:, 0] <= xs.max() + 1 + cell[0]) & (px[:, 1] >= ys.min() - cell[1]) & (px[:, 1] <= ys.max() + 1 + cell[1]))[0]
        chosen = [int(near[k]) for k in _greedy_general(gt, generator.masks_at(image, px[near]), tau, max_points)]
    return [tuple(anchors[k].tolist()) for k in sorted(chosen)]


def _greedy_disjoint(gt, labels, px, tau, max_points):
    """Greedy over a partition (superpixels): unions are sums, so no per-pixel work in the loop."""
    xy = _pixel_index(px, labels.shape)
    at = labels[xy[:, 1], xy[:, 0]]
    _, first = np.unique(at, return_index=True)  # one anchor per distinct proposal: the first row-major
    first = np.sort(first)
    nlab = int(labels.max()) + 1
    area = np.bincount(labels.ravel(), minlength=nlab).astype(np.float64)
    inter = np.bincount(labels[gt], minlength=nlab).astype(np.float64)
    g = float(gt.sum())
    lab = at[first]
    iou = inter[lab] / (area[lab] + g - inter[lab])
    order = first[np.argsort(-iou, kind="stable")]
    chosen, cur_i, cur_a, best = [], 0.0, 0.0, 0.0
    for k in order:
        a, i = area[at[k]], inter[at[k]]
        new = (cur_i + i) / (g + cur_a + a - cur_i - i)
        if new > best:
            chosen.append(int(k))
            cur_i, cur_a, best = cur_i + i, cur_a + a, new
            if best >= tau or len(chosen) >= max_points:
                break
    return chosen


def _greedy_general(gt, proposals, tau, max_points):
    """Greedy over arbitrary (overlapping) proposals, as pycocotools RLEs."""
    from pycocotools import mask as mask_utils

    def rle(m):
        return mask_utils.encode(np.asfortranarray(np.asarray(m, dtype=np.uint8)))

    gt_rle = rle(gt)
    seen, cands = set(), []
    for k, m in enumerate(proposals):
        r = rle(m)
        if r["counts"] in seen:
            continue
        seen.add(r["counts"])
        cands.append((k, r))
    if not cands:
        return []
    ious = mask_utils.iou([r for _, r in cands], [gt_rle], [0]).reshape(-1)
    order = np.argsort(-ious, kind="stable")
    chosen, union, best = [], None, 0.0
    for o in order:
        k, r = cands[o]
        u = r if union is None else mask_utils.merge([union, r])
        new = float(mask_utils.iou([u], [gt_rle], [0])[0, 0])
        if new > best:
            chosen.append(k)
            union, best = u, new
            if best >= tau or len(chosen) >= max_points:
                break
    return chosen


def mask_from_anchors(points_norm, image, frame: str, generator=None) -> np.ndarray:
    """Decode anchor points (normalised, in ``frame``) to a mask (H, W) bool: the union of the proposals."""
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    out = np.zeros((h, w), dtype=bool)
    pts = np.asarray(points_norm, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return out
    generator = generator or SuperpixelGenerator()
    for m in generator.masks_at(rgb, points_from_frame(pts, (w, h), frame)):
        out |= m
    return out


def mask_refinement_offsets(points_norm, gt_mask, cfg: GETokConfig, frame: str) -> list[tuple[int, int] | None]:
    """Refine-mode answers for mask anchors (spec section 6), one per point, in the points' order.

    The mask is eroded by one offset step (a disk of that radius in pixels, at least 1 px) so that "inside"
    means safely inside. For each point, the candidate positions point + (dx, dy) * s_1 of its m x m step
    neighbourhood are tried in order of increasing |dx| + |dy| (then dy, then dx): the first one inside the
    eroded mask wins, so a point already inside keeps ``(0, 0)`` and a point in the ring moves in. If no
    candidate is inside the eroded mask (a thin object), the first one inside the mask itself wins. None
    (``<delete>``) when no candidate is inside the mask at all.
    """
    from skimage.morphology import binary_erosion, disk

    gt = np.asarray(gt_mask, dtype=bool)
    h, w = gt.shape
    s = cfg.step(1)
    step_px = float(np.min(points_from_frame([[s, s]], (w, h), frame, clamp=False) - points_from_frame([[0, 0]], (w, h), frame, clamp=False)))
    eroded = binary_erosion(gt, disk(max(1, int(round(step_px)))))
    hh = cfg.half
    cand = sorted(((dx, dy) for dy in range(-hh, hh + 1) for dx in range(-hh, hh + 1)), key=lambda d: (abs(d[0]) + abs(d[1]), d[1], d[0]))
    pts = np.asarray(points_norm, dtype=np.float64).reshape(-1, 2)
    out = []
    for p in pts:
        moved = np.clip(p[None, :] + np.asarray(cand, dtype=np.float64) * s, 0.0, 1.0)
        px = points_from_frame(moved, (w, h), frame, clamp=False)
        on = (px >= 0).all(1) & (px[:, 0] < w) & (px[:, 1] < h)
        xy = _pixel_index(px, (h, w))
        pick = None
        for m in (eroded, gt):
            hit = on & m[xy[:, 1], xy[:, 0]]
            if hit.any():
                pick = cand[int(np.argmax(hit))]
                break
        out.append(pick)
    return out


def mask_cells_near(gt_mask, cfg: GETokConfig, frame: str, ring: int = 1) -> np.ndarray:
    """Normalised anchors of the cells within ``ring`` cells of the mask's bounding box (row-major);
    the pool refine-mode examples draw wrong anchors from."""
    gt = np.asarray(gt_mask, dtype=bool)
    h, w = gt.shape
    ys, xs = np.nonzero(gt)
    if len(xs) == 0:
        return np.zeros((0, 2))
    lo = points_to_frame([[xs.min(), ys.min()]], (w, h), frame)[0]
    hi = points_to_frame([[xs.max() + 1, ys.max() + 1]], (w, h), frame)[0]
    n = cfg.grid
    i0, j0 = np.clip(cfg.cells(lo) - ring, 0, n - 1)
    i1, j1 = np.clip(cfg.cells(hi) + ring, 0, n - 1)
    jj, ii = np.meshgrid(np.arange(j0, j1 + 1), np.arange(i0, i1 + 1), indexing="ij")
    return cfg.anchors(np.stack([ii.ravel(), jj.ravel()], 1))

"""COCO run-length encoded masks, checked before pycocotools decodes them (spec section 10, "COCO RLE"): runs not
negative and adding up to the mask's size exactly (pycocotools reads uninitialised memory for short runs and
overflows on negative ones), a mask no larger than any image. One decoder for records, converters and evaluation.
"""
from __future__ import annotations

import numpy as np

from .messages import short

# The largest mask decoded: PIL's Image.MAX_IMAGE_PIXELS (images beyond it are "decompression bombs" to PIL, and no
# image these masks belong to is larger); a hostile size would otherwise allocate height x width bytes.
MAX_MASK_PIXELS = 89_478_485


def rle_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in Python), or None when the
    string is not one (a character outside '0'..'o', a number cut short). Validation only: pycocotools itself does
    not check a string's runs against the mask size and reads past them."""
    out, p, n = [], 0, len(counts)
    while p < n:
        x = k = 0
        while True:
            if p >= n:
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            if k > 6:  # 35 bits: more than any mask of MAX_MASK_PIXELS holds (and an int that grows without end)
                return None
            x |= (c & 0x1F) << (5 * k)
            p, k = p + 1, k + 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_problem(rle) -> tuple[str | None, str] | None:
    """What makes ``rle`` not a COCO RLE mask, as (sub-field or None, message), else None: ``size`` must be
    [height, width] positive integers within MAX_MASK_PIXELS; ``counts`` a compressed string (or bytes) or a
    list of integers, runs that are not negative and add up to height x width exactly (pycocotools decodes
    shorter runs into uninitialised memory and overflows on negative ones)."""
    if not isinstance(rle, dict):
        return None, f"expected a COCO RLE object {{'size': [h, w], 'counts': ...}}, got {short(rle)}"
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        return "size", f"expected [height, width] positive integers, got {short(size)}"
    if size[0] * size[1] > MAX_MASK_PIXELS:
        return "size", f"{size[0]} x {size[1]} pixels is larger than any image ({MAX_MASK_PIXELS} pixels)"
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    if isinstance(counts, str):
        runs = rle_counts(counts)
        if runs is None:
            return "counts", f"not a compressed COCO RLE string: {short(counts)}"
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        runs = counts
    else:
        return "counts", f"expected a compressed string or a list of integers, got {short(counts)}"
    if any(v < 0 for v in runs):
        return "counts", "negative run length"
    if any(v > size[0] * size[1] for v in runs):
        return "counts", f"a run longer than the {size[0]} x {size[1]} mask"
    if sum(runs) != size[0] * size[1]:
        return "counts", f"runs add up to {sum(runs)} pixels, not {size[0]} x {size[1]} = {size[0] * size[1]}"
    return None


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """A COCO segmentation of an (height, width) image: polygons ``[[x1, y1, x2, y2, ...], ...]`` or RLE
    (uncompressed, ``counts`` a list, or compressed, bytes or str) -> compressed RLE with ``counts`` a str,
    as ``getok.mask`` stores it. ValueError for an RLE that :func:`rle_problem` refuses."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width))
    else:
        problem = rle_problem(segmentation)
        if problem:
            raise ValueError(f"mask{'.' + problem[0] if problem[0] else ''}: {problem[1]}")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed, ``counts`` str or bytes, or uncompressed, ``counts`` a list) -> (H, W) bool;
    ValueError for one :func:`rle_problem` refuses."""
    from pycocotools import mask as mask_utils

    problem = rle_problem(rle)
    if problem:
        raise ValueError(f"mask{'.' + problem[0] if problem[0] else ''}: {problem[1]}")
    return mask_utils.decode(segmentation_to_rle(rle, *rle["size"])).astype(bool)

"""What every source module provides, and the one validated sample type they produce.

The source interface (follow it to add a source, e.g. ``data_converters/shapes.py``)
------------------------------------------------------------------------------------
A source is a module listed in :data:`data_converters.registry.SOURCES`. It defines::

    TASKS = ("rec", "reg", ...)       # tasks it can feed (see conversations.TASKS); the first is the default
    FORMATS = "one line describing the input files"

    def read(opts: Options) -> Iterator[tuple[str, Any]]:
        '''Yield (where, raw) for every record of ``opts.input``: cheap, in the main process.
        ``where`` names the place in the input for error messages ("file.json:17" or "file.json:ann 42");
        ``raw`` is whatever parse() needs, picklable (it travels to worker processes). Join files here
        (COCO images/categories), decode JSON in parse() (it runs in the workers). A record that cannot even be
        split out of its file is yielded as its ConvertError (it is counted like any bad record).
        A file that cannot be read at all (missing, not JSON) raises ConvertError: that always stops.'''

    def parse(raw, where: str, opts: Options) -> Sample:
        '''One raw record -> exactly one Sample, in ORIGINAL PIXELS. Raise ConvertError(where, field,
        message) for bad input, Filtered(reason) for a record deliberately left out (both are counted).'''

Read files, records and fields through :mod:`data_converters.inputs` (``load_json``, ``json_records``,
``record``, :class:`~data_converters.inputs.Fields`): encoding errors, malformed JSON, records that are not
objects and fields of the wrong type then become one-line errors that name the source's own field, and a new
source inherits all of it. The pipeline raises a ConvertError / Filtered that read() yielded in a record's place.

Optionally:
- ``def load_image(sample, opts) -> np.ndarray`` (H, W, 3) uint8: the pixels for RES proposals, for a source
  that makes its images; without it they are read from ``--image-root / sample.image``.
- ``def inputs(opts) -> list[Path]``: every file and folder the conversion reads (default: ``[opts.input]``);
  an interrupted run resumes only if none of them changed (names, sizes, modification times).
- ``UNIQUE_IDS = False``: the source keeps ids of its own that its format lets repeat (LLaVA-1.5's mix665k
  repeats image ids); repeats are then counted in the summary instead of being bad input.
A source that needs no image files gives ``Sample.size`` itself (else sizes come from image headers).

One raw record gives one Sample gives one output record, so ``read = written + skipped`` always holds.
Sources never build token strings: :func:`data_converters.conversations.build_record` turns a Sample into a
LLaVA record with :mod:`llava_getok.codec`. Sources never check boxes against the image either:
:meth:`Sample.validated` does that once, for every source, after the image size is known.
"""
from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_getok.rle import MAX_MASK_PIXELS, rle_problem, rle_to_mask

from .inputs import ConvertError, Filtered, check_numbers, is_number

# Pixel coordinates may stray this far outside the image (fraction of the side, plus one pixel) before
# they count as "far outside" and are rejected; within it they are clipped. Annotation tools round.
OUTSIDE_TOLERANCE = 0.02


@dataclass(frozen=True)
class Options:
    """What the CLI passes to sources and to the record builder (one object, picklable)."""

    input: Path
    image_root: Path | None = None
    task: str = "rec"
    split: str | None = None  # keep only this split (sources that know splits: refcoco, vg...)
    dataset: str | None = None  # refcoco: refcoco | refcoco+ | refcocog (default: the input folder's name)
    split_by: str | None = None  # refcoco: unc | umd | google (default: the dataset's usual one)
    input_frame: str = "pad"  # llava: the frame the input's normalised coordinates are in


@dataclass(frozen=True)
class Sample:
    """One grounded example in ORIGINAL PIXELS of its image.

    id: unique and stable (it becomes the record id; the same input gives the same id).
    image: the image path as written to the output ``image`` field (relative to ``--image-root``).
    size: (W, H) in pixels, or None: then it is read from the image header under ``--image-root``.
    expression: the referring expression / category / phrase; None when the task needs none.
    boxes: pixel boxes (x1, y1, x2, y2), several for ``det``; empty for "nothing matches".
    points: pixel points (pointing ground truth); when empty, ``point`` uses the mask or box.
    polygons: COCO polygons [[x1, y1, x2, y2, ...], ...] (pixels) of the object's mask, or None.
    rle: COCO RLE dict (compressed or uncompressed) of the object's mask, or None.
    split: the split it belongs to (train / val / testA ...), or None.
    turns: a conversation of the source's own (``llava``): a list of {"from", "value"} whose values hold
        BOX_SLOT placeholders, one per box of ``boxes``, in order; None for every other source.
    source_fields: extra keys of the source record kept on the output record (``llava``: every key).
    units: "px" (default), or a frame name ("pad", "orig", "crop"...) when the source gives boxes and points
        normalised to [0, 1] in that frame; :meth:`validated` turns them into pixels once the size is known.
    where: the place in the input ("file:record"), for error messages.
    fields: the source's own names, so that errors name its field: "boxes" / "points" -> one name (``[k]`` is
        added when there are several) or a sequence with one name per box / point ("grounding.regions[1].bbox");
        "size" -> the fields the size came from ("width, height"); "segmentation" -> the mask's field;
        "image" -> the image path's field ("img_path"); "expression" -> the expression's ("problem").
    normalised: set by :meth:`validated` for normalised input: (frame, boxes) as the source gave them,
        when nothing needed clipping; writing to that same frame then reuses them (one geometry call
        fewer per record, and no float round trip through pixels).
    """

    id: str
    image: str | None
    size: tuple[float, float] | None = None
    expression: str | None = None
    boxes: tuple = ()
    points: tuple = ()
    polygons: list | None = None
    rle: dict | None = None
    split: str | None = None
    turns: list | None = None
    source_fields: dict | None = None
    units: str = "px"
    where: str = ""
    fields: dict | None = None
    normalised: tuple | None = None

    # -- validation, once for every source ---------------------------------------------------------------
    def validated(self, size) -> "Sample":
        """Check everything against the image ``size`` (W, H); return a copy in pixels, boxes/points clipped.

        Plain Python on purpose: this runs once per record, and numpy's per-call cost on 4 numbers would
        dominate a million-record conversion.
        """
        w, h = check_size(size, self.where, self.field_name("size"))
        boxes = [check_numbers(b, 4, self.where, self._field("boxes", k)) for k, b in enumerate(self.boxes)]
        points = [check_numbers(p, 2, self.where, self._field("points", k)) for k, p in enumerate(self.points)]
        normalised = None
        if self.units != "px":
            normalised = (self.units, tuple(tuple(b) for b in boxes))
            boxes, points = self._to_pixels(boxes, points, (w, h))
        tol = (OUTSIDE_TOLERANCE * w + 1, OUTSIDE_TOLERANCE * h + 1)
        for k, b in enumerate(boxes):
            if b[2] < b[0] or b[3] < b[1]:
                raise ConvertError(self.where, self._field("boxes", k), f"x2 < x1 or y2 < y1 in {b} (expected x1, y1, x2, y2)", "box x2 < x1 or y2 < y1")
            boxes[k] = _clip(b, w, h, tol, self.where, self._field("boxes", k))
            # A ground-truth box of zero width or height can never be scored (no prediction overlaps it). A box in a
            # conversation of the source's own (``turns``: llava, qwen, kosmos2) is training text, never scored, and
            # LLaVA's own two-decimal rounding makes thin boxes zero-wide: it is kept as written.
            if self.turns is None and (boxes[k][2] <= boxes[k][0] or boxes[k][3] <= boxes[k][1]):
                raise ConvertError(self.where, self._field("boxes", k), f"box {list(boxes[k])} has zero width or height (in the image)", "box of zero width or height")
            if normalised is not None and boxes[k] != tuple(b):
                normalised = None
        for k, p in enumerate(points):
            points[k] = _clip(p, w, h, tol, self.where, self._field("points", k))
        seg = self.field_name("segmentation")
        if (self.polygons is not None or self.rle is not None) and round(w) * round(h) > MAX_MASK_PIXELS:
            raise ConvertError(self.where, self.field_name("size"), f"a mask of {w:g} x {h:g} pixels is larger than any image ({MAX_MASK_PIXELS} pixels)", "image too large for a mask")
        if self.polygons is not None:
            if not isinstance(self.polygons, list) or not self.polygons:
                raise ConvertError(self.where, seg, "empty polygon list", "polygon with < 3 points")
            for k, poly in enumerate(self.polygons):
                p = check_numbers(poly, None, self.where, f"{seg}[{k}]")
                if len(p) < 6 or len(p) % 2:
                    raise ConvertError(self.where, f"{seg}[{k}]", f"a polygon needs >= 3 (x, y) points, got {len(p)} numbers", "polygon with < 3 points")
                clip_to_image(np.reshape(p, (-1, 2)), w, h, self.where, f"{seg}[{k}]")
        if self.rle is not None:
            problem = rle_problem(self.rle)
            if problem:
                raise ConvertError(self.where, f"{seg}.{problem[0]}" if problem[0] else seg, problem[1], "bad RLE mask")
            if list(self.rle["size"]) != [int(round(h)), int(round(w))]:
                raise ConvertError(self.where, f"{seg}.size", f"RLE size {self.rle['size']} (h, w) differs from the image size {[h, w]}", "RLE size differs from image")
        out = copy.copy(self)  # dataclasses.replace re-runs __init__: measurably slower per record
        for name, value in (("size", (w, h)), ("boxes", tuple(boxes)), ("points", tuple(points)), ("units", "px"), ("normalised", normalised)):
            object.__setattr__(out, name, value)
        return out

    def in_view(self, frame: str) -> "Sample":
        """This validated sample as a model that sees ``frame`` can see it: for a crop frame every box clipped to the
        part of the image the crop keeps (``geometry.frame_region``), points checked against it, the mask cut to
        it. A shape wholly outside raises Filtered (the record is skipped and counted: an answer cannot name what
        the model never sees, and a record is converted whole or not at all). ``pad`` and ``orig`` see the whole
        image: the sample itself."""
        from llava_getok.geometry import crop_sizes, frame_region

        if crop_sizes(frame) is None or self.size is None:
            return self
        x0, y0, x1, y1 = region = frame_region(self.size, frame)
        seen = f"the {frame} frame keeps x {x0:.3f}..{x1:.3f}, y {y0:.3f}..{y1:.3f} of the {self.size[0]:g}x{self.size[1]:g} image"
        boxes = []
        for k, b in enumerate(self.boxes):
            c = (max(b[0], x0), max(b[1], y0), min(b[2], x1), min(b[3], y1))
            if not (_kept(b[0], b[2], c[0], c[2]) and _kept(b[1], b[3], c[1], c[3])):
                raise Filtered(OUTSIDE_CROP, self._field("boxes", k), f"box {list(b)} lies outside the crop: {seen}")
            boxes.append(c)
        for k, p in enumerate(self.points):
            if not (x0 <= p[0] <= x1 and y0 <= p[1] <= y1):
                raise Filtered(OUTSIDE_CROP, self._field("points", k), f"point {list(p)} lies outside the crop: {seen}")
        out = copy.copy(self)
        rle = self._mask_in(region)
        if rle is not None:
            if not rle_to_mask(rle).any():
                raise Filtered(OUTSIDE_CROP, self.field_name("segmentation"), f"the mask lies outside the crop: {seen}")
            object.__setattr__(out, "polygons", None)
            object.__setattr__(out, "rle", rle)
        object.__setattr__(out, "boxes", tuple(boxes))
        if self.normalised is not None and tuple(boxes) != tuple(self.boxes):
            object.__setattr__(out, "normalised", None)  # clipped: the source's own numbers no longer hold
        return out

    def _mask_in(self, region) -> dict | None:
        """The object's mask with every pixel whose centre lies outside ``region`` cleared, as compressed RLE."""
        rle = self.mask_rle()
        if rle is None:
            return None
        from pycocotools import mask as mask_utils

        from llava_getok.geometry import pixels_in_region

        mask = rle_to_mask(rle)
        out = mask_utils.encode(np.asfortranarray((mask & pixels_in_region(*mask.shape, region)).astype(np.uint8)))
        return {"size": [int(v) for v in out["size"]], "counts": out["counts"].decode("ascii")}

    _DEFAULT_NAMES = {"boxes": "bbox", "points": "point", "size": "width, height", "segmentation": "segmentation",
                      "image": "image", "expression": "expression"}

    def field_name(self, kind: str) -> str:
        """The source's name of the field(s) ``kind`` came from ("boxes", "points", "size", "segmentation",
        "image", "expression"), for error messages."""
        name = (self.fields or {}).get(kind, self._DEFAULT_NAMES[kind])
        return name if isinstance(name, str) else ", ".join(dict.fromkeys(name)) or self._DEFAULT_NAMES[kind]

    def _field(self, kind: str, k: int) -> str:
        """The source's name of box / point ``k``."""
        name = (self.fields or {}).get(kind, self._DEFAULT_NAMES[kind])
        if not isinstance(name, str):
            return name[k]
        return name if len(self.boxes if kind == "boxes" else self.points) == 1 else f"{name}[{k}]"

    def _to_pixels(self, boxes, points, size):
        """Normalised boxes and points in frame ``self.units`` -> pixels."""
        (ax, bx), (ay, by) = frame_to_pixels(size, self.units)
        return ([[ax * b[0] + bx, ay * b[1] + by, ax * b[2] + bx, ay * b[3] + by] for b in boxes],
                [[ax * p[0] + bx, ay * p[1] + by] for p in points])

    def mask_rle(self) -> dict | None:
        """The object's mask as ``getok.mask`` stores it (compressed COCO RLE, counts a str), from polygons or
        RLE; None if neither."""
        if self.polygons is None and self.rle is None:
            return None
        from llava_getok.rle import segmentation_to_rle

        w, h = (int(round(v)) for v in self.size)
        return segmentation_to_rle(self.polygons if self.polygons is not None else self.rle, h, w)


OUTSIDE_CROP = "shape outside the crop (the model never sees it)"


def _kept(lo, hi, clo, chi) -> bool:
    """Whether a box's extent lo..hi along one axis, clipped to clo..chi, still holds part of it: a positive length,
    or for a box of zero width (kept in a source's own conversations) a position inside the crop."""
    return chi > clo or (hi == lo and chi == clo)


@functools.lru_cache(maxsize=4096)
def frame_to_pixels(size: tuple, frame: str) -> tuple:
    """((a_x, b_x), (a_y, b_y)) with pixel = a * normalised + b, read off ``geometry.points_from_frame``.

    Every frame is affine per axis, so two points fix the map; caching it per image size spares a
    million-record conversion two numpy round trips per record.
    """
    from llava_getok.geometry import points_from_frame

    (x0, y0), (x1, y1) = points_from_frame([[0.0, 0.0], [1.0, 1.0]], size, frame, clamp=False).tolist()
    return (x1 - x0, x0), (y1 - y0, y0)


def check_size(size, where: str, field: str = "width, height") -> tuple[float, float]:
    """(W, H) must be two positive finite numbers; errors name the source's ``field``."""
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and is_number(size[0]) and is_number(size[1])):
        raise ConvertError(where, field, f"expected (width, height) numbers, got {size!r}", "bad image size")
    try:
        w, h = float(size[0]), float(size[1])
    except OverflowError:
        w = h = math.inf
    if not (math.isfinite(w) and math.isfinite(h)):
        raise ConvertError(where, field, f"width and height must be finite, got {size!r}", "bad image size")
    if w <= 0 or h <= 0:
        raise ConvertError(where, field, f"width and height must be positive, got {[w, h]}", "bad image size")
    return w, h


def _clip(values, w, h, tol, where, field) -> tuple:
    """(x, y, x, y, ...) in pixels: clip small excursions, reject values far outside the image."""
    out = []
    for k, v in enumerate(values):
        lim, t = (w, tol[0]) if k % 2 == 0 else (h, tol[1])
        if v < -t or v > lim + t:
            xy = values[k - k % 2 : k - k % 2 + 2]
            raise ConvertError(where, field, f"point {list(xy)} is far outside the {w:g}x{h:g} image", "far outside the image")
        out.append(0.0 if v < 0 else lim if v > lim else v)
    return tuple(out)


def clip_to_image(points: np.ndarray, w: float, h: float, where: str, field: str) -> np.ndarray:
    """Points (N, 2) in pixels: clip small excursions, reject points far outside the image."""
    tol = np.array([OUTSIDE_TOLERANCE * w + 1, OUTSIDE_TOLERANCE * h + 1])
    lim = np.array([w, h])
    far = ((points < -tol) | (points > lim + tol)).any(1)
    if far.any():
        raise ConvertError(where, field, f"point {points[far][0].tolist()} is far outside the {w:g}x{h:g} image", "far outside the image")
    return np.clip(points, 0, lim)


@functools.lru_cache(maxsize=100_000)
def image_size(path: str) -> tuple[int, int] | None:
    """(W, H) of the upright image (EXIF orientation applied, as every model input is read: llava_getok.images) from
    the header (PIL opens lazily and decodes no pixels); None if there is no file."""
    from llava_getok.images import ImageError, upright_size

    try:
        return upright_size(path)
    except FileNotFoundError:
        return None
    except ImageError as e:  # not an image, a truncated header, too big
        raise ValueError(f"cannot read the image header of {e}") from None


@functools.lru_cache(maxsize=100_000)
def image_header(path: str) -> tuple[tuple[int, int], int] | None:
    """((W, H) as stored, EXIF orientation) from the header; None for a file PIL cannot read (other checks say why)."""
    from llava_getok.images import ImageError, stored_size

    try:
        return stored_size(path)
    except (FileNotFoundError, ImageError):
        return None


@functools.lru_cache(maxsize=100_000)
def image_exists(path: str) -> bool:
    return os.path.isfile(path)

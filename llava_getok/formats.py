"""Location formats: how a shape becomes answer text, for GETok and for the baselines a user compares it with.

- ``getok`` (:class:`llava_getok.vocab.GETokConfig`): grid and offset tokens (spec sections 2-5).
- ``text`` (:class:`TextFormat`): LLaVA-1.5's own boxes, ``[0.12, 0.34, 0.56, 0.78]`` (x1, y1, x2, y2 as Python
  writes floats rounded to ``decimals``), points ``[0.12, 0.34]``; no added tokens.
- ``bins`` (:class:`BinsFormat`): Pix2Seq / PaliGemma-style 1D location tokens ``<loc_k>``, K bins per axis,
  ``min(floor(x K), K - 1)``, decoded to the bin centre ``(k + 0.5) / K``; a box is 4 adjacent tokens
  ``x1 y1 x2 y2`` (no tags), a point 2.
- ``qwen25`` (:class:`Qwen25Format`): Qwen2.5-VL's own JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` in
  integer pixels of its ``smart_resize``d image; boxes only, converted and scored (not trained by the LLaVA backend).
  Its numbers depend on the image: :func:`for_image` binds a record's size before encoding or parsing.

Every reader and writer asks a format object instead of branching on the format's name: :func:`encode_boxes`,
:func:`encode_point`, :func:`render`, :func:`parse`, :func:`parse_ids`, ``fmt.tokens()`` (the tokens training adds),
``fmt.max_error``; :func:`format_to_dict` / :func:`format_from_dict` are what records (``getok.format``) and the
checkpoint sidecar store, :func:`record_format` reads a converted record's. Coordinates are normalised to [0, 1]
in the model's frame (:mod:`llava_getok.geometry`), as for GETok. Text and bins have no form for polylines and
masks: encoding one is a ValueError naming the format. ``parse`` never raises, whatever the string.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import ClassVar, Union

import numpy as np

from . import codec
from .codec import Shape, check_boxes, check_points
from .parse import ParseError, ParseResult
from .parse import parse as parse_getok
from .parse import parse_ids as parse_getok_ids
from .options import option, same_option
from .vocab import TOKEN_RE, GETokConfig

FORMAT_NAMES = ("getok", "text", "bins")  # what LLaVA trains (python -m llava_getok.train --getok_format)
CONVERT_ONLY = ("qwen25",)  # Qwen2.5-VL's own JSON boxes: converted and scored here, trained in Qwen2.5-VL
LOC_FORMAT = "<loc_{k}>"
# A bin index is written without leading zeros (the token's one spelling); ASCII digits only, as for GETok tokens.
LOC_RE = re.compile(r"<loc_(0|[1-9][0-9]*)>")
# Every token any format adds: GETok's and the bins' (llava-getok check-data counts them in answers).
LOCATION_TOKEN_RE = re.compile(TOKEN_RE.pattern + r"|" + LOC_RE.pattern)
_MAX_DIGITS = 9  # more digits than this cannot be a bin index: out of range without converting (as parse._int)


def _check_int_in(what: str, value, lo: int, hi: int) -> None:
    """ValueError naming ``what`` unless ``value`` is an int (not a bool) in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class TextFormat:
    """LLaVA-1.5's text coordinates: ``[x1, y1, x2, y2]`` / ``[x, y]``, each number rounded to ``decimals`` and
    written as Python writes a float (``0.6``, not ``0.60``; ``1.0``), as llava_v1_5_mix665k holds them.

    >>> TextFormat().encode_boxes([(0.1234, 0.6, 0.5, 1.0)])
    ['[0.12, 0.6, 0.5, 1.0]']
    """

    decimals: int = option(2, "text format: decimals per coordinate (LLaVA-1.5: 2)")
    name: ClassVar[str] = "text"

    def __post_init__(self):
        _check_int_in("text format: decimals", self.decimals, 1, 10)

    def tokens(self) -> tuple[str, ...]:
        """Text coordinates are ordinary text: no token is added."""
        return ()

    @property
    def max_error(self) -> float:
        """Largest per-axis error of a written coordinate: half the last decimal."""
        return 0.5 * 10.0 ** -self.decimals

    def number(self, v: float) -> str:
        """One coordinate: rounded to ``decimals``, trailing zeros dropped but one digit kept after the point."""
        s = f"{float(v):.{self.decimals}f}".rstrip("0")
        return s + "0" if s.endswith(".") else s

    def encode_points(self, points) -> list[str]:
        return ["[" + ", ".join(self.number(v) for v in p) + "]" for p in check_points(points, "point").tolist()]

    def encode_boxes(self, boxes) -> list[str]:
        return ["[" + ", ".join(self.number(v) for v in b) + "]" for b in check_boxes(boxes).tolist()]

    def to_dict(self) -> dict:
        return {"name": self.name, "decimals": self.decimals}

    def describe(self) -> str:
        return f"text, {self.decimals} decimals"

    def parse(self, text: str) -> ParseResult:
        """Every bracketed pair (a point) or quadruple (a box) of numbers in ``text``, in order, as LLaVA-1.5 writes
        them in free text. As in the ``llava`` converter (spec section 10), a group whose numbers are all integers
        (``[0, 0, 0, 1]``, ``[1, 2]``) is free text, not a location; a group with a decimal that lies outside
        [0, 1] (beyond codec.CLIP_TOLERANCE) is a ParseError, as are pixel coordinates. Box corners are sorted."""
        res = ParseResult()
        for m in _TEXT_GROUP.finditer(text):
            nums = [g for g in m.groups() if g is not None]
            if not any("." in g for g in nums):
                continue
            values = [float(g) if len(g) <= 40 else float("inf") for g in nums]
            start, end = m.span()
            try:
                if len(values) == 4:
                    x1, y1, x2, y2 = values
                    box = check_boxes([[min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]])[0].tolist()
                    res.shapes.append(Shape("box", ((box[0], box[1]), (box[2], box[3])), (start, end)))
                else:
                    p = check_points([values])[0].tolist()
                    res.shapes.append(Shape("point", ((p[0], p[1]),), (start, end)))
            except ValueError as e:
                res.errors.append(ParseError(start, f"{_cut(m.group(0))} at {start} is not a location in [0, 1]: {e}"))
        return res


_NUM = r"([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
_TEXT_GROUP = re.compile(r"\[\s*" + _NUM + r"\s*,\s*" + _NUM + r"(?:\s*,\s*" + _NUM + r"\s*,\s*" + _NUM + r")?\s*\]")


def _cut(s: str) -> str:
    return s if len(s) <= 60 else s[:57] + "..."


@dataclass(frozen=True)
class BinsFormat:
    """1D location tokens: ``<loc_k>``, k = min(floor(x K), K - 1) per coordinate after clipping to [0, 1], decoded
    to the bin centre (k + 0.5) / K. A box is 4 adjacent tokens x1 y1 x2 y2, a point 2; nothing wraps them
    (Pix2Seq, PaliGemma): a run of adjacent location tokens is one shape.

    >>> BinsFormat(bins=10).encode_boxes([(0.05, 0.5, 0.99, 1.0)])
    ['<loc_0><loc_5><loc_9><loc_9>']
    """

    bins: int = option(1000, "bins format: K bins per axis, tokens <loc_0> .. <loc_{K-1}>")
    name: ClassVar[str] = "bins"

    def __post_init__(self):
        _check_int_in("bins format: bins", self.bins, 2, 100_000)

    def tokens(self) -> tuple[str, ...]:
        """``<loc_0>`` .. ``<loc_{K-1}>``, in bin order (token ids follow it)."""
        return tuple(LOC_FORMAT.format(k=k) for k in range(self.bins))

    @property
    def max_error(self) -> float:
        """Largest per-axis decoding error: half a bin."""
        return 0.5 / self.bins

    def quantize(self, values) -> np.ndarray:
        """Normalised coordinates -> bin indices, min(floor(x K), K - 1) after clipping to [0, 1]."""
        v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
        return np.minimum(np.floor(v * self.bins), self.bins - 1).astype(np.int64)

    def centres(self, bins) -> np.ndarray:
        """Bin indices -> the normalised bin centres (k + 0.5) / K."""
        return (np.asarray(bins, dtype=np.float64) + 0.5) / self.bins

    def _write(self, rows) -> list[str]:
        return ["".join(LOC_FORMAT.format(k=k) for k in row) for row in self.quantize(rows).tolist()]

    def encode_points(self, points) -> list[str]:
        return self._write(check_points(points, "point"))

    def encode_boxes(self, boxes) -> list[str]:
        return self._write(check_boxes(boxes))

    def to_dict(self) -> dict:
        return {"name": self.name, "bins": self.bins}

    def describe(self) -> str:
        return f"bins, K = {self.bins}"

    def parse(self, text: str) -> ParseResult:
        """Runs of adjacent ``<loc_k>`` in ``text``: 2 a point, 4 a box (corners sorted); any other length, or an
        index outside the K bins, is a ParseError and the run is dropped. Free text is skipped.

        A text in which no two location tokens touch holds no shape as this format writes them; there, tokens one
        space apart are read as adjacent: decoders that put a space between added tokens (transformers' slow
        tokenizers, as LLaVA's serve code and trl decode) write a box so (spec section 10)."""
        found = [(m.start(), m.end(), m.group(1)) for m in LOC_RE.finditer(text)]
        pairs = list(zip(found, found[1:]))
        if not any(a[1] == b[0] for a, b in pairs):  # a spaced decoding: one space joins, as nothing does above
            found = [(a[0], b[0], a[2]) if b[0] == a[1] + 1 and text[a[1]] == " " else a for a, b in pairs] + found[-1:]
        return self._parse_runs(found)

    def parse_ids(self, ids, id_to_token: dict[int, str]) -> ParseResult:
        """The same over generated token ids (strict: only real token ids count); positions are token indices."""
        out = []
        for k, t in enumerate(ids):
            m = LOC_RE.fullmatch(id_to_token.get(int(t), ""))
            if m:
                out.append((k, k + 1, m.group(1)))
        return self._parse_runs(out)

    def _parse_runs(self, found) -> ParseResult:
        res, run = ParseResult(), []

        def close():
            if not run:
                return
            start, end = run[0][0], run[-1][1]
            idx = [int(d) if len(d) <= _MAX_DIGITS else self.bins for _, _, d in run]
            if len(run) not in (2, 4):
                res.errors.append(ParseError(start, f"{len(run)} location tokens at {start}: a point is 2, a box 4"))
            elif max(idx) >= self.bins:
                res.errors.append(ParseError(start, f"a location token at {start} is outside the {self.bins} bins"))
            else:
                v = self.centres(idx).tolist()
                if len(v) == 2:
                    res.shapes.append(Shape("point", ((v[0], v[1]),), (start, end)))
                else:
                    x1, x2, y1, y2 = min(v[0], v[2]), max(v[0], v[2]), min(v[1], v[3]), max(v[1], v[3])
                    res.shapes.append(Shape("box", ((x1, y1), (x2, y2)), (start, end)))
            run.clear()

        for item in found:
            if run and item[0] != run[-1][1]:
                close()
            run.append(item)
        close()
        return res


@dataclass(frozen=True)
class Qwen25Format:
    """Qwen2.5-VL's own boxes: JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` (a list of them in a ```json code
    fence, as the model writes them), in integer pixels of the image after the processor's ``smart_resize`` (each side
    a multiple of ``patch_size * merge_size``, the pixel count clamped to [``min_pixels``, ``max_pixels``]:
    transformers' own function). The whole image is stretched to that size, so the frame is ``orig`` and a normalised
    x is ``X / W'``. The numbers depend on the image: :meth:`for_image` binds its size (``resized``), which encoding
    and parsing need (:func:`for_image` for any format). Defaults: Qwen2.5-VL-7B-Instruct's processor. No added
    tokens; boxes only (REC, detection).

    >>> fmt = Qwen25Format(min_pixels=256 * 28 * 28, max_pixels=512 * 28 * 28).for_image((640, 426))
    >>> fmt.resized, fmt.encode_boxes([(0.25, 0.5, 0.75, 1.0)])
    ((644, 420), ['{"bbox_2d": [161, 210, 483, 420]}'])
    """

    min_pixels: int = option(3136, "qwen25 format: the processor's min_pixels, as the model will be run "
                             "(Qwen2.5-VL-7B-Instruct's: 3136)")
    max_pixels: int = option(12845056, "qwen25 format: the processor's max_pixels, as the model will be run "
                             "(Qwen2.5-VL-7B-Instruct's: 12845056)")
    patch_size: int = 14
    merge_size: int = 2
    resized: tuple[int, int] | None = None  # (W', H') of the bound image; not part of the format's description
    name: ClassVar[str] = "qwen25"
    # The grounding prompts of Qwen2.5-VL's own examples (its spatial-understanding cookbook, "following the official
    # setting and trained data"), per task.
    PROMPTS: ClassVar[dict] = {
        "rec": "Locate {expression}, output its bbox coordinates using JSON format.",
        "det": "Outline the position of each {expression} and output all the coordinates in JSON format.",
    }

    def __post_init__(self):
        _check_int_in("qwen25 format: min_pixels", self.min_pixels, 1, 10**10)
        _check_int_in("qwen25 format: max_pixels", self.max_pixels, self.min_pixels, 10**10)
        _check_int_in("qwen25 format: patch_size", self.patch_size, 1, 1024)
        _check_int_in("qwen25 format: merge_size", self.merge_size, 1, 64)

    def tokens(self) -> tuple[str, ...]:
        """JSON is ordinary text: no token is added."""
        return ()

    @property
    def max_error(self) -> float:
        """Largest per-axis error of a written coordinate: half a pixel of the resized image (of its shorter side;
        unbound: of the smallest side smart_resize makes, one patch_size * merge_size)."""
        side = min(self.resized) if self.resized else self.patch_size * self.merge_size
        return 0.5 / side

    def for_image(self, size) -> "Qwen25Format":
        """This format bound to an image of ``size`` (W, H): ``resized`` = smart_resize's (W', H')."""
        try:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        except ImportError as e:
            raise ValueError(f"the qwen25 format needs transformers' smart_resize (pip install 'llava-getok[llava]'): "
                             f"{e}") from None
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < 1e9 for v in size)):
            raise ValueError(f"the qwen25 format needs the image size (W, H) in pixels, got {size!r}")
        w, h = (int(round(float(v))) for v in size)
        rh, rw = smart_resize(h, w, factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                              max_pixels=self.max_pixels)
        return replace(self, resized=(int(rw), int(rh)))

    def _scale(self) -> np.ndarray:
        if self.resized is None:
            raise ValueError("the qwen25 format writes pixels of the resized image: bind the image first "
                             "(formats.for_image(fmt, size))")
        return np.asarray(self.resized * 2, dtype=np.float64)

    def encode_boxes(self, boxes) -> list[str]:
        px = np.rint(check_boxes(boxes) * self._scale()).astype(np.int64).tolist()
        return ['{"bbox_2d": [' + ", ".join(map(str, b)) + "]}" for b in px]

    def encode_points(self, points) -> list[str]:
        raise ValueError("the qwen25 format writes boxes only")

    def answer(self, boxes, label: str | None = None) -> str:
        """The whole answer as Qwen2.5-VL writes it: a ```json fence around a list, one object a line (tab-indented),
        each ``{"bbox_2d": [...], "label": ...}``."""
        objects = [b[:-1] + (", \"label\": " + json.dumps(label, ensure_ascii=False) if label is not None else "") + "}"
                   for b in self.encode_boxes(boxes)]
        return "```json\n[\n" + ",\n".join("\t" + o for o in objects) + "\n]\n```"

    def to_dict(self) -> dict:
        return {"name": self.name, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "patch_size": self.patch_size, "merge_size": self.merge_size}

    def describe(self) -> str:
        return f"qwen25, JSON pixels of smart_resize (min_pixels {self.min_pixels}, max_pixels {self.max_pixels})"

    def parse(self, text: str) -> ParseResult:
        """Every ``"bbox_2d": [x1, y1, x2, y2]`` in ``text``, in order: inside a JSON object or a list of them, in a
        ```json code fence or not, beside free text, also cut short (as Qwen2.5-VL writes, a truncated list keeps its
        complete boxes). Pixels of the resized image -> normalised; corners sorted. A bbox_2d that is not 4 numbers,
        or lies outside the resized image (beyond codec.CLIP_TOLERANCE of its side), is a ParseError; needs the image
        bound (an unbound format reports that as the one error)."""
        res = ParseResult()
        if self.resized is None:
            if _BBOX_KEY.search(text):
                res.errors.append(ParseError(0, "qwen25 boxes are pixels of the resized image: bind the image "
                                                "(formats.for_image) before parsing"))
            return res
        scale = self._scale()
        for m in _BBOX_2D.finditer(text):
            start, end = m.span()
            parts = [p.strip() for p in m.group(1).split(",")]
            try:
                if len(parts) != 4 or not all(_JSON_NUM.fullmatch(p) for p in parts):
                    raise ValueError(f"expected [x1, y1, x2, y2] numbers, got [{_cut(m.group(1))}]")
                v = np.array([float(p) if len(p) <= 40 else float("inf") for p in parts]) / scale
                x1, y1, x2, y2 = v.tolist()
                box = check_boxes([[min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]])[0].tolist()
                res.shapes.append(Shape("box", ((box[0], box[1]), (box[2], box[3])), (start, end)))
            except ValueError as e:
                res.errors.append(ParseError(start, f"bbox_2d [{_cut(m.group(1))}] at {start} is not a box of the "
                                                    f"{self.resized[0]} x {self.resized[1]} image Qwen2.5-VL saw "
                                                    f"(smart_resize): {str(e).split(';')[0]}"))
        return res


_BBOX_KEY = re.compile(r"""["']bbox_2d["']""")
_BBOX_2D = re.compile(r"""["']bbox_2d["']\s*:\s*\[([^\[\]]*)\]""")
_JSON_NUM = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


LocationFormat = Union[GETokConfig, TextFormat, BinsFormat, Qwen25Format]


@dataclass(frozen=True)
class LocationOptions:
    """The options that choose a location format, as every command takes them (``convert-datasets --format bins
    --bins 64``, ``python -m llava_getok.train --getok_grid 16``, ...): the format's name and the parameters of each
    format, declared where the formats declare them."""

    format: str = option("getok", "how answers write locations: getok (grid + offset tokens), text (LLaVA-1.5's "
                         "[0.12, 0.34, 0.56, 0.78]), bins (1D tokens <loc_k>, 4 a box) or qwen25 (Qwen2.5-VL's own "
                         "JSON {\"bbox_2d\": [...]} in pixels of its smart_resized image: rec and det, frame orig); "
                         "text, bins and qwen25: boxes (and points) only", choices=FORMAT_NAMES + CONVERT_ONLY)
    decimals: int = same_option(TextFormat, "decimals")
    bins: int = same_option(BinsFormat, "bins")
    min_pixels: int = same_option(Qwen25Format, "min_pixels")
    max_pixels: int = same_option(Qwen25Format, "max_pixels")
    grid: int = same_option(GETokConfig, "grid")
    rounds: int | None = same_option(GETokConfig, "rounds")
    offset_levels: int = same_option(GETokConfig, "offset_levels")
    schedule: str = same_option(GETokConfig, "schedule")
    mode: str = same_option(GETokConfig, "mode")

    def build(self) -> LocationFormat:
        """The format these options name (ValueError for bad values)."""
        if self.format == "text":
            return TextFormat(decimals=self.decimals)
        if self.format == "bins":
            return BinsFormat(bins=self.bins)
        if self.format == "qwen25":
            return Qwen25Format(min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return GETokConfig.from_dict(self.__dict__)


# -- one call for every format ---------------------------------------------------------------------------------

def format_name(fmt: LocationFormat) -> str:
    return "getok" if isinstance(fmt, GETokConfig) else fmt.name


def format_to_dict(fmt: LocationFormat) -> dict:
    """``{"name": ..., ...}``: what the sidecar stores (and a text / bins record's ``getok.format``).

    >>> format_to_dict(BinsFormat(bins=64)), format_to_dict(GETokConfig(grid=4))["name"]
    ({'name': 'bins', 'bins': 64}, 'getok')
    """
    return {"name": "getok", **fmt.to_dict()} if isinstance(fmt, GETokConfig) else fmt.to_dict()


def format_from_dict(d: dict) -> LocationFormat:
    """The inverse of :func:`format_to_dict`; a dict without ``name`` is a GETok config (old sidecars, ``getok.config``).
    ValueError (or TypeError) for an unknown name or bad values."""
    if not isinstance(d, dict):
        raise ValueError(f"a location format must be an object like {{\"name\": \"bins\", \"bins\": 1000}}, got {d!r}")
    d = dict(d)
    name = d.pop("name", "getok")
    if name == "getok":
        return GETokConfig.from_dict(d)
    if name == "text":
        return TextFormat(**d)
    if name == "bins":
        return BinsFormat(**d)
    if name == "qwen25":
        d.pop("resized", None)
        return Qwen25Format(**d)
    raise ValueError(f"unknown location format {name!r}; one of {', '.join(FORMAT_NAMES + CONVERT_ONLY)}")


def record_format(getok: dict) -> LocationFormat:
    """The format of a converted record's ``getok`` field: ``format`` (text, bins) or ``config`` (GETok, as every
    GETok record since the first version writes it). ValueError when it has neither or they are not valid."""
    if "format" in getok:
        return format_from_dict(getok["format"])
    if "config" in getok:
        if not isinstance(getok["config"], dict):
            raise ValueError(f"'config' must be an object like {{\"grid\": 32, \"mode\": \"inline\"}}, got {getok['config']!r}")
        return GETokConfig.from_dict(getok["config"])
    raise ValueError("no 'format' (text, bins) or 'config' (getok)")


def data_formats(records) -> list[LocationFormat]:
    """The distinct location formats of converted records (those whose ``getok`` field says one), in order of first
    appearance; ValueError naming the record for one that does not parse."""
    out, seen = [], set()
    for k, r in enumerate(records or ()):
        g = r.get("getok") if isinstance(r, dict) else None
        if not isinstance(g, dict) or not ("format" in g or "config" in g):
            continue
        key = repr(g.get("format", g.get("config")))
        if key in seen:
            continue
        seen.add(key)
        try:
            out.append(record_format(g))
        except (TypeError, ValueError) as e:
            raise ValueError(f"record {k} (id {r.get('id')!r}): getok: {e}") from None
    return out


def record_format_dict(fmt: LocationFormat) -> dict:
    """What a converted record's ``getok`` field says about its format: ``{"config": ...}`` for GETok (unchanged
    since the first version), ``{"format": ...}`` for the others."""
    return {"config": fmt.to_dict()} if isinstance(fmt, GETokConfig) else {"format": fmt.to_dict()}


def describe(fmt: LocationFormat) -> str:
    """One phrase for tables and messages, e.g. ``getok, grid 32, 1 round`` or ``bins, K = 1000``."""
    if isinstance(fmt, GETokConfig):
        return f"getok, grid {fmt.grid}, {fmt.rounds} round{'s' if fmt.rounds != 1 else ''}, m = {fmt.offset_levels}"
    return fmt.describe()


def same_tokens(a: LocationFormat, b: LocationFormat) -> bool:
    """Whether a model trained on format ``a`` writes format ``b``: the same name and the same tokens (GETok: grid,
    offset levels and schedule; its mode and rounds are the data's; text: any decimals)."""
    if format_name(a) != format_name(b):
        return False
    if isinstance(a, GETokConfig):
        return a.with_mode("grid") == b.with_mode("grid")
    return a.tokens() == b.tokens()


def for_image(fmt: LocationFormat, size) -> LocationFormat:
    """``fmt`` ready to encode and parse the answers about an image of ``size`` (W, H): the format itself, but for one
    whose numbers depend on the image (qwen25: pixels of the smart_resized image), bound to it."""
    bind = getattr(fmt, "for_image", None)
    return bind(size) if bind is not None else fmt


def encode_boxes(boxes, fmt: LocationFormat) -> list[str]:
    """Normalised boxes (N, 4) -> one answer string per box."""
    return codec.encode_boxes(boxes, fmt) if isinstance(fmt, GETokConfig) else fmt.encode_boxes(boxes)


def encode_point(xy, fmt: LocationFormat) -> str:
    """A normalised point (x, y) -> its answer string."""
    return codec.encode_point(xy, fmt) if isinstance(fmt, GETokConfig) else fmt.encode_points([xy])[0]


def encode_shape(shape: Shape, fmt: LocationFormat) -> str:
    """A normalised shape -> its answer string; text and bins have no form for polylines and masks (ValueError)."""
    if isinstance(fmt, GETokConfig):
        return codec.encode_shape(shape, fmt)
    if shape.kind == "box":
        return fmt.encode_boxes([shape.box])[0]
    if shape.kind == "point":
        return fmt.encode_points([shape.points[0]])[0]
    raise ValueError(f"the {fmt.name} format has no form for a {shape.kind} (only boxes and points); use the getok format")


def render(shapes, fmt: LocationFormat, sep: str = " ") -> str:
    """Shapes -> one answer string; the inverse of ``parse(...).shapes``. A format that writes its answer whole (qwen25:
    one JSON list) writes the boxes its way."""
    if hasattr(fmt, "answer"):
        other = [s.kind for s in shapes if s.kind != "box"]
        if other:
            raise ValueError(f"the {fmt.name} format has no form for a {other[0]} (boxes only)")
        return fmt.answer([s.box for s in shapes])
    return sep.join(encode_shape(s, fmt) for s in shapes)


def parse(text: str, fmt: LocationFormat) -> ParseResult:
    """Generated (or written) text -> shapes normalised in the model's frame, and errors; never raises."""
    return parse_getok(text, fmt) if isinstance(fmt, GETokConfig) else fmt.parse(text)


def parse_ids(ids, id_to_token: dict[int, str], fmt: LocationFormat) -> ParseResult:
    """Generated token ids -> shapes, strictly by id (``id_to_token``: the format's tokens only). Text coordinates
    are ordinary text: for ``text`` decode the ids and call :func:`parse`."""
    if isinstance(fmt, GETokConfig):
        return parse_getok_ids(ids, id_to_token, fmt)
    if isinstance(fmt, BinsFormat):
        return fmt.parse_ids(ids, id_to_token)
    raise ValueError("text coordinates are parsed from the decoded text: call formats.parse")

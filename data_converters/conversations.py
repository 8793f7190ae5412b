"""The one function that turns a validated Sample into a LLaVA conversation record (docs/data-format.md);
its inverse for inspection is :func:`llava_getok.records.decode_record`.

Token strings come from :mod:`llava_getok.formats` (GETok's from :mod:`llava_getok.codec`) only; frames from :mod:`llava_getok.geometry`; what a record
holds (prompts, pixel shapes and their rounding, the mask's RLE) from :mod:`llava_getok.records`.

Decisions where the issue and spec are silent (a LLaVA user's expectations):
- Prompts: ``records.PROMPTS``, LLaVA-1.5's own REC / REG wording, one fixed prompt per task.
- ids: ``{sample.id}-{task}`` (``llava`` keeps the source's ids unchanged).
- ``getok.task`` is the base task (rec, det, point, res, reg); a two-turn record has ``config.mode`` =
  "refine". ``--task refine`` is shorthand for ``--task rec --mode refine``.
- Refine examples (spec sections 5-6): boxes and points: the first answer's cell, per axis, is drawn
  (seeded) among the cells whose anchor the one refinement offset can bring to within the codec's error
  bound of the truth (the true cell or, near a cell border, its neighbour), so every second answer is
  correct and the round trip stays within ``cfg.max_error``. Masks: the greedy's anchors plus about one
  wrong anchor in four, drawn (seeded) from the cells around the mask; offsets and ``<delete>`` from
  :func:`llava_getok.masks.mask_refinement_offsets`; ``getok.shapes`` then holds the refined anchors.
- Pointing: the sample's points, else the mask's most interior pixel (largest distance to the border),
  else each box's centre.
- An expression with no target (``boxes`` empty, e.g. VLM-R1 nulls) is answered with NO_MATCH, no box.
- A format that writes its whole answer (``qwen25``: Qwen2.5-VL's JSON list) asks with its own prompts
  (``Qwen25Format.PROMPTS``) and answers with ``fmt.answer``, the expression as each box's label.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

from llava_getok.codec import Refinement, Shape, apply_refinement, encode_mask_points, encode_refinement, refinement_offsets
from llava_getok.formats import LocationFormat, encode_boxes, encode_point, format_name, record_format_dict
from llava_getok.geometry import boxes_to_frame, points_to_frame
from llava_getok.records import NO_MATCH, PROMPTS, REFINE_PROMPT, json_shape, round_pixels, shapes_to_pixels
from llava_getok.rle import rle_to_mask

from .base import Sample
from .inputs import ConvertError, Filtered

TASKS = ("rec", "reg", "point", "res", "det", "refine", "rewrite")
BOX_SLOT = "\x00box\x00"  # placeholder a source's own conversation holds where a box goes (``llava``)
WRONG_FRACTION = 0.25  # refine on masks: about this share of the first answer's anchors are wrong


_NUL = "\\u0000"  # a NUL character as json.dumps writes it


def _escaped(line: str, at: int) -> bool:
    """Whether the backslash at ``at`` of a line json.dumps wrote is itself escaped (an odd number of
    backslashes before it): then ``\\u0000`` there is a backslash and the text "u0000", not a NUL."""
    k = at
    while k > 0 and line[k - 1] == "\\":
        k -= 1
    return (at - k) % 2 == 1


def _nuls(line: str) -> list[int]:
    """The positions of the NUL characters in a line json.dumps wrote (each written ``\\u0000``)."""
    out, at = [], line.find(_NUL)
    careful = "\\" + _NUL in line  # only then can an occurrence be a backslash and the text "u0000"
    while at != -1:
        if not (careful and _escaped(line, at)):
            out.append(at)
        at = line.find(_NUL, at + 1)
    return out


def count_nul(line: str) -> int:
    """The NUL characters in a line json.dumps wrote."""
    return line.count(_NUL) if "\\" + _NUL not in line else len(_nuls(line))


class BatchEncoder:
    """Defers ``formats.encode_boxes`` for a batch of records to one call (numpy costs per call, not per box).

    Calling it returns placeholders (``NUL T k NUL``); :meth:`resolve` encodes every collected box at once and
    puts the tokens into the records' JSON lines. The pipeline rejects a record whose line holds any NUL besides
    its own placeholders (:func:`count_nul`), so input text cannot forge one; text that merely reads
    ``\\u0000T0\\u0000`` (backslashes, escaped by json.dumps) is not a placeholder either.
    """

    def __init__(self, cfg: LocationFormat):
        self.cfg, self.boxes = cfg, []

    def __call__(self, boxes, cfg=None) -> list[str]:
        start = len(self.boxes)
        self.boxes.extend(np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist())
        return [f"\x00T{k}\x00" for k in range(start, len(self.boxes))]

    def resolve(self, lines: list[str]) -> list[str]:
        if not self.boxes:
            return lines
        tokens = encode_boxes(self.boxes, self.cfg)
        return [self._resolve(line, tokens) if _NUL in line else line for line in lines]

    @staticmethod
    def _resolve(line: str, tokens: list[str]) -> str:
        """Every placeholder of ``line`` replaced by its box's tokens. The pipeline has checked that the line's
        NULs are exactly its placeholders' (``count_nul``), so they pair up in order: opening, closing."""
        nuls, out, end = _nuls(line), [], 0
        for a, b in zip(nuls[::2], nuls[1::2]):
            out += [line[end:a], tokens[int(line[a + len(_NUL) + 1 : b])]]
            end = b + len(_NUL)
        return "".join(out) + line[end:]


@functools.lru_cache(maxsize=16)
def _format_dict(fmt: LocationFormat) -> dict:
    """``{"config": ...}`` (GETok) or ``{"format": ...}`` (text, bins): what a record's getok field says of its format."""
    return record_format_dict(fmt)


def record_rng(seed: int, sample_id: str) -> np.random.Generator:
    """A generator that depends on the seed and the record only (not on workers or order)."""
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _phrase(expression, sample):
    if not expression or not str(expression).strip():
        raise ConvertError(sample.where, sample.field_name("expression"), "missing or empty", "missing expression")
    return str(expression).strip().rstrip(".")


def build_record(sample: Sample, task: str, cfg: LocationFormat, frame: str, seed: int = 0, source: str = "",
                 image_loader=None, generator=None, box_encoder=None, greedy=(0.8, 64)) -> dict:
    """A validated Sample (``Sample.validated``) -> one LLaVA record with its ``getok`` field.

    ``cfg``: the location format of the answers (a GETokConfig, or formats.TextFormat / BinsFormat); text and bins
    have no form for masks (``res``) and no refine mode: ValueError naming the format and task.

    ``image_loader()`` returns the image as an (H, W, 3) array; only ``res`` calls it (proposals).
    ``box_encoder``: a :class:`BatchEncoder` to defer box encoding (the pipeline's batches); default
    ``formats.encode_boxes``. ``greedy``: RES's (tau, max_points) for ``masks.greedy_mask_anchors``.
    """
    enc = box_encoder or encode_boxes
    if format_name(cfg) != "getok" and (task in ("res", "refine") or getattr(cfg, "mode", None) == "refine"):
        raise ValueError(f"the {format_name(cfg)} format has no form for task {task!r} (masks and refinements are GETok's)")
    if hasattr(cfg, "answer"):  # a format that writes its whole answer, with prompts of its own (qwen25)
        return _own_answer_record(sample, task, cfg, frame, source)
    if sample.turns is not None:
        return _rewrite_record(sample, cfg, frame, source, enc)
    if task == "refine":
        task, cfg = "rec", cfg.with_mode("refine")
    rng = record_rng(seed, sample.id)
    size = sample.size
    getok_extra = {}
    if task == "reg":
        if len(sample.boxes) != 1:
            raise ConvertError(sample.where, sample.field_name("boxes"), f"REG needs exactly one box, got {len(sample.boxes)}", "REG needs one box")
        region = enc(boxes_to_frame([sample.boxes[0]], size, frame), cfg)[0]
        human = PROMPTS["reg"].format(region=region)
        turns = [human, str(_phrase(sample.expression, sample)) + "."]
        shapes = [_box_shape(sample.boxes[0])]
    elif task in ("rec", "det"):
        human = PROMPTS[task].format(expression=_phrase(sample.expression, sample))
        if not sample.boxes:
            turns, shapes = [human, NO_MATCH], []
        else:
            norm = boxes_to_frame(np.asarray(sample.boxes, dtype=np.float64), size, frame)
            turns = [human] + (_answer("box", norm.reshape(-1, 2, 2), cfg, rng) if _refine(cfg) else [" ".join(enc(norm, cfg))])
            shapes = [_box_shape(b) for b in sample.boxes]
    elif task == "point":
        human = PROMPTS["point"].format(expression=_phrase(sample.expression, sample))
        pts = _point_targets(sample)
        if not pts:
            turns, shapes = [human, NO_MATCH], []
        else:
            norm = points_to_frame(np.asarray(pts, dtype=np.float64), size, frame)
            turns = [human] + _answer("point", norm.reshape(-1, 1, 2), cfg, rng)
            shapes = [json_shape("point", [p]) for p in pts]
        # the target region, so that pointing is scored as "inside the object" (mask, else box)
        rle = sample.mask_rle()
        if rle is not None:
            getok_extra["mask"] = rle
        if sample.boxes:
            getok_extra["boxes"] = [round_pixels(b) for b in sample.boxes]
    elif task == "res":
        turns, shapes, getok_extra = _res(sample, cfg, frame, rng, image_loader, generator, greedy)
    else:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    conversations = [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]
    conversations[0]["value"] = "<image>\n" + conversations[0]["value"]
    return {
        "id": f"{sample.id}-{task}",
        "image": sample.image,
        "conversations": conversations,
        "getok": {
            "source": source, "task": task, "split": sample.split, "frame": frame, "size": [_r1(v) for v in size] if size else None,
            **_format_dict(cfg), "expression": sample.expression, "shapes": shapes, **getok_extra,
        },
    }


def _own_answer_record(sample: Sample, task: str, fmt, frame: str, source: str) -> dict:
    """A REC / detection record in a format that asks and answers in its own words (qwen25: Qwen2.5-VL's grounding
    prompt, its JSON list of labelled boxes in pixels of the image it resizes; the whole image, so ``orig``)."""
    if task not in fmt.PROMPTS or sample.turns is not None:
        raise ValueError(f"the {fmt.name} format writes {' and '.join(fmt.PROMPTS)} records only, not {task if sample.turns is None else 'rewrite'!r}")
    if frame != "orig":
        raise ValueError(f"the {fmt.name} format is in the frame its model sees, the whole image: --frame orig, not {frame!r}")
    phrase = _phrase(sample.expression, sample)
    human = fmt.PROMPTS[task].format(expression=phrase)
    bound = fmt.for_image(sample.size)
    norm = boxes_to_frame(np.asarray(sample.boxes, dtype=np.float64).reshape(-1, 4), sample.size, frame)
    answer = bound.answer(norm, label=phrase) if len(norm) else NO_MATCH
    return {
        "id": f"{sample.id}-{task}",
        "image": sample.image,
        "conversations": [{"from": "human", "value": "<image>\n" + human}, {"from": "gpt", "value": answer}],
        "getok": {
            "source": source, "task": task, "split": sample.split, "frame": frame, "size": [_r1(v) for v in sample.size],
            **_format_dict(fmt), "expression": sample.expression, "shapes": [_box_shape(b) for b in sample.boxes],
        },
    }


def group_turns(records: list[dict]) -> dict:
    """Records of one image -> one multi-turn conversation, as LLaVA-1.5's own REC / REG data are written
    (llava_v1_5_mix665k holds several questions about an image in one record): the image is encoded once for
    all of them, and each answer is supervised. The record takes the first one's id + "+N" (N more turns);
    ``getok`` keeps what the records share and lists what differs per record in ``getok.turns``."""
    if len(records) == 1:
        return records[0]
    conversations = list(records[0]["conversations"])
    for r in records[1:]:
        later = [dict(t) for t in r["conversations"]]
        later[0]["value"] = later[0]["value"].replace("<image>", "").strip()  # one image per conversation
        conversations += later
    metas = [dict(r["getok"], id=r["id"]) for r in records]
    shared = {k: v for k, v in metas[0].items() if k != "id" and all(m.get(k, _MISSING) == v for m in metas)}
    turns = [{k: v for k, v in m.items() if k not in shared} for m in metas]
    return {"id": f"{records[0]['id']}+{len(records) - 1}", "image": records[0]["image"],
            "conversations": conversations, "getok": {**shared, "turns": turns}}


_MISSING = object()


def _r1(v):
    return int(v) if float(v).is_integer() else float(v)


def _box_shape(b):
    return json_shape("box", [b[:2], b[2:]])


def _refine(fmt) -> bool:
    return getattr(fmt, "mode", None) == "refine"


def _answer(kind, groups, cfg, rng) -> list[str]:
    """Answer turn(s) for groups of normalised points (G, P, 2): one answer, or two in refine mode."""
    if not _refine(cfg):
        return [_render(kind, groups, cfg)]
    first = np.stack([_reachable_first(g, cfg, rng) for g in groups])
    if kind == "box":  # corners may cross after the draw: keep x1 <= x2, y1 <= y2 (each corner its own target)
        first = np.stack([np.minimum(first[:, 0], first[:, 1]), np.maximum(first[:, 0], first[:, 1])], 1)
    text = _render(kind, first, cfg)
    anchors = [cfg.anchors(cfg.cells(g)) for g in first]
    refs = [Refinement(kind, tuple(refinement_offsets(a, t, cfg))) for a, t in zip(anchors, groups)]
    return [text, REFINE_PROMPT.format(answer=text), encode_refinement(refs, cfg)]


def _render(kind, groups, cfg):
    if kind == "box":
        return " ".join(encode_boxes(np.asarray(groups).reshape(-1, 4), cfg))
    return " ".join(encode_point(p, cfg) for g in groups for p in g)


def _reachable_first(points, cfg, rng):
    """A first-answer point per target point: an anchor from which one offset lands within the error bound."""
    n, s, h = cfg.grid, cfg.step(1), cfg.half
    out = np.empty_like(points)
    for k, p in enumerate(np.clip(points, 0, 1)):
        for ax, cell in enumerate(cfg.cells(p).tolist()):
            cells = [c for c in (cell - 1, cell, cell + 1) if 0 <= c < n and abs(cfg.anchors(c) - p[ax]) <= h * s + s / 2 + 1e-12]
            out[k, ax] = cfg.anchors(cells[int(rng.integers(len(cells)))])
    return out


def _point_targets(sample):
    if sample.points:
        return [list(p) for p in sample.points]
    rle = sample.mask_rle()
    if rle is not None:
        from pycocotools import mask as mask_utils
        from scipy.ndimage import distance_transform_edt

        x0, y0, bw, bh = (int(v) for v in mask_utils.toBbox(rle))
        m = rle_to_mask(rle)[y0 : y0 + bh + 1, x0 : x0 + bw + 1]  # crop: EDT cost ~ area
        if m.any():
            d = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(np.argmax(d)), d.shape)  # first maximum in row-major order
            return [[x0 + x + 0.5, y0 + y + 0.5]]
    return [[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in sample.boxes]


def _res(sample, cfg, frame, rng, image_loader, generator, greedy=(0.8, 64)):
    from llava_getok.masks import SuperpixelGenerator, greedy_mask_anchors, mask_cells_near, mask_refinement_offsets

    generator = generator or SuperpixelGenerator()

    human = PROMPTS["res"].format(expression=_phrase(sample.expression, sample))
    rle = sample.mask_rle()
    if rle is None:
        raise ConvertError(sample.where, sample.field_name("segmentation"), "RES needs a mask (polygons or RLE)", "no mask for RES")
    gt = rle_to_mask(rle)
    if image_loader is None:
        raise ConvertError(sample.where, sample.field_name("image"), "RES needs the image (pass --image-root)", "image not found")
    image = image_loader()
    if image.shape[:2] != gt.shape:
        raise ConvertError(sample.where, sample.field_name("image"), f"image is {image.shape[1]}x{image.shape[0]}, annotation says {gt.shape[1]}x{gt.shape[0]}", "image size differs from annotation")
    anchors = np.asarray(greedy_mask_anchors(gt, image, cfg, frame, generator, *greedy), dtype=np.float64).reshape(-1, 2)
    if len(anchors) == 0:
        raise Filtered("no mask anchor (no proposal overlaps the mask)")
    size = sample.size
    if cfg.mode != "refine":
        turns = [human, encode_mask_points(anchors, cfg)]
        final = anchors
    else:
        pool = mask_cells_near(gt, cfg, frame)
        pool = pool[~(np.abs(pool[:, None, :] - anchors[None, :, :]).sum(-1) < 1e-9).any(1)]
        k = min(len(pool), max(1, int(round(WRONG_FRACTION * len(anchors)))))
        wrong = pool[np.sort(rng.choice(len(pool), size=k, replace=False))] if k else np.zeros((0, 2))
        pts = np.concatenate([anchors, wrong])
        cells = cfg.cells(pts)
        pts = pts[np.lexsort((cells[:, 0], cells[:, 1]))]  # row-major, the order encode_mask_points writes
        text = encode_mask_points(pts, cfg)
        offs = mask_refinement_offsets(pts, gt, cfg, frame)
        ref = Refinement("mask", tuple(offs))
        turns = [human, text, REFINE_PROMPT.format(answer=text), encode_refinement([ref], cfg)]
        moved = apply_refinement([Shape("mask", tuple(map(tuple, pts.tolist())))], [ref], cfg)
        final = np.asarray(moved[0].points) if moved else np.zeros((0, 2))
    shapes = shapes_to_pixels([Shape("mask", tuple(map(tuple, final.tolist())))], size, frame) if len(final) else []
    proposals = generator.config() if hasattr(generator, "config") else None
    return turns, shapes, {"mask": rle, "proposals": proposals}


def _rewrite_record(sample: Sample, cfg, frame, source, enc=encode_boxes) -> dict:
    """``llava``: the source's own conversation, every BOX_SLOT replaced by the box's tokens."""
    record = dict(sample.source_fields or {})
    if not sample.boxes:
        return record  # nothing to rewrite: the record passes through unchanged
    if sample.normalised is not None and sample.normalised[0] == frame:
        norm = sample.normalised[1]  # the source's own numbers, already in this frame
    else:
        norm = boxes_to_frame(np.asarray(sample.boxes, dtype=np.float64), sample.size, frame)
    tokens = iter(enc(norm, cfg))
    record["conversations"] = [
        {**t, "value": "".join(part if k == 0 else next(tokens) + part for k, part in enumerate(t["value"].split(BOX_SLOT)))}
        if BOX_SLOT in t["value"] else t
        for t in sample.turns
    ]
    record["getok"] = {
        "source": source, "task": "rewrite", "split": sample.split, "frame": frame, "size": [_r1(v) for v in sample.size],
        **_format_dict(cfg), "expression": None, "shapes": [_box_shape(b) for b in sample.boxes],
    }
    return record

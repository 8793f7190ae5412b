"""`shapes`: a procedural referring-expression dataset, the embedded default that trains on a CPU.

Each image holds a few coloured shapes (kinds x colours x sizes) on a plain background; each record is one
target with an expression that resolves it: by attributes ("the red circle", "the small square") or by a
relation to another, uniquely described shape ("the small square left of the blue triangle"). Ground truth:
the tight pixel box, the exact mask (shapes are drawn without anti-aliasing, so the mask is the pixels of
that colour the shape owns) and a point inside the shape (the mask pixel nearest its centroid).

Seeded and deterministic: scene ``k`` of a split depends only on (seed, split, k), never on the order of
generation. The scene part (``make_scene``, ``describe``) is pure numpy + PIL and is also what
``bench/learning*.py`` use in memory.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
# Side as a fraction of the image side. At the demo's 64 px with 8 px patches a small shape spans 2-3 patches
# and a large one 3-4: with smaller shapes (9-13 px) a tiny random tower could place a box on the right
# shape but rarely within IoU 0.5 of it (bench/results/learning_trials.md).
SIZES = {"small": (0.2, 0.28), "large": (0.36, 0.48)}
BACKGROUND = (235, 235, 235)
RELATIONS = {  # name -> test on (target centre, anchor centre), both (x, y) in pixels
    "left of": lambda t, a: t[0] < a[0],
    "right of": lambda t, a: t[0] > a[0],
    "above": lambda t, a: t[1] < a[1],
    "below": lambda t, a: t[1] > a[1],
}


@dataclass
class Obj:
    """One drawn shape. box = (x1, y1, x2, y2) in pixels, x2/y2 exclusive (pixel edges)."""

    kind: str
    color: str
    size: str
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)  # (H, W) bool, the pixels this shape owns in the final image

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def point(self) -> tuple[float, float]:
        """A pixel centre inside the shape: the mask pixel nearest the mask's centroid."""
        ys, xs = np.nonzero(self.mask)
        k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
        return (float(xs[k]) + 0.5, float(ys[k]) + 0.5)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one scene: a function of (seed, split, index) only."""
    digest = hashlib.sha256(f"shapes/{seed}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _draw(draw: ImageDraw.ImageDraw, kind: str, box, fill) -> None:
    x1, y1, x2, y2 = box  # exclusive right/bottom edge; PIL's shapes include their end coordinate
    if kind == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif kind == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    else:  # triangle pointing up
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)


def make_scene(rng: np.random.Generator, image_size: int = 64, n_objects: tuple[int, int] = (2, 4),
               max_tries: int = 200):
    """Draw ``n_objects`` (inclusive range) non-overlapping shapes -> (RGB uint8 image (S, S, 3), [Obj])."""
    s = image_size
    want = int(rng.integers(n_objects[0], n_objects[1] + 1))
    img = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    objs: list[Obj] = []
    for _ in range(max_tries):
        if len(objs) == want:
            break
        size = str(rng.choice(list(SIZES)))
        lo, hi = SIZES[size]
        side = max(3, int(round(rng.uniform(lo, hi) * s)))
        x1, y1 = int(rng.integers(0, s - side + 1)), int(rng.integers(0, s - side + 1))
        box = (x1, y1, x1 + side, y1 + side)
        if any(_overlap(box, o.box, margin=1) for o in objs):
            continue
        kind, color = str(rng.choice(KINDS)), str(rng.choice(list(COLORS)))
        layer = Image.new("L", (s, s), 0)
        _draw(ImageDraw.Draw(layer), kind, box, 255)
        mask = np.asarray(layer) > 0
        _draw(draw, kind, box, COLORS[color])
        ys, xs = np.nonzero(mask)
        tight = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objs.append(Obj(kind, color, size, tight, mask))
    return np.asarray(img).copy(), objs


def _overlap(a, b, margin=0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


# Attribute descriptions, shortest first: which attributes name a shape.
_ATTRS = (("kind",), ("color",), ("color", "kind"), ("size", "kind"), ("size", "color", "kind"))


def _phrase(o: Obj, attrs) -> str:
    words = [o.size if "size" in attrs else None, o.color if "color" in attrs else None,
             o.kind if "kind" in attrs else "shape"]
    return "the " + " ".join(w for w in words if w)


def _matches(o: Obj, ref: Obj, attrs) -> bool:
    return all(getattr(o, a) == getattr(ref, a) for a in attrs)


def describe(objs: list[Obj], target: int, rng: np.random.Generator, p_relation: float = 0.3,
             attributes: tuple[str, ...] | None = None) -> str | None:
    """An expression that picks out ``objs[target]`` alone, or None if the scene allows none.

    Attribute expressions use the shortest attribute set that is unique (a random one among equally short);
    with probability ``p_relation``, or when no attribute set is unique, a relation to an anchor shape that
    has a unique attribute expression: the target's attributes need only be unique among the shapes that
    stand in that relation to the anchor. ``attributes`` (e.g. ("color",)): name the target by exactly
    these attributes ("the red shape"), no relation; None if they do not single it out.
    """
    t = objs[target]
    if attributes is not None:
        return _phrase(t, attributes) if sum(_matches(o, t, attributes) for o in objs) == 1 else None
    unique = [a for a in _ATTRS if sum(_matches(o, t, a) for o in objs) == 1]
    relational = []
    for ai, anchor in enumerate(objs):
        if ai == target:
            continue
        anchor_attrs = [a for a in _ATTRS if sum(_matches(o, anchor, a) for o in objs) == 1]
        if not anchor_attrs:
            continue
        for rel, test in RELATIONS.items():
            if not test(t.center, anchor.center):
                continue
            for attrs in _ATTRS[:4]:
                hits = [o for k, o in enumerate(objs)
                        if k != ai and _matches(o, t, attrs) and test(o.center, anchor.center)]
                if len(hits) == 1:
                    relational.append((attrs, rel, anchor, anchor_attrs[0]))
                    break
    use_relation = relational and (not unique or rng.random() < p_relation)
    if use_relation:
        attrs, rel, anchor, anchor_attrs = relational[int(rng.integers(len(relational)))]
        return f"{_phrase(t, attrs)} {rel} {_phrase(anchor, anchor_attrs)}"
    if not unique:
        return None
    shortest = [a for a in unique if len(a) == len(unique[0])]
    return _phrase(t, shortest[int(rng.integers(len(shortest)))])


def expression_type(expression: str) -> str:
    """What an expression of :func:`describe` names its target by: "relation", or its attributes joined by "+"
    in the order it says them ("color", "kind", "color+kind", "size+kind", ...).

    >>> expression_type("the red shape"), expression_type("the small circle"), expression_type("the square left of the red shape")
    ('color', 'size+kind', 'relation')
    """
    if any(f" {rel} " in expression for rel in RELATIONS):
        return "relation"
    words = expression.split()
    return "+".join(a for a, names in (("size", SIZES), ("color", COLORS), ("kind", KINDS)) if any(w in names for w in words))


# -- the on-disk dataset: PNG images + one JSONL annotation file -----------------------------------------
#
#   DIR/images/{split}/{split}-{k:06d}.png
#   DIR/annotations.jsonl    one referring expression a line:
#       {"id", "image" (relative to DIR), "split", "width", "height", "expression",
#        "box": [x1, y1, x2, y2] (pixels, exclusive right/bottom edge), "point": [x, y],
#        "mask": COCO compressed RLE {"size": [H, W], "counts": str},
#        "target": {"kind", "color", "size"}, "scene_boxes": the boxes of every shape in the image
#        (the demo's "box of a random shape" chance level)}
#   DIR/shapes.json          the generator's settings (so a folder says how it was made)

ANNOTATIONS = "annotations.jsonl"
TASKS = ("rec", "res", "point", "reg")
FORMATS = (f"a folder written by `python -m data_converters.shapes` (--input DIR or DIR/{ANNOTATIONS}; "
           "image paths relative to DIR, so pass --image-root DIR)")


def scene_records(seed: int, split: str, index: int, image_size: int = 64, n_objects=(2, 4),
                  p_relation: float = 0.3, refs_per_image: int = 1, attributes: tuple[str, ...] | None = None):
    """Scene ``index`` of ``split`` -> (image array, [annotation dict]) with up to ``refs_per_image``
    distinct targets; a scene whose shapes admit no expression is redrawn (same generator, so deterministic).
    ``attributes``: as in :func:`describe`."""
    from pycocotools import mask as mask_utils

    rng = scene_rng(seed, split, index)
    while True:
        img, objs = make_scene(rng, image_size, n_objects)
        refs = []
        for t in rng.permutation(len(objs)).tolist():
            expr = describe(objs, t, rng, p_relation, attributes)
            if expr is not None:
                refs.append((t, expr))
            if len(refs) == refs_per_image:
                break
        if refs:
            break
    name = f"images/{split}/{split}-{index:06d}.png"
    out = []
    for t, expr in refs:
        o = objs[t]
        rle = mask_utils.encode(np.asfortranarray(o.mask.astype(np.uint8)))
        out.append({
            "id": f"shapes-{split}-{index:06d}-{t}", "image": name, "split": split,
            "width": image_size, "height": image_size, "expression": expr,
            "box": list(o.box), "point": list(o.point()),
            "mask": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "target": {"kind": o.kind, "color": o.color, "size": o.size},
            "scene_boxes": [list(x.box) for x in objs],
        })
    return img, out


def generate(out_dir, splits: dict[str, int], seed: int = 0, image_size: int = 64, n_objects=(2, 4),
             p_relation: float = 0.3, refs_per_image: int = 1, progress: bool = False,
             attributes: dict[str, tuple[str, ...]] | None = None, workers: int = 1) -> Path:
    """Write the dataset (``splits`` = {"train": 2000, "val": 200}) to ``out_dir``; returns the annotation
    file. ``n_objects``: (min, max) shapes per image, or {split: (min, max)}; ``refs_per_image``: an int, or
    {split: int} (expressions of distinct targets per image); ``attributes``: {split: attribute names} for
    splits whose expressions name the target by those attributes alone (:func:`describe`), e.g. the
    demo's colour-only first stage; ``workers``: processes that draw (the files are the same for any
    number: a scene depends on its seed, split and index alone). Every file is written to a temporary name
    and renamed, so an interrupted run leaves no half file."""
    import json
    import multiprocessing
    import os
    from contextlib import nullcontext

    from tqdm import tqdm

    out = Path(out_dir)
    for split in splits:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    jobs = ((out, seed, split, k, image_size, _of_split(n_objects, split), p_relation,
             _of_split(refs_per_image, split), (attributes or {}).get(split))
            for split, n in splits.items() for k in range(n))
    lines = []
    with tqdm(total=sum(splits.values()), desc="shapes: drawing", unit="img", disable=not progress) as bar, \
            (multiprocessing.Pool(workers) if workers > 1 else nullcontext()) as pool:
        for recs in (pool.imap(_write_scene, jobs, chunksize=256) if pool else map(_write_scene, jobs)):
            lines.extend(json.dumps(r, sort_keys=True) for r in recs)
            bar.update()
    n_json = {k: list(v) for k, v in n_objects.items()} if isinstance(n_objects, dict) else list(n_objects)
    settings = {"seed": seed, "splits": splits, "image_size": image_size, "n_objects": n_json,
                "p_relation": p_relation, "refs_per_image": refs_per_image, "sizes": SIZES,
                "attributes": {k: list(v) for k, v in (attributes or {}).items()}}
    for name, text in ((ANNOTATIONS, "\n".join(lines) + "\n"), ("shapes.json", json.dumps(settings, indent=1))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out / ANNOTATIONS


def _write_scene(job) -> list[dict]:
    """Draw one scene of :func:`generate` and write its image; its annotation records."""
    import os

    out, seed, split, k, *settings = job
    img, recs = scene_records(seed, split, k, *settings)
    path = out / recs[0]["image"]
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(img).save(tmp)
    os.replace(tmp, path)
    return recs


def _of_split(value, split: str):
    """A generator setting given for every split, or as {split: value}."""
    return value[split] if isinstance(value, dict) else value


# -- the convert-datasets source (data_converters/base.py) ------------------------------------------------

def read(opts):
    from .inputs import json_lines

    path = Path(opts.input)
    if path.is_dir():
        path = path / ANNOTATIONS
    yield from json_lines(path)


def parse(raw, where, opts):
    from .base import Sample
    from .inputs import Filtered, record

    rec = record(raw, where)
    split = rec.string("split")
    if opts.split and split != opts.split:
        raise Filtered(f"split {split} (kept: {opts.split})")
    mask = rec.object("mask")
    if not isinstance(mask.obj.get("counts"), str):
        raise mask.error("counts", "expected COCO compressed RLE {'size': [H, W], 'counts': str}", "bad mask")
    return Sample(
        id=rec.string("id"), image=rec.string("image"), size=(rec.number("width"), rec.number("height")),
        expression=rec.string("expression"), boxes=(tuple(rec.numbers("box", 4)),), points=(tuple(rec.numbers("point", 2)),),
        rle=mask.obj, split=split, where=where, fields={"boxes": "box", "points": "point", "segmentation": "mask"},
    )


def parse_range(text: str) -> tuple[int, int]:
    """"2-4" -> (2, 4); "3" -> (3, 3). ValueError with the expected form otherwise."""
    try:
        lo, hi = (int(v) for v in (text.split("-") if "-" in text else (text, text)))
    except ValueError:
        raise ValueError(f"shapes per image must be MIN-MAX, e.g. 2-4, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"shapes per image needs 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m data_converters.shapes",
                                 description="Write the procedural `shapes` referring-expression dataset.")
    ap.add_argument("--output", type=Path, required=True, help="folder to write (images/ + annotations.jsonl)")
    ap.add_argument("--train", type=int, default=2000, help="training images")
    ap.add_argument("--val", type=int, default=200, help="validation images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--objects", default="2-4", help="shapes per image, MIN-MAX")
    ap.add_argument("--val-objects", default=None, help="shapes per val image, MIN-MAX (default: --objects)")
    ap.add_argument("--p-relation", type=float, default=0.3, help="share of relational expressions")
    ap.add_argument("--refs-per-image", type=int, default=1)
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args(argv)
    try:
        train_n, val_n = parse_range(a.objects), parse_range(a.val_objects or a.objects)
    except ValueError as e:
        ap.error(str(e))
    path = generate(a.output, {"train": a.train, "val": a.val}, a.seed, a.image_size,
                    {"train": train_n, "val": val_n}, a.p_relation, a.refs_per_image, a.progress)
    print(f"shapes: wrote {a.train + a.val} images and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

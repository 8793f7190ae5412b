"""``coco``: COCO instances JSON (``instances_val2017.json``): boxes, polygons and RLE masks.

Tasks: ``rec`` (box of one instance, asked by its category name), ``det`` (every instance of a category
in an image: one record per image and category), ``res`` (mask of one instance), ``point``, ``reg``.
Crowd regions (``iscrowd=1``) are one box around many objects: they are skipped (counted) for every task
but ``res``, where they become "group of CATEGORY"; ``det`` records leave them out of the answer.
Image sizes come from ``images[].width/height``; image paths are ``file_name`` (relative to --image-root).
The split is guessed from the file name (``instances_val2017.json`` -> "val") unless --split is given.
``images`` and ``categories`` are lookup tables: an entry without a distinct ``id`` stops the run (the file is
corrupt); an annotation is a record: a bad one is counted.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from .base import Sample
from .inputs import ConvertError, Fields, Filtered, as_key, json_type, load_json, lookup

TASKS = ("rec", "det", "res", "point", "reg")
FORMATS = "COCO instances JSON (images, annotations with bbox and polygon/RLE segmentation, categories)"


def load_instances(path: Path, tables=("images", "categories")):
    """A COCO instances file -> (its ``annotations`` list, {table: {id: entry}} for ``tables``): the file, its
    lists and the lookup tables' ids are checked here, a file that breaks the format is a file-level
    ConvertError (refcoco's instances.json is read the same way)."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise ConvertError(str(path), None, f"expected a COCO instances object, got {json_type(data)}", "not a COCO file")
    top = Fields(data, str(path))
    return top.array("annotations"), {t: lookup(top.array(t), "id", str(path), t) for t in tables}


def read(opts):
    path = Path(opts.input)
    annotations, tables = load_instances(path)
    images, cats = tables["images"], tables["categories"]
    split = opts.split or _split_of(path.name)
    anns = list(enumerate(annotations))
    anns.sort(key=lambda ka: (str(_field(ka[1], "image_id")), _order(_field(ka[1], "id")), ka[0]))  # same-image objects together
    if opts.task == "det":
        groups = defaultdict(list)
        for k, a in anns:
            groups[(_key(_field(a, "image_id")), _key(_field(a, "category_id")))].append((k, a))
        for (iid, cid), group in groups.items():
            yield f"{path.name}:image {iid} category {cid}", {"anns": group, "image": images.get(as_key(iid)), "category": cats.get(as_key(cid)), "split": split}
    else:
        for k, a in anns:
            yield (f"{path.name}:annotations[{k}] (id {_field(a, 'id')})",
                   {"ann": (k, a), "image": images.get(as_key(_field(a, "image_id"))), "category": cats.get(as_key(_field(a, "category_id"))), "split": split})


def _field(obj, key):
    return obj.get(key) if isinstance(obj, dict) else None


def _order(v):
    """A sort key for an annotation id: integers in order (valid files), anything else after them."""
    return (0, v) if isinstance(v, int) and not isinstance(v, bool) else (1, 0)


def _key(v):
    """A hashable stand-in for a join key read from the input (an id may be a list in a corrupt file)."""
    return v if isinstance(v, (str, int, float, type(None))) else repr(v)


def _split_of(name):
    m = re.search(r"(train|val|test)", name)
    return m.group(1) if m else None


def _image(raw, ann: Fields):
    iid = ann.ident("image_id")
    if raw["image"] is None:
        raise ann.error("image_id", f"image_id {iid!r} is not in images", "unknown image_id")
    im = raw["image"].moved(ann.where)
    return iid, im, (im.number("width"), im.number("height"))


def _category(raw, ann: Fields) -> tuple[str, str]:
    """(the category's name, its field)."""
    cid = ann.ident("category_id")
    if raw["category"] is None:
        raise ann.error("category_id", f"category_id {cid!r} is not in categories", "unknown category_id")
    cat = raw["category"].moved(ann.where)
    return cat.string("name"), cat.name("name")


def _crowd(ann: Fields) -> bool:
    v = ann.raw("iscrowd", optional=True)
    if v is not None and v not in (0, 1):  # True / False are 1 / 0 too
        raise ann.error("iscrowd", f"expected 0 or 1, got {v!r}", "bad iscrowd")
    return bool(v)


def _xyxy(ann: Fields):
    x, y, w, h = ann.numbers("bbox", 4)
    if w < 0 or h < 0:
        raise ann.error("bbox", f"negative width or height in [x, y, w, h] = {[x, y, w, h]}", "box x2 < x1 or y2 < y1")
    return (x, y, x + w, y + h)


def parse(raw, where, opts) -> Sample:
    if opts.task == "det":
        anns = [Fields(a, where, f"annotations[{k}]") for k, a in raw["anns"]]
        iid, im, size = _image(raw, anns[0])
        name, name_field = _category(raw, anns[0])
        cid = anns[0].ident("category_id")
        anns = [a for a in anns if not _crowd(a)]
        if not anns:
            raise Filtered("crowd region (iscrowd=1)")
        return Sample(
            id=f"coco-{iid}-cat{cid}", image=im.string("file_name"), size=size, expression=name,
            boxes=tuple(_xyxy(a) for a in anns), split=raw["split"], where=where,
            fields={"boxes": [a.name("bbox") for a in anns], "size": f"{im.path}.width, height", "image": im.name("file_name"),
                    "expression": name_field},
        )
    k, a = raw["ann"]
    ann = Fields(a, where)
    iid, im, size = _image(raw, ann)
    name, name_field = _category(raw, ann)
    crowd = _crowd(ann)
    if crowd and opts.task != "res":
        raise Filtered("crowd region (iscrowd=1)")
    seg = ann.raw("segmentation", optional=opts.task not in ("res",))
    polygons = rle = None
    if isinstance(seg, list):
        polygons = seg
    elif isinstance(seg, dict):
        rle = seg
    elif seg is not None:
        raise ann.error("segmentation", f"expected polygons (a list) or RLE (an object), got {json_type(seg)}", "bad segmentation")
    masks = opts.task in ("res", "point")
    return Sample(
        id=f"coco-{iid}-ann{ann.ident('id')}", image=im.string("file_name"), size=size,
        expression=f"group of {name}" if crowd else name, boxes=(_xyxy(ann),),
        polygons=polygons if masks else None, rle=rle if masks else None,
        split=raw["split"], where=where,
        fields={"boxes": "bbox", "size": f"{im.path}.width, height", "image": im.name("file_name"), "expression": name_field},
    )

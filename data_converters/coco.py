"""``coco``: COCO instances JSON (``instances_val2017.json``): boxes, polygons and RLE masks.

Tasks: ``rec`` (box of one instance, asked by its category name), ``det`` (every instance of a category
in an image: one record per image and category), ``res`` (mask of one instance), ``point``, ``reg``.
Crowd regions (``iscrowd=1``) are one box around many objects: they are skipped (counted) for every task
but ``res``, where they become "group of CATEGORY"; ``det`` records leave them out of the answer.
Image sizes come from ``images[].width/height``; image paths are ``file_name`` (relative to --image-root).
The split is guessed from the file name (``instances_val2017.json`` -> "val") unless --split is given.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from .base import ConvertError, Filtered, Sample, check_numbers, get, load_json

TASKS = ("rec", "det", "res", "point", "reg")
FORMATS = "COCO instances JSON (images, annotations with bbox and polygon/RLE segmentation, categories)"


def read(opts):
    path = Path(opts.input)
    data = load_json(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ConvertError(str(path), key, "missing or not a list: not a COCO instances file", f"missing {key}")
    images = {im.get("id"): im for im in data["images"] if isinstance(im, dict)}
    cats = {c.get("id"): c for c in data["categories"] if isinstance(c, dict)}
    split = opts.split or _split_of(path.name)
    anns = [(k, a) for k, a in enumerate(data["annotations"])]
    anns.sort(key=lambda ka: (str(_field(ka[1], "image_id")), _field(ka[1], "id") or 0, ka[0]))  # same-image objects together
    if opts.task == "det":
        groups = defaultdict(list)
        for k, a in anns:
            groups[(_field(a, "image_id"), _field(a, "category_id"))].append(a)
        for (iid, cid), group in groups.items():
            yield f"{path.name}:image {iid} category {cid}", {"anns": group, "image": images.get(iid), "category": cats.get(cid), "image_id": iid, "split": split}
    else:
        for k, a in anns:
            iid = _field(a, "image_id")
            yield f"{path.name}:annotations[{k}] (id {_field(a, 'id')})", {"ann": a, "image": images.get(iid), "category": cats.get(_field(a, "category_id")), "image_id": iid, "split": split}


def _field(obj, key):
    return obj.get(key) if isinstance(obj, dict) else None


def _split_of(name):
    m = re.search(r"(train|val|test)", name)
    return m.group(1) if m else None


def _image(raw, where):
    im = raw["image"]
    if im is None:
        raise ConvertError(where, "image_id", f"image_id {raw['image_id']!r} is not in images", "unknown image_id")
    size = (get(im, "width", where), get(im, "height", where))
    return im, size


def _category(raw, where):
    if raw["category"] is None:
        raise ConvertError(where, "category_id", "category not in categories", "unknown category_id")
    return str(get(raw["category"], "name", where, str))


def _xyxy(ann, where):
    x, y, w, h = check_numbers(get(ann, "bbox", where), 4, where, "bbox")
    if w < 0 or h < 0:
        raise ConvertError(where, "bbox", f"negative width or height in [x, y, w, h] = {[x, y, w, h]}", "box x2 < x1 or y2 < y1")
    return (x, y, x + w, y + h)


def parse(raw, where, opts) -> Sample:
    im, size = _image(raw, where)
    name = _category(raw, where)
    file_name = str(get(im, "file_name", where, str))
    if opts.task == "det":
        anns = [a for a in raw["anns"] if not _field(a, "iscrowd")]
        if not anns:
            raise Filtered("crowd region (iscrowd=1)")
        return Sample(
            id=f"coco-{raw['image_id']}-cat{_field(raw['category'], 'id')}", image=file_name, size=size, expression=name,
            boxes=tuple(_xyxy(a, f"{where} ann {_field(a, 'id')}") for a in anns), split=raw["split"], where=where,
        )
    ann = raw["ann"]
    crowd = bool(ann.get("iscrowd"))
    if crowd and opts.task != "res":
        raise Filtered("crowd region (iscrowd=1)")
    seg = ann.get("segmentation")
    polygons = rle = None
    if isinstance(seg, list):
        polygons = seg
    elif isinstance(seg, dict):
        rle = seg
    elif opts.task in ("res",):
        raise ConvertError(where, "segmentation", "missing", "missing segmentation")
    return Sample(
        id=f"coco-{raw['image_id']}-ann{get(ann, 'id', where)}", image=file_name, size=size,
        expression=f"group of {name}" if crowd else name, boxes=(_xyxy(ann, where),),
        polygons=polygons if opts.task in ("res", "point") else None, rle=rle if opts.task in ("res", "point") else None,
        split=raw["split"], where=where, fields={"boxes": "bbox"},
    )

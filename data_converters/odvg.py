"""``odvg``: GroundingDINO's ODVG JSONL (one image a line).

Detection lines: ``{"filename", "height", "width", "detection": {"instances": [{"bbox": [x1, y1, x2, y2],
"label": int, "category": str}]}}``; task ``det``: one record per image and category (every box of it).
Grounding lines: ``{"filename", "height", "width", "grounding": {"caption", "regions": [{"bbox": box or
[box, ...], "phrase": str}]}}``; tasks ``rec``, ``reg``, ``point``: one record per region (phrase -> boxes).
Boxes are absolute pixels. A line of the other kind than the task needs is one counted skip.
"""
from __future__ import annotations

from collections import OrderedDict

from .base import ConvertError, Filtered, Sample, decode_line, get, json_lines, optional_size

TASKS = ("det", "rec", "reg", "point")
FORMATS = "GroundingDINO ODVG JSONL: filename, height, width, detection.instances[] or grounding.regions[] (bbox px)"


def read(opts):
    for where, line in json_lines(opts.input):
        try:
            rec = decode_line(line, where)
            if not isinstance(rec, dict):
                raise ConvertError(where, "-", "expected a JSON object", "record is not an object")
        except ConvertError as e:
            yield where, e
            continue
        n = where.rsplit(":", 1)[1]
        if opts.task == "det" and "detection" in rec:
            by_cat = OrderedDict()
            for k, inst in enumerate(get(rec["detection"], "instances", where, list)):
                name = inst.get("category") if isinstance(inst, dict) else None
                by_cat.setdefault(name, []).append((k, inst))
            for name, insts in by_cat.items():
                yield f"{where} category {name!r}", {"rec": rec, "line": n, "category": name, "instances": insts}
        elif opts.task != "det" and "grounding" in rec:
            for k, region in enumerate(get(rec["grounding"], "regions", where, list)):
                yield f"{where} regions[{k}]", {"rec": rec, "line": n, "region": region, "k": k}
        else:
            yield where, Filtered(f"odvg {'grounding' if 'grounding' in rec else 'detection'} line, not used by task {opts.task}")


def parse(raw, where, opts) -> Sample:
    if isinstance(raw, (ConvertError, Filtered)):
        raise raw
    rec = raw["rec"]
    image = str(get(rec, "filename", where))
    size = optional_size(rec)
    if "category" in raw:
        if not raw["category"]:
            raise ConvertError(where, "detection.instances[].category", "missing", "missing category")
        boxes = tuple(get(inst, "bbox", f"{where} instances[{k}]") for k, inst in raw["instances"])
        return Sample(id=f"odvg-{raw['line']}-{raw['category']}", image=image, size=size, expression=raw["category"], boxes=boxes, where=where)
    region = raw["region"]
    bbox = get(region, "bbox", where, list)
    boxes = tuple(bbox) if bbox and isinstance(bbox[0], list) else (bbox,)
    return Sample(
        id=f"odvg-{raw['line']}-r{raw['k']}", image=image, size=size, expression=get(region, "phrase", where, str),
        boxes=boxes, where=where, fields={"boxes": "regions[].bbox"},
    )

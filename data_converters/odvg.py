"""``odvg``: GroundingDINO's ODVG JSONL (one image a line).

Detection lines: ``{"filename", "height", "width", "detection": {"instances": [{"bbox": [x1, y1, x2, y2],
"label": int, "category": str}]}}``; task ``det``: one record per image and category (every box of it).
Grounding lines: ``{"filename", "height", "width", "grounding": {"caption", "regions": [{"bbox": box or
[box, ...], "phrase": str}]}}``; tasks ``rec``, ``reg``, ``point``: one record per region (phrase -> boxes).
Boxes are absolute pixels. A line of the other kind than the task needs is one counted skip; a line whose
structure cannot be split into records (``regions`` not a list, ``grounding`` not an object) is one counted error.
"""
from __future__ import annotations

from collections import OrderedDict

from .base import Sample
from .inputs import ConvertError, Fields, Filtered, json_lines, record

TASKS = ("det", "rec", "reg", "point")
FORMATS = "GroundingDINO ODVG JSONL: filename, height, width, detection.instances[] or grounding.regions[] (bbox px)"


def read(opts):
    for where, line in json_lines(opts.input):
        try:
            yield from _split(record(line, where), where, opts)
        except (ConvertError, Filtered) as e:  # this line only: counted like any bad record
            yield where, e


def _split(rec, where, opts):
    """One decoded line -> its records (read() runs this in the main process, so it checks the structure it
    walks: a bad line raises before it yields anything)."""
    n = where.rsplit(":", 1)[1]
    if opts.task == "det" and rec.has("detection"):
        by_cat = OrderedDict()
        for inst in rec.object("detection").objects("instances"):
            by_cat.setdefault(inst.string("category"), []).append(inst)
        return [(f"{where} category {name!r}", {"rec": rec.obj, "line": n, "category": name,
                                                "instances": [(i.path, i.obj) for i in insts]})
                for name, insts in by_cat.items()]
    if opts.task != "det" and rec.has("grounding"):
        return [(f"{where} regions[{k}]", {"rec": rec.obj, "line": n, "region": (r.path, r.obj), "k": k})
                for k, r in enumerate(rec.object("grounding").objects("regions"))]
    if not (rec.has("detection") or rec.has("grounding")):
        raise rec.error(None, "neither 'detection' nor 'grounding': not an ODVG line", "not an ODVG line")
    raise Filtered(f"odvg {'grounding' if rec.has('grounding') else 'detection'} line, not used by task {opts.task}")


def parse(raw, where, opts) -> Sample:
    rec = Fields(raw["rec"], where)
    image = rec.string("filename")
    size = rec.optional_size()
    if "category" in raw:
        insts = [(path, Fields(obj, where, path)) for path, obj in raw["instances"]]
        return Sample(id=f"odvg-{raw['line']}-{raw['category']}", image=image, size=size, expression=raw["category"],
                      boxes=tuple(i.raw("bbox") for _, i in insts), where=where,
                      fields={"boxes": [i.name("bbox") for _, i in insts], "image": "filename", "expression": insts[0][1].name("category")})
    path, obj = raw["region"]
    region = Fields(obj, where, path)
    bbox = region.raw("bbox")
    several = isinstance(bbox, list) and bool(bbox) and isinstance(bbox[0], list)
    boxes = tuple(bbox) if several else (bbox,)
    return Sample(
        id=f"odvg-{raw['line']}-r{raw['k']}", image=image, size=size, expression=region.string("phrase"),
        boxes=boxes, where=where,
        fields={"boxes": [f"{region.name('bbox')}[{j}]" for j in range(len(boxes))] if several else [region.name("bbox")],
                "image": "filename", "expression": region.name("phrase")},
    )

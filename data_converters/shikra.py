"""``shikra``: Shikra's REC JSONL (``REC_ref3_train.jsonl`` style).

One line per expression: ``img_path`` (relative to --image-root), ``expression``, ``bbox`` (absolute
[x1, y1, x2, y2] in pixels), ``height``, ``width`` (optional: else the image header). Tasks: rec, reg, point.
"""
from __future__ import annotations

from .base import Sample
from .inputs import numbered_records, record

TASKS = ("rec", "reg", "point")
FORMATS = "Shikra REC JSONL: img_path, expression, bbox [x1,y1,x2,y2] px, height, width"


read = numbered_records


def parse(raw, where, opts) -> Sample:
    n, rec = raw[0], record(raw[1], where)
    rid = rec.ident("id", optional=True)
    return Sample(
        id=f"shikra-{n if rid is None else rid}", image=rec.string("img_path"), size=rec.optional_size(),
        expression=rec.string("expression"), boxes=(rec.raw("bbox"),), where=where,
        split=rec.string("split", optional=True), fields={"boxes": "bbox", "image": "img_path"},
    )

"""``shikra``: Shikra's REC JSONL (``REC_ref3_train.jsonl`` style).

One line per expression: ``img_path`` (relative to --image-root), ``expression``, ``bbox`` (absolute
[x1, y1, x2, y2] in pixels), ``height``, ``width`` (optional: else the image header). Tasks: rec, reg, point.
"""
from __future__ import annotations

from .base import Sample, decode_line, get, optional_size, read_numbered_records

TASKS = ("rec", "reg", "point")
FORMATS = "Shikra REC JSONL: img_path, expression, bbox [x1,y1,x2,y2] px, height, width"


read = read_numbered_records


def parse(raw, where, opts) -> Sample:
    n, rec = raw[0], decode_line(raw[1], where)
    size = optional_size(rec)
    return Sample(
        id=f"shikra-{rec.get('id', n)}", image=str(get(rec, "img_path", where)), size=size,
        expression=get(rec, "expression", where, str), boxes=(get(rec, "bbox", where),), where=where,
        split=rec.get("split"), fields={"boxes": "bbox"},
    )

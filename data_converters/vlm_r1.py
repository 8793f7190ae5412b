"""``vlm-r1``: REC JSON as used by VLM-R1 and the RL grounding projects.

Records (a JSON list or JSONL): ``image``, ``problem`` (the expression), ``solution`` (absolute
[x1, y1, x2, y2] in pixels, or null when nothing matches), ``normalized_solution`` ([0, 1000] of the
original image, used when ``solution`` is absent), ``width``, ``height``. A null solution becomes an
answer that says there is no such object. Tasks: rec, reg, point.
"""
from __future__ import annotations

from .base import ConvertError, Sample, decode_line, get, optional_size, read_numbered_records

TASKS = ("rec", "reg", "point")
FORMATS = "VLM-R1 REC JSON/JSONL: image, problem, solution [x1,y1,x2,y2] px or null, normalized_solution 0-1000, width, height"


read = read_numbered_records


def parse(raw, where, opts) -> Sample:
    n, rec = raw[0], decode_line(raw[1], where)
    image = str(get(rec, "image", where))
    expression = get(rec, "problem", where, str)
    size = optional_size(rec)
    units, fields = "px", {"boxes": "solution"}
    if "solution" in rec:
        box = rec["solution"]
    elif "normalized_solution" in rec:
        box = rec["normalized_solution"]
        if box is not None:
            if not isinstance(box, list) or len(box) != 4:
                raise ConvertError(where, "normalized_solution", f"expected [x1, y1, x2, y2], got {box!r}", "bad normalized_solution")
            box = [float(v) / 1000 if isinstance(v, (int, float)) else v for v in box]
        units, fields = "orig", {"boxes": "normalized_solution"}
    else:
        raise ConvertError(where, "solution", "missing (and no normalized_solution)", "missing solution")
    return Sample(
        id=f"vlm-r1-{rec.get('id', n)}", image=image, size=size, expression=expression,
        boxes=() if box is None else (box,), units=units, where=where, fields=fields,
    )

"""``vlm-r1``: REC JSON as used by VLM-R1 and the RL grounding projects.

Records (a JSON list or JSONL): ``image``, ``problem`` (the expression), ``solution`` (absolute
[x1, y1, x2, y2] in pixels, or null when nothing matches), ``normalized_solution`` ([0, 1000] of the
original image, used when ``solution`` is absent), ``width``, ``height``. A null solution becomes an
answer that says there is no such object. Tasks: rec, reg, point.
"""
from __future__ import annotations

from .base import Sample
from .inputs import check_numbers, numbered_records, record

TASKS = ("rec", "reg", "point")
FORMATS = "VLM-R1 REC JSON/JSONL: image, problem, solution [x1,y1,x2,y2] px or null, normalized_solution 0-1000, width, height"


read = numbered_records


def parse(raw, where, opts) -> Sample:
    n, rec = raw[0], record(raw[1], where)
    image = rec.string("image")
    expression = rec.string("problem")
    size = rec.optional_size()
    units, fields = "px", {"boxes": "solution", "expression": "problem"}
    if "solution" in rec.obj:
        box = rec.raw("solution", optional=True)
    elif "normalized_solution" in rec.obj:
        box = rec.raw("normalized_solution", optional=True)
        if box is not None:
            box = [v / 1000 for v in check_numbers(box, 4, where, "normalized_solution")]
        units, fields = "orig", {"boxes": "normalized_solution", "expression": "problem"}
    else:
        raise rec.error("solution", "missing (and no normalized_solution)", "missing solution")
    rid = rec.ident("id", optional=True)
    return Sample(
        id=f"vlm-r1-{n if rid is None else rid}", image=image, size=size, expression=expression,
        boxes=() if box is None else (box,), units=units, where=where, fields=fields,
    )

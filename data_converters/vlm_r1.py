"""``vlm-r1``: REC JSON as used by VLM-R1 and the RL grounding projects, read as VLM-R1 writes it.

Records (a JSON list or JSONL): ``image``, ``normal_caption`` (the expression), ``problem`` (the whole question:
the expression inside LLaVA-1.5's REC instruction, "Please provide the bounding box coordinate of the region this
sentence describes: {expression}."), ``solution`` (absolute [x1, y1, x2, y2] in pixels, or null when nothing
matches), ``normalized_solution`` ([0, 1000] of the original image, used when ``solution`` is absent), ``width``,
``height``; VLM-R1's other keys (``dataset_name``, ``bbox_list``, ``text_type``, ...) are not read. The expression is
``normal_caption``; a record without it gives ``problem`` less that instruction (a ``problem`` without the
instruction is the expression as it is). The converter writes its own prompt around the expression, so the
instruction is said once. A null solution becomes an answer that says there is no such object. Tasks: rec, reg, point.
"""
from __future__ import annotations

from llava_getok.records import PROMPTS

from .base import Sample
from .inputs import check_numbers, numbered_records, record

TASKS = ("rec", "reg", "point")
FORMATS = ("VLM-R1 REC JSON/JSONL: image, normal_caption (or problem), solution [x1,y1,x2,y2] px or null, "
           "normalized_solution 0-1000, width, height")
# VLM-R1's problem: LLaVA-1.5's REC instruction around the expression (the wording of our own rec prompt)
INSTRUCTION_BEFORE, INSTRUCTION_AFTER = PROMPTS["rec"].split("{expression}")


read = numbered_records


def expression(rec) -> tuple[str, str]:
    """(the expression, the field it came from): ``normal_caption``, else ``problem`` less the REC instruction."""
    if rec.has("normal_caption"):
        return rec.string("normal_caption"), "normal_caption"
    if not rec.has("problem"):
        raise rec.error("normal_caption", "missing (and no problem)", "missing expression")
    problem = rec.string("problem")
    if problem.startswith(INSTRUCTION_BEFORE):
        problem = problem[len(INSTRUCTION_BEFORE):]
        if problem.endswith(INSTRUCTION_AFTER):
            problem = problem[: len(problem) - len(INSTRUCTION_AFTER)]
    return problem, "problem"


def parse(raw, where, opts) -> Sample:
    n, rec = raw[0], record(raw[1], where)
    image = rec.string("image")
    text, field = expression(rec)
    size = rec.optional_size()
    units, fields = "px", {"boxes": "solution", "expression": field}
    if "solution" in rec.obj:
        box = rec.raw("solution", optional=True)
    elif "normalized_solution" in rec.obj:
        box = rec.raw("normalized_solution", optional=True)
        if box is not None:
            box = [v / 1000 for v in check_numbers(box, 4, where, "normalized_solution")]
        units, fields = "orig", {"boxes": "normalized_solution", "expression": field}
    else:
        raise rec.error("solution", "missing (and no normalized_solution)", "missing solution")
    rid = rec.ident("id", optional=True)
    return Sample(
        id=f"vlm-r1-{n if rid is None else rid}", image=image, size=size, expression=text,
        boxes=() if box is None else (box,), units=units, where=where, fields=fields,
    )

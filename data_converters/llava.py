"""``llava``: LLaVA-1.5 instruction data (``llava_v1_5_mix665k.json`` style) with boxes written as text.

What is a box follows LLaVA's own writing of boxes: four numbers in brackets written as decimals
(``[0.12, 0.34, 0.56, 0.78]``, Python floats rounded to two places), in a record that has an image. Each is
rewritten in place as GETok tokens in any turn (human turns: region inputs; gpt turns: answers); all other
text, turns and keys stay as they were. Four integers (``[0, 0, 0, 1]``, ``[1, 2, 3, 4]``) are never a box, and
records without an image (mix665k's ~40k text-only ShareGPT conversations) pass through untouched whatever
their text holds.

A bracketed quadruple with a decimal in an image record that is not a valid box (a number outside [0, 1], NaN,
x2 < x1 or y2 < y1, zero width or height) makes the record bad input: it is rejected as a whole, named by its
turn (``--on-error fail``) or counted (``skip``), never half-rewritten.

The input's boxes are normalised in ``--input-frame`` (LLaVA-1.5's data: the padded square, ``pad``); the
output's in ``--frame``. Records without a box pass through unchanged, without a ``getok`` field (a JSONL line
byte for byte).
"""
from __future__ import annotations

import re

from .base import Sample
from .conversations import BOX_SLOT
from .inputs import Fields, json_records, record

TASKS = ("rewrite",)
PASS_THROUGH_RAW = True  # a JSONL line without boxes is written back byte for byte
UNIQUE_IDS = False  # LLaVA's own ids repeat (mix665k: one id per image, ~250k repeats): counted, not refused
FORMATS = "LLaVA conversations (.json list or .jsonl) with text boxes [x1, y1, x2, y2] in 0-1 (--input-frame)"

# A number as a list in text may hold one: ASCII digits (\d would take fullwidth ones), decimals, exponents,
# and the NaN / infinity a buggy writer may print; which of them make a box is decided in _rewrite_turn().
_NUM = r"\s*([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?(?:[nN][aA][nN]|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?))\s*"
QUAD_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_NOT_INTEGER = re.compile(r"[.eEnNiI]")  # in a QUAD_RE match: a decimal point, an exponent, NaN or infinity


def read(opts):
    yield from json_records(opts.input)


def _rewrite_turn(value: str, turn: Fields) -> tuple[list[tuple], str]:
    """(the boxes written in one turn's text, in order; the text with a BOX_SLOT in place of each). A box is a
    bracketed quadruple with a decimal; four integers are text. One that is not a box in [0, 1] is a
    ConvertError naming the turn's value. One pass over the text: this runs on a million records."""
    boxes, parts, end = [], [], 0
    for m in QUAD_RE.finditer(value):
        if not _NOT_INTEGER.search(m.group(0)):
            continue  # [0, 0, 0, 1]: LLaVA writes its boxes as floats, so four integers are never one
        b = tuple(map(float, m.groups()))
        if not (0.0 <= b[0] <= 1.0 and 0.0 <= b[1] <= 1.0 and 0.0 <= b[2] <= 1.0 and 0.0 <= b[3] <= 1.0):  # NaN fails too
            raise turn.error("value", f"box {m.group(0)} has a number outside [0, 1] (LLaVA's boxes are normalised)", "box outside [0, 1]")
        if b[2] < b[0] or b[3] < b[1]:
            raise turn.error("value", f"box {list(b)} has x2 < x1 or y2 < y1", "box x2 < x1 or y2 < y1")
        boxes.append(b)
        parts += [value[end:m.start()], BOX_SLOT]
        end = m.end()
    return boxes, "".join(parts) + value[end:] if boxes else value


def parse(raw, where, opts) -> Sample:
    rec = record(raw, where)
    has_image = bool(rec.string("image", optional=True))
    turns, boxes, fields = [], [], []
    for k, turn, value in rec.texts("conversations", "value"):
        found = ()
        if has_image and "[" in value:  # cheap test first: most turns hold no box
            found, value = _rewrite_turn(value, Fields(turn, where, f"conversations[{k}]"))
        if found:
            boxes += found
            fields += [f"conversations[{k}].value"] * len(found)
            turns.append({**turn, "value": value})
        else:
            turns.append(turn)
    return Sample(
        id=str(rec.ident("id")), image=rec.obj.get("image"), boxes=tuple(boxes), turns=turns,
        source_fields=rec.obj, units=opts.input_frame, where=where, fields={"boxes": fields},
    )

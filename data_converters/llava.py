"""``llava``: LLaVA-1.5 instruction data (``llava_v1_5_mix665k.json`` style) with boxes written as text.

Every ``[x1, y1, x2, y2]`` of four numbers in [0, 1] in any turn (human turns: region inputs; gpt turns:
answers) is rewritten in place as GETok tokens; all other text, turns and keys stay as they were.
The input's boxes are normalised in ``--input-frame`` (LLaVA-1.5's data: the padded square, ``pad``); the
output's in ``--frame``. Records without such a box pass through unchanged, without a ``getok`` field.
A quadruple with x2 < x1 or y2 < y1 is bad input (the record is rejected, not half-rewritten).
"""
from __future__ import annotations

import re

from .base import ConvertError, Sample, decode_line, get, json_records
from .conversations import BOX_SLOT

TASKS = ("rewrite",)
PASS_THROUGH_RAW = True  # a JSONL line without boxes is written back byte for byte
FORMATS = "LLaVA conversations (.json list or .jsonl) with text boxes [x1, y1, x2, y2] in 0-1 (--input-frame)"

_NUM = r"\s*(0(?:\.\d+)?|1(?:\.0+)?|\.\d+)\s*"
BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def read(opts):
    yield from json_records(opts.input)


def parse(raw, where, opts) -> Sample:
    rec = decode_line(raw, where)
    conv = get(rec, "conversations", where, list)
    turns, boxes = [], []
    for k, turn in enumerate(conv):
        value = get(turn, "value", f"{where} conversations[{k}]", str)
        if "[" in value:  # cheap test first: most turns hold no box
            found = [tuple(float(v) for v in m.groups()) for m in BOX_RE.finditer(value)]
            for b in found:
                if b[2] < b[0] or b[3] < b[1]:
                    raise ConvertError(where, f"conversations[{k}].value", f"box {list(b)} has x2 < x1 or y2 < y1", "box x2 < x1 or y2 < y1")
            if found:
                boxes += found
                turn = {**turn, "value": BOX_RE.sub(BOX_SLOT, value)}
        turns.append(turn)
    if boxes and not rec.get("image"):
        raise ConvertError(where, "image", "the conversation holds boxes but the record has no image", "boxes without image")
    return Sample(
        id=str(get(rec, "id", where)), image=rec.get("image"), boxes=tuple(boxes), turns=turns,
        source_fields=rec, units=opts.input_frame, where=where,
    )

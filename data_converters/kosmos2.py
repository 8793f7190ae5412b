"""``kosmos2``: Kosmos-2 / GRIT grounding markup, ``<phrase>X</phrase><object><patch_index_0044>
<patch_index_0863></object>``; several boxes of one phrase are joined by ``</delimiter_of_multi_objects/>``.

Records (JSON list or JSONL) with ``image`` and either ``text`` (a grounded caption: it becomes the
answer to a "describe and locate" question) or ``conversations`` (LLaVA turns holding the markup).
Patch indices address a 32 x 32 grid over the original image; boxes are recovered as transformers'
``Kosmos2Processor`` does (``patch_index_to_coordinate``). ``X <box>GETok</box>`` replaces each phrase and
object; ``<grounding>`` is dropped. Task: rewrite.
"""
from __future__ import annotations

import re

from .base import ConvertError, Sample, decode_line, get, read_numbered_records
from .conversations import BOX_SLOT

TASKS = ("rewrite",)
FORMATS = "Kosmos-2/GRIT markup (JSON/JSONL: image + text or conversations): <phrase>..</phrase><object><patch_index_XXXX>x2</object>"
PATCHES = 32
OBJECT_RE = re.compile(r"<object>((?:<patch_index_\d{4}><patch_index_\d{4}>(?:</delimiter_of_multi_objects/>)?)+)</object>")
PAIR_RE = re.compile(r"<patch_index_(\d{4})><patch_index_(\d{4})>")
CAPTION_PROMPT = "<image>\nDescribe this image, and give the location of every object you mention."


def patch_index_to_coordinate(ul_idx: int, lr_idx: int, n: int = PATCHES):
    """Kosmos-2's inverse of its box quantisation: corner patches -> normalised (x1, y1, x2, y2).

    >>> patch_index_to_coordinate(44, 863)
    (0.390625, 0.046875, 0.984375, 0.828125)
    """
    cell = 1.0 / n
    ux, uy, lx, ly = ul_idx % n, ul_idx // n, lr_idx % n, lr_idx // n
    if ul_idx == lr_idx or ux == lx or uy == ly:
        return ux * cell, uy * cell, lx * cell + cell, ly * cell + cell
    return ux * cell + cell / 2, uy * cell + cell / 2, lx * cell + cell / 2, ly * cell + cell / 2


read = read_numbered_records


def _rewrite(value, boxes, where, field):
    def one(m):
        found = []
        for a, b in PAIR_RE.findall(m.group(1)):
            a, b = int(a), int(b)
            if a >= PATCHES**2 or b >= PATCHES**2:
                raise ConvertError(where, field, f"patch index {max(a, b)} outside the {PATCHES}x{PATCHES} grid", "bad patch index")
            box = patch_index_to_coordinate(a, b)
            if box[2] < box[0] or box[3] < box[1]:
                raise ConvertError(where, field, f"patches {a}, {b}: lower-right before upper-left", "box x2 < x1 or y2 < y1")
            found.append(box)
        boxes.extend(found)
        return " ".join([BOX_SLOT] * len(found))

    value = value.replace("<grounding>", "")
    value = re.sub(r"</phrase>\s*(?=<object>)", " ", value).replace("<phrase>", "").replace("</phrase>", "")
    value = OBJECT_RE.sub(one, value)
    if "<patch_index_" in value or "<object>" in value:
        raise ConvertError(where, field, "unbalanced <object> / patch index markup", "bad markup")
    return value


def parse(raw, where, opts) -> Sample:
    n, rec = raw[0], decode_line(raw[1], where)
    image = str(get(rec, "image", where))
    boxes = []
    if "conversations" in rec:
        turns = [{**t, "value": _rewrite(get(t, "value", where, str), boxes, where, f"conversations[{k}].value")}
                 for k, t in enumerate(get(rec, "conversations", where, list))]
    else:
        turns = [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": _rewrite(get(rec, "text", where, str), boxes, where, "text").strip()}]
    record = {"id": str(rec.get("id", f"kosmos2-{n}")), "image": image, "conversations": turns}
    return Sample(id=record["id"], image=image, boxes=tuple(boxes), turns=turns, source_fields=record, units="orig", where=where)

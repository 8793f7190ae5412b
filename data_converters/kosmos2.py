"""``kosmos2``: Kosmos-2 / GRIT grounding markup, ``<phrase>X</phrase><object><patch_index_0044>
<patch_index_0863></object>``; several boxes of one phrase are joined by ``</delimiter_of_multi_objects/>``.

Both ways the markup is written are read: compact, as the model generates it and transformers'
``extract_entities_with_patch_indices`` expects it, and spaced, as transformers' own ``Kosmos2Processor``
writes annotations (``<object> <patch_index_0044> <patch_index_0863> </object>``, boxes joined by
`` </delimiter_of_multi_objects/> ``).

Records (JSON list or JSONL) with ``image`` and either ``text`` (a grounded caption: it becomes the
answer to a "describe and locate" question) or ``conversations`` (LLaVA turns holding the markup).
Patch indices address a 32 x 32 grid over the original image; boxes are recovered as transformers'
``Kosmos2Processor`` does (``patch_index_to_coordinate``). ``X <box>GETok</box>`` replaces each phrase and
object; ``<grounding>`` is dropped. Task: rewrite.
"""
from __future__ import annotations

import re

from .base import Sample
from .conversations import BOX_SLOT
from .inputs import numbered_records, record

TASKS = ("rewrite",)
FORMATS = "Kosmos-2/GRIT markup (JSON/JSONL: image + text or conversations): <phrase>..</phrase><object><patch_index_XXXX>x2</object>"
UNIQUE_IDS = False  # the source's own ids are kept; LLaVA's format lets them repeat (counted in the summary)
PATCHES = 32
_PAIR = r"<patch_index_([0-9]{4})>\s*<patch_index_([0-9]{4})>"  # ASCII digits, zero-filled to 4 as transformers writes
OBJECT_RE = re.compile(r"<object>\s*((?:" + _PAIR.replace("(", "(?:") + r"\s*(?:</delimiter_of_multi_objects/>\s*)?)+)</object>")
PAIR_RE = re.compile(_PAIR)
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


read = numbered_records


def _rewrite(value, boxes, fields, rec, field):
    def one(m):
        found = []
        for a, b in PAIR_RE.findall(m.group(1)):
            a, b = int(a), int(b)
            if a >= PATCHES**2 or b >= PATCHES**2:
                raise rec.error(field, f"patch index {max(a, b)} outside the {PATCHES}x{PATCHES} grid", "bad patch index")
            box = patch_index_to_coordinate(a, b)
            if box[2] < box[0] or box[3] < box[1]:
                raise rec.error(field, f"patches {a}, {b}: lower-right before upper-left", "box x2 < x1 or y2 < y1")
            found.append(box)
        boxes.extend(found)
        fields.extend([field] * len(found))
        return " ".join([BOX_SLOT] * len(found))

    value = value.replace("<grounding>", "")
    value = re.sub(r"</phrase>\s*(?=<object>)", " ", value).replace("<phrase>", "").replace("</phrase>", "")
    value = OBJECT_RE.sub(one, value)
    if "<patch_index_" in value or "<object>" in value or "</object>" in value:
        raise rec.error(field, "unbalanced <object> / patch index markup", "bad markup")
    return value


def parse(raw, where, opts) -> Sample:
    n, rec = raw[0], record(raw[1], where)
    image = rec.string("image")
    boxes, fields = [], []
    if rec.has("conversations"):
        turns = [{**t.obj, "value": _rewrite(t.string("value"), boxes, fields, rec, t.name("value"))}
                 for t in rec.objects("conversations")]
    else:
        turns = [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": _rewrite(rec.string("text"), boxes, fields, rec, "text").strip()}]
    rid = rec.ident("id", optional=True)
    out = {"id": f"kosmos2-{n}" if rid is None else str(rid), "image": image, "conversations": turns}
    return Sample(id=out["id"], image=image, boxes=tuple(boxes), turns=turns, source_fields=out, units="orig", where=where,
                  fields={"boxes": fields})

"""``qwen``: Qwen-VL fine-tuning conversations with ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>`` grounding.

Records (JSON list or JSONL): ``{"id", "conversations": [{"from": "user"|"assistant", "value"}]}`` with
the image as ``Picture 1: <img>PATH</img>`` in a user turn. Boxes are integers in [0, 1000) of the
original image (Qwen-VL's normalisation). Output: a LLaVA record (human/gpt, ``<image>\\n`` first, PATH as
``image``) where ``<ref>X</ref><box>..</box>`` becomes ``X <box>GETok</box>`` and every other text stays.
Task: rewrite.
"""
from __future__ import annotations

import re

from .base import Sample
from .conversations import BOX_SLOT
from .inputs import numbered_records, record

TASKS = ("rewrite",)
FORMATS = "Qwen-VL conversations (JSON/JSONL): <img>path</img>, <ref>phrase</ref><box>(x1,y1),(x2,y2)</box> in 0-999"
IMG_RE = re.compile(r"(?:Picture \d+:\s*)?<img>(.*?)</img>\s*")
_NUM = r"\s*(-?[0-9]+(?:\.[0-9]+)?)\s*"  # ASCII digits: \d would take fullwidth ones too
BOX_RE = re.compile(r"<box>\s*\(" + _NUM + "," + _NUM + r"\)\s*,\s*\(" + _NUM + "," + _NUM + r"\)\s*</box>")
ROLES = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}


UNIQUE_IDS = False  # the source's own ids are kept; LLaVA's format lets them repeat (counted in the summary)


read = numbered_records


def parse(raw, where, opts) -> Sample:
    n, rec = raw[0], record(raw[1], where)
    images, turns, boxes, box_fields = [], [], [], []
    for k, turn in enumerate(rec.objects("conversations")):
        field = turn.path
        role = ROLES.get(turn.string("from"))
        if role is None:
            raise turn.error("from", f"unknown role {turn.obj['from']!r} (expected user or assistant)", "unknown role")
        value = turn.string("value")
        images += IMG_RE.findall(value)
        value = IMG_RE.sub("", value)
        for m in BOX_RE.finditer(value):
            b = [float(v) / 1000 for v in m.groups()]
            if b[2] < b[0] or b[3] < b[1]:
                raise turn.error("value", f"box {m.group(0)} has x2 < x1 or y2 < y1", "box x2 < x1 or y2 < y1")
            boxes.append(tuple(b))
            box_fields.append(f"{field}.value")
        value = re.sub(r"</ref>\s*(?=<box>)", " ", value).replace("<ref>", "").replace("</ref>", "")
        turns.append({"from": role, "value": BOX_RE.sub(BOX_SLOT, value)})
    if len(set(images)) > 1:
        raise rec.error("conversations", f"{len(set(images))} images; LLaVA-1.5 takes one", "several images")
    rid = rec.ident("id", optional=True)
    out = {"id": f"qwen-{n}" if rid is None else str(rid)}
    if images:
        out["image"] = images[0]
        turns[0] = {**turns[0], "value": "<image>\n" + turns[0]["value"]}
    for k, t in enumerate(turns):
        if "<box>" in t["value"]:
            raise rec.error(f"conversations[{k}].value", "a <box> that is not (x1,y1),(x2,y2)", "bad box")
    out["conversations"] = turns
    return Sample(id=out["id"], image=out.get("image"), boxes=tuple(boxes), turns=turns, source_fields=out,
                  units="orig", where=where, fields={"boxes": box_fields})

"""``qwen``: Qwen-VL fine-tuning conversations with ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>`` grounding.

Records (JSON list or JSONL): ``{"id", "conversations": [{"from": "user"|"assistant", "value"}]}`` with
the image as ``Picture 1: <img>PATH</img>`` in a user turn. Boxes are integers in [0, 1000) of the
original image (Qwen-VL's normalisation). Output: a LLaVA record (human/gpt, ``<image>\\n`` first, PATH as
``image``) where ``<ref>X</ref><box>..</box>`` becomes ``X <box>GETok</box>`` and every other text stays.
Task: rewrite.
"""
from __future__ import annotations

import re

from .base import ConvertError, Sample, decode_line, get, read_numbered_records
from .conversations import BOX_SLOT

TASKS = ("rewrite",)
FORMATS = "Qwen-VL conversations (JSON/JSONL): <img>path</img>, <ref>phrase</ref><box>(x1,y1),(x2,y2)</box> in 0-999"
IMG_RE = re.compile(r"(?:Picture \d+:\s*)?<img>(.*?)</img>\s*")
BOX_RE = re.compile(r"<box>\s*\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)\s*,\s*\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)\s*</box>")
ROLES = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}


read = read_numbered_records


def parse(raw, where, opts) -> Sample:
    n, rec = raw[0], decode_line(raw[1], where)
    images, turns, boxes = [], [], []
    for k, turn in enumerate(get(rec, "conversations", where, list)):
        field = f"conversations[{k}]"
        role = ROLES.get(get(turn, "from", f"{where} {field}"))
        if role is None:
            raise ConvertError(where, f"{field}.from", f"unknown role {turn['from']!r} (expected user or assistant)", "unknown role")
        value = get(turn, "value", f"{where} {field}", str)
        images += IMG_RE.findall(value)
        value = IMG_RE.sub("", value)
        for m in BOX_RE.finditer(value):
            b = [float(v) / 1000 for v in m.groups()]
            if b[2] < b[0] or b[3] < b[1]:
                raise ConvertError(where, f"{field}.value", f"box {m.group(0)} has x2 < x1 or y2 < y1", "box x2 < x1 or y2 < y1")
            boxes.append(tuple(b))
        value = re.sub(r"</ref>\s*(?=<box>)", " ", value).replace("<ref>", "").replace("</ref>", "")
        turns.append({"from": role, "value": BOX_RE.sub(BOX_SLOT, value)})
    if len(set(images)) > 1:
        raise ConvertError(where, "conversations", f"{len(set(images))} images; LLaVA-1.5 takes one", "several images")
    record = {"id": str(rec.get("id", f"qwen-{n}"))}
    if images:
        record["image"] = images[0]
        turns[0] = {**turns[0], "value": "<image>\n" + turns[0]["value"]}
    if any(BOX_RE.search(t["value"]) for t in turns) or "<box>" in "".join(t["value"] for t in turns):
        raise ConvertError(where, "conversations", "a <box> that is not (x1,y1),(x2,y2)", "bad box")
    record["conversations"] = turns
    return Sample(id=record["id"], image=record.get("image"), boxes=tuple(boxes), turns=turns, source_fields=record,
                  units="orig", where=where)

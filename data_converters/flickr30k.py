"""``flickr30k``: Flickr30k Entities (github.com/BryanPlummer/flickr30k_entities).

Input: the folder holding ``Sentences/ID.txt`` (five sentences with ``[/EN#18/people A child]`` phrases)
and ``Annotations/ID.xml`` (Pascal VOC style: size, objects whose ``name`` is an entity id, ``bndbox``
in pixels, ``nobndbox`` for scene/non-visual entities). --split keeps the ids listed in SPLIT.txt of
the folder. One record per phrase with boxes (all boxes of its entity); phrases of boxless entities are
counted skips. Images: ``ID.jpg``. Tasks: rec, reg (phrases with exactly one box), point.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .base import ConvertError, Filtered, Sample

TASKS = ("rec", "reg", "point")
FORMATS = "Flickr30k Entities folder: Sentences/*.txt + Annotations/*.xml (+ train/val/test.txt)"
PHRASE_RE = re.compile(r"\[/EN#(\d+)/([\w/]+) ([^\]]*)\]")


def read(opts):
    root = Path(opts.input)
    sentences = root / "Sentences"
    if not sentences.is_dir():
        raise ConvertError(str(sentences), "-", "folder not found (expected Sentences/ and Annotations/)", "missing file")
    ids = sorted(p.stem for p in sentences.glob("*.txt"))
    if opts.split:
        listed = root / f"{opts.split}.txt"
        if not listed.is_file():
            raise ConvertError(str(listed), "-", f"split file for --split {opts.split} not found", "missing file")
        keep = set(listed.read_text().split())
        ids = [i for i in ids if i in keep]
    for image_id in ids:
        text = (sentences / f"{image_id}.txt").read_text(encoding="utf-8").splitlines()
        xml_path = root / "Annotations" / f"{image_id}.xml"
        for s, sentence in enumerate(text):
            for p, m in enumerate(PHRASE_RE.finditer(sentence)):
                where = f"Sentences/{image_id}.txt:{s + 1} phrase {p}"
                yield where, {"image_id": image_id, "xml": str(xml_path), "entity": m.group(1), "type": m.group(2),
                              "phrase": m.group(3), "s": s, "p": p, "split": opts.split}


def _annotation(path, where):
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise ConvertError(path, "-", "annotation file not found", "missing file") from None
    except ET.ParseError as e:
        raise ConvertError(path, "-", f"malformed XML: {e}", "malformed XML") from None
    size = root.find("size")
    if size is None:
        raise ConvertError(path, "size", "missing", "missing size")
    wh = (size.findtext("width"), size.findtext("height"))
    boxes = {}
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise ConvertError(path, "bndbox", f"expected numbers xmin, ymin, xmax, ymax in object {obj.findtext('name')}", "bad bndbox") from None
        for name in obj.iter("name"):
            boxes.setdefault(name.text, []).append(box)
    try:
        return (float(wh[0]), float(wh[1])), boxes
    except (TypeError, ValueError):
        raise ConvertError(path, "size", f"width/height must be numbers, got {wh}", "bad image size") from None


def parse(raw, where, opts) -> Sample:
    size, boxes = _annotation(raw["xml"], where)
    entity_boxes = boxes.get(raw["entity"], [])
    if not entity_boxes:
        raise Filtered(f"phrase without a box ({raw['type']})")
    return Sample(
        id=f"flickr30k-{raw['image_id']}-s{raw['s']}-p{raw['p']}", image=f"{raw['image_id']}.jpg", size=size,
        expression=raw["phrase"], boxes=tuple(entity_boxes), split=raw["split"], where=where, fields={"boxes": "bndbox"},
    )

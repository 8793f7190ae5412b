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

from .base import Sample
from .inputs import ConvertError, Filtered, read_bytes, read_text

TASKS = ("rec", "reg", "point")
FORMATS = "Flickr30k Entities folder: Sentences/*.txt + Annotations/*.xml (+ train/val/test.txt)"
PHRASE_RE = re.compile(r"\[/EN#([0-9]+)/([\w/]+) ([^\]]*)\]")
NUMBER_RE = re.compile(r"\s*-?[0-9]+(?:\.[0-9]+)?\s*")  # what VOC XML writes; float() would also take "nan", "1_0"


def read(opts):
    root = Path(opts.input)
    sentences = root / "Sentences"
    if not sentences.is_dir():
        raise ConvertError(str(sentences), None, "folder not found (expected Sentences/ and Annotations/)", "missing file")
    ids = sorted(p.stem for p in sentences.glob("*.txt"))
    if opts.split:
        listed = root / f"{opts.split}.txt"
        if not listed.is_file():
            raise ConvertError(str(listed), None, f"split file for --split {opts.split} not found", "missing file")
        keep = set(read_text(listed).split())
        ids = [i for i in ids if i in keep]
    for image_id in ids:
        try:
            text = read_text(sentences / f"{image_id}.txt").splitlines()
        except ConvertError as e:  # this file's phrases cannot be told apart: one counted error for the file
            yield f"Sentences/{image_id}.txt", e
            continue
        xml_path = root / "Annotations" / f"{image_id}.xml"
        for s, sentence in enumerate(text):
            for p, m in enumerate(PHRASE_RE.finditer(sentence)):
                where = f"Sentences/{image_id}.txt:{s + 1} phrase {p}"
                yield where, {"image_id": image_id, "xml": str(xml_path), "entity": m.group(1), "type": m.group(2),
                              "phrase": m.group(3), "s": s, "p": p, "split": opts.split}


def _number(text, where, field):
    if text is None or not NUMBER_RE.fullmatch(text):
        raise ConvertError(where, field, f"expected a number, got {text!r}", f"bad {field.rsplit('.', 1)[-1]}")
    return float(text)


def _annotation(path, where):
    """(size, {entity: [(object index, box)]}) of one Annotations/ID.xml; errors name the phrase (``where``)
    and the XML file."""
    where = f"{where} ({Path(path).name})"
    try:
        root = ET.fromstring(read_bytes(path))
    except ConvertError as e:
        raise ConvertError(where, None, e.message, e.reason) from None
    except ET.ParseError as e:
        raise ConvertError(where, None, f"malformed XML: {e}", "malformed XML") from None
    size = root.find("size")
    if size is None:
        raise ConvertError(where, "size", "missing", "missing size")
    wh = (_number(size.findtext("width"), where, "size.width"), _number(size.findtext("height"), where, "size.height"))
    boxes = {}
    for i, obj in enumerate(root.iter("object")):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        box = tuple(_number(bb.findtext(k), where, f"object[{i}].bndbox.{k}") for k in ("xmin", "ymin", "xmax", "ymax"))
        for name in obj.iter("name"):
            boxes.setdefault(name.text, []).append((i, box))
    return wh, boxes


def parse(raw, where, opts) -> Sample:
    size, boxes = _annotation(raw["xml"], where)
    entity_boxes = boxes.get(raw["entity"], [])
    if not entity_boxes:
        raise Filtered(f"phrase without a box ({raw['type']})")
    return Sample(
        id=f"flickr30k-{raw['image_id']}-s{raw['s']}-p{raw['p']}", image=f"{raw['image_id']}.jpg", size=size,
        expression=raw["phrase"], boxes=tuple(b for _, b in entity_boxes), split=raw["split"], where=where,
        fields={"boxes": [f"object[{i}].bndbox" for i, _ in entity_boxes], "size": "size.width, height", "image": "filename"},
    )

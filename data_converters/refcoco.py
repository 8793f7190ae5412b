"""``refcoco``: RefCOCO / RefCOCO+ / RefCOCOg in the refer toolkit's layout (github.com/lichengunc/refer).

Input: the dataset folder holding ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` and
``instances.json`` (or the path of one ``refs(...).p``; ``instances.json`` sits next to it). The dataset
name comes from --dataset or the folder name (refcoco, refcoco+, refcocog); the split-by from --split-by,
else unc (refcocog: umd). --split keeps one split (train, val, test, testA, testB).
One record per referring sentence. Images: ``instances.json`` ``file_name`` (COCO train2014), relative to
--image-root. Tasks: rec (sentence -> box), res (sentence -> mask), reg, point.
The refs file is a Python pickle (the toolkit's own format); it is read as plain data only (lists, dicts,
strings, numbers), so a pickle naming any class or function is refused rather than run.
``instances.json``'s images, annotations and categories are lookup tables: an entry without a distinct ``id``
stops the run; a ref is a record: a bad one is counted.
"""
from __future__ import annotations

import re
from pathlib import Path

from .base import Sample
from .coco import load_instances
from .inputs import ConvertError, Fields, as_key, json_type, load_pickle

TASKS = ("rec", "res", "reg", "point")
FORMATS = "refer toolkit folder: refs(unc|umd|google).p + instances.json (refcoco, refcoco+, refcocog)"
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


def _locate(opts):
    path = Path(opts.input)
    if path.is_file():
        m = re.fullmatch(r"refs\((\w+)\)\.p", path.name)
        if not m:
            raise ConvertError(str(path), None, "expected a refs(SPLITBY).p file or a dataset folder", "not a refer layout")
        return path.parent, opts.dataset or path.parent.name, m.group(1), path
    dataset = opts.dataset or path.name
    split_by = opts.split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
    return path, dataset, split_by, path / f"refs({split_by}).p"


def inputs(opts):
    """What the conversion reads: the refs file and instances.json beside it (the folder, when given one)."""
    folder, _, _, refs_path = _locate(opts)
    return [folder] if Path(opts.input).is_dir() else [refs_path, folder / "instances.json"]


def read(opts):
    folder, dataset, split_by, refs_path = _locate(opts)
    if not refs_path.is_file():
        have = sorted(p.name for p in folder.glob("refs(*).p")) if folder.is_dir() else []
        raise ConvertError(str(refs_path), None, f"file not found (the folder has: {have or 'no refs files'})", "missing file")
    refs = load_pickle(refs_path)
    if not isinstance(refs, list):
        raise ConvertError(str(refs_path), None, f"expected a list of refs, got {type(refs).__name__}", "not a refs file")
    _, tables = load_instances(folder / "instances.json", ("images", "annotations", "categories"))
    images, anns, cats = tables["images"], tables["annotations"], tables["categories"]
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict):
            where = f"{refs_path.name}:refs[{k}]"
            yield where, ConvertError(where, None, f"expected a ref (a dict), got {type(ref).__name__}", "ref is not a dict")
            continue
        if opts.split and ref.get("split") != opts.split:
            continue
        sentences = ref.get("sentences")
        for s, sent in enumerate(sentences if isinstance(sentences, list) and sentences else [None]):
            where = f"{refs_path.name}:refs[{k}] (ref_id {ref.get('ref_id')}) sentences[{s}]"
            yield where, {"ref": ref, "s": s, "sent": sent, "ann": anns.get(as_key(ref.get("ann_id"))),
                          "image": images.get(as_key(ref.get("image_id"))), "category": cats.get(as_key(ref.get("category_id"))),
                          "dataset": dataset, "split_by": split_by}


def parse(raw, where, opts) -> Sample:
    ref = Fields(raw["ref"], where)
    s = raw["s"]
    if raw["sent"] is None:
        ref.array("sentences")  # missing or not a list: that error
        raise ref.error("sentences", "the ref has no sentences", "missing sentences")
    sent = Fields(raw["sent"], where, f"sentences[{s}]")
    ann_id, image_id = ref.ident("ann_id"), ref.ident("image_id")
    if raw["ann"] is None:
        raise ref.error("ann_id", f"ann_id {ann_id!r} is not in instances.json", "unknown ann_id")
    if raw["image"] is None:
        raise ref.error("image_id", f"image_id {image_id!r} is not in instances.json", "unknown image_id")
    ann, im = raw["ann"].moved(where), raw["image"].moved(where)
    x, y, w, h = ann.numbers("bbox", 4)
    if w < 0 or h < 0:
        raise ann.error("bbox", f"negative width or height in [x, y, w, h] = {[x, y, w, h]}", "box x2 < x1 or y2 < y1")
    seg = ann.raw("segmentation", optional=opts.task not in ("res",))
    if seg is not None and not isinstance(seg, (list, dict)):
        raise ann.error("segmentation", f"expected polygons (a list) or RLE (an object), got {json_type(seg)}", "bad segmentation")
    expression = sent.string("sent", optional=True) or sent.string("raw")
    expression_field = sent.name("sent" if sent.obj.get("sent") else "raw")
    sent_id = sent.ident("sent_id", optional=True)
    split = ref.string("split", optional=True)
    return Sample(
        id=f"{raw['dataset']}-{raw['split_by']}-ref{ref.ident('ref_id')}-sent{s if sent_id is None else sent_id}",
        image=im.string("file_name"), size=(im.number("width"), im.number("height")), expression=expression,
        boxes=((x, y, x + w, y + h),), polygons=seg if isinstance(seg, list) else None, rle=seg if isinstance(seg, dict) else None,
        split=split, where=where,
        fields={"boxes": ann.name("bbox"), "size": f"{im.path}.width, height", "segmentation": ann.name("segmentation"),
                "image": im.name("file_name"), "expression": expression_field},
    )

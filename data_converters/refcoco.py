"""``refcoco``: RefCOCO / RefCOCO+ / RefCOCOg in the refer toolkit's layout (github.com/lichengunc/refer).

Input: the dataset folder holding ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` and
``instances.json`` (or the path of one ``refs(...).p``; ``instances.json`` sits next to it). The dataset
name comes from --dataset or the folder name (refcoco, refcoco+, refcocog); the split-by from --split-by,
else unc (refcocog: umd). --split keeps one split (train, val, test, testA, testB).
One record per referring sentence. Images: ``instances.json`` ``file_name`` (COCO train2014), relative to
--image-root. Tasks: rec (sentence -> box), res (sentence -> mask), reg, point.
The refs file is a Python pickle (the toolkit's own format): load only files you trust.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

from .base import ConvertError, Sample, check_numbers, get, load_json

TASKS = ("rec", "res", "reg", "point")
FORMATS = "refer toolkit folder: refs(unc|umd|google).p + instances.json (refcoco, refcoco+, refcocog)"
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


def _locate(opts):
    path = Path(opts.input)
    if path.is_file():
        m = re.fullmatch(r"refs\((\w+)\)\.p", path.name)
        if not m:
            raise ConvertError(str(path), "-", "expected a refs(SPLITBY).p file or a dataset folder", "not a refer layout")
        return path.parent, opts.dataset or path.parent.name, m.group(1), path
    dataset = opts.dataset or path.name
    split_by = opts.split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
    return path, dataset, split_by, path / f"refs({split_by}).p"


def read(opts):
    folder, dataset, split_by, refs_path = _locate(opts)
    if not refs_path.is_file():
        have = sorted(p.name for p in folder.glob("refs(*).p")) if folder.is_dir() else []
        raise ConvertError(str(refs_path), "-", f"file not found (the folder has: {have or 'no refs files'})", "missing file")
    try:
        with open(refs_path, "rb") as f:
            refs = pickle.load(f, encoding="latin1")
    except Exception as e:  # a pickle can fail in many ways; all mean "not a refs file"
        raise ConvertError(str(refs_path), "-", f"cannot unpickle: {e}", "unreadable refs file") from None
    inst = load_json(folder / "instances.json")
    for key in ("images", "annotations", "categories"):
        if not isinstance(inst, dict) or not isinstance(inst.get(key), list):
            raise ConvertError(str(folder / "instances.json"), key, "missing or not a list", f"missing {key}")
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    for k, ref in enumerate(refs):
        if opts.split and ref.get("split") != opts.split:
            continue
        for s, sent in enumerate(ref.get("sentences") or [None]):
            where = f"{refs_path.name}:refs[{k}] (ref_id {ref.get('ref_id')}) sentences[{s}]"
            yield where, {"ref": ref, "sent": sent, "ann": anns.get(ref.get("ann_id")), "image": images.get(ref.get("image_id")),
                          "category": cats.get(ref.get("category_id")), "dataset": dataset, "split_by": split_by}


def parse(raw, where, opts) -> Sample:
    ref, sent, ann, im = raw["ref"], raw["sent"], raw["ann"], raw["image"]
    if sent is None:
        raise ConvertError(where, "sentences", "the ref has no sentences", "missing sentences")
    if ann is None:
        raise ConvertError(where, "ann_id", f"ann_id {ref.get('ann_id')!r} is not in instances.json", "unknown ann_id")
    if im is None:
        raise ConvertError(where, "image_id", f"image_id {ref.get('image_id')!r} is not in instances.json", "unknown image_id")
    x, y, w, h = check_numbers(get(ann, "bbox", where), 4, where, "bbox")
    seg = ann.get("segmentation")
    expression = sent.get("sent") or sent.get("raw")
    return Sample(
        id=f"{raw['dataset']}-{raw['split_by']}-ref{get(ref, 'ref_id', where)}-sent{sent.get('sent_id', 0)}",
        image=str(get(im, "file_name", where)), size=(get(im, "width", where), get(im, "height", where)), expression=expression,
        boxes=((x, y, x + w, y + h),), polygons=seg if isinstance(seg, list) else None, rle=seg if isinstance(seg, dict) else None,
        split=ref.get("split"), where=where, fields={"boxes": "bbox"},
    )

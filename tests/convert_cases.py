"""Every source's valid real-format input, laid out in a folder, and the convert-datasets CLI run in-process.

Shared by the hostile-input tests and the property tests: ``case(source, folder)`` writes one source's fixture
(tests/fixtures/convert, or real COCO annotations from tests/fixtures/data) into ``folder`` and returns the
arguments that convert it and the files a test may corrupt.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
from pathlib import Path

from data_converters.cli import main

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures" / "convert"
DATA = HERE / "fixtures" / "data"
IMAGES = DATA / "coco_mini" / "val2017"
COCO = DATA / "coco_mini" / "instances_val2017.json"
SOURCES = ("llava", "coco", "refcoco", "vlm-r1", "shikra", "odvg", "flickr30k", "vg", "qwen", "kosmos2", "shapes")


def run_cli(argv) -> tuple[int, str]:
    """``convert-datasets ARGV`` in this process: (exit status, stderr). An exception escaping main() fails the
    caller's test, which is the point."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def coco_subset(image_ids=(34417, 183709), limit=8) -> dict:
    """Real COCO annotations of a few images (image 34417 holds a crowd region with uncompressed RLE)."""
    coco = json.loads(COCO.read_text())
    anns = [a for a in coco["annotations"] if a["image_id"] in image_ids]
    crowd = [a for a in anns if a["iscrowd"]]
    per_image = max(1, (limit - 1) // len(image_ids))
    keep = crowd[:1] + [a for i in image_ids for a in [a for a in anns if a["image_id"] == i and not a["iscrowd"]][:per_image]]
    ims = [i for i in coco["images"] if i["id"] in image_ids]
    return {"images": ims, "annotations": keep, "categories": coco["categories"]}


def refer_folder(folder: Path, per_image=((397133, 2), (34417, 1)), test_a=(), unknown_ann=False) -> Path:
    """A refer-toolkit folder from real COCO annotations: refs(unc).p (a protocol-2 pickle of refs with two
    sentences each, as the toolkit ships them) and instances.json. ``per_image``: (image id, objects) to refer
    to; refs numbered in ``test_a`` go to split testA, the others to train; ``unknown_ann`` adds a ref whose
    ann_id instances.json lacks."""
    folder.mkdir(parents=True, exist_ok=True)
    coco = json.loads(COCO.read_text())
    anns = [a for i, n in per_image for a in [a for a in coco["annotations"] if a["image_id"] == i and not a["iscrowd"]][:n]]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    refs = []
    for k, a in enumerate(anns):
        im = next(i for i in coco["images"] if i["id"] == a["image_id"])
        sents = [{"tokens": ["the", names[a["category_id"]]], "raw": f"The {names[a['category_id']]}", "sent_id": 10 * k + s,
                  "sent": f"the {names[a['category_id']]} {side}"} for s, side in enumerate(("on the left", "near the middle"))]
        refs.append({"sent_ids": [s["sent_id"] for s in sents], "file_name": im["file_name"][:-4] + f"_{a['id']}.jpg",
                     "ann_id": a["id"], "ref_id": 100 + k, "image_id": a["image_id"], "split": "testA" if k in test_a else "train",
                     "sentences": sents, "category_id": a["category_id"]})
    if unknown_ann:
        refs.append({**refs[0], "ref_id": 999, "ann_id": -1, "split": "train"})
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the toolkit's pickles are protocol 2
    images = [i for i in coco["images"] if i["id"] in dict(per_image)]
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": coco["categories"]}))
    return folder


def shapes_folder(folder: Path) -> Path:
    from data_converters import shapes

    shapes.generate(folder, {"train": 3}, seed=1, image_size=32, n_objects=(2, 2), progress=False)
    return folder


def case(source: str, folder: Path) -> tuple[list, list[Path]]:
    """(arguments before --output, files a test may corrupt) for ``source``'s valid input written into
    ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)

    def copy(name):
        shutil.copy(FIXTURES / name, folder / name)
        return folder / name

    if source == "llava":
        p = copy("llava_mix.json")
        return ["llava", "--input", p, "--image-root", IMAGES], [p]
    if source == "coco":
        p = folder / "instances_val2017.json"
        p.write_text(json.dumps(coco_subset()))
        return ["coco", "--input", p, "--task", "point"], [p]
    if source == "refcoco":
        d = refer_folder(folder / "refcoco")
        return ["refcoco", "--input", d], [d / "refs(unc).p", d / "instances.json"]
    if source == "vlm-r1":
        p = copy("vlm_r1.json")
        return ["vlm-r1", "--input", p], [p]
    if source == "shikra":
        p = copy("shikra.jsonl")
        return ["shikra", "--input", p], [p]
    if source == "odvg":
        p = copy("odvg.jsonl")
        return ["odvg", "--input", p, "--task", "rec"], [p]
    if source == "flickr30k":
        d = folder / "flickr30k"
        shutil.copytree(FIXTURES / "flickr30k", d)
        return ["flickr30k", "--input", d], sorted(p for p in d.rglob("*") if p.is_file() and p.name != "val.txt")
    if source == "vg":
        d = folder / "vg"
        shutil.copytree(FIXTURES / "vg", d)
        return ["vg", "--input", d / "region_descriptions.json"], [d / "region_descriptions.json", d / "image_data.json"]
    if source == "qwen":
        p = copy("qwen.json")
        return ["qwen", "--input", p, "--image-root", IMAGES], [p]
    if source == "kosmos2":
        p = copy("kosmos2.jsonl")
        return ["kosmos2", "--input", p, "--image-root", IMAGES], [p]
    if source == "shapes":
        d = shapes_folder(folder / "shapes")
        return ["shapes", "--input", d, "--grid", "8"], [d / "annotations.jsonl"]
    raise ValueError(source)


def load(path):
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())

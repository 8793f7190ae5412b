"""Pictures: valid PNGs of the image's size, shapes where they belong, the lattice of the pad frame."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from llava_getok import viz
from llava_getok.vocab import GETokConfig

PORTRAIT, LANDSCAPE = "000000183709.jpg", "000000034417.jpg"  # 480 x 640 and 500 x 375
CFG = GETokConfig(grid=4, mode="grid")


@pytest.fixture()
def image_root(shared_data, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name in (PORTRAIT, LANDSCAPE):
        shutil.copy(shared_data / "coco_mini" / "val2017" / name, root / name)
    return root


def record(rid, image, size, shapes, task="rec", **extra):
    return {"id": rid, "image": image, "conversations": [],
            "getok": {"task": task, "frame": "pad", "size": list(size), "config": CFG.to_dict(), "shapes": shapes,
                      "expression": "the thing", **extra}}


def test_lattice_of_the_pad_frame_on_a_portrait_image():
    lines = viz.lattice_lines(CFG, (480, 640), "pad")
    # S = 640, offset 80: vertical lattice lines at k * 160 - 80, only 80, 240 and 400 fall inside
    assert [l[0][0] for l in lines if l[0][0] == l[1][0]] == [80, 240, 400]
    assert [l[0][1] for l in lines if l[0][1] == l[1][1]] == [0, 160, 320, 480, 640]
    cells = viz.anchor_cells([{"kind": "point", "points": [[100, 10]]}], CFG, (480, 640), "pad")
    assert cells == [(80.0, 0.0, 240.0, 160.0)]  # cell (1, 0), clamped to the image


def test_show_one_sample_is_a_png_of_the_image_size(image_root, tmp_path):
    gt = [{"kind": "box", "points": [[100, 100], [300, 250]]}]
    pred = {"id": "a", "text": "", "errors": [], "shapes": [
        {"kind": "box", "points": [[50, 60], [200, 300]]}, {"kind": "point", "points": [[400, 50]]},
        {"kind": "polyline", "points": [[10, 10], [80, 300], [450, 350]]}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([record("a", LANDSCAPE, (500, 375), gt)]))
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps(pred) + "\n")
    out = tmp_path / "a.png"
    assert viz.main(["--annotations", str(ann), "--predictions", str(preds), "--image-root", str(image_root),
                     "--output", str(out), "--grid"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (500, 375)
        a = np.asarray(im.convert("RGB"))
    assert tuple(a[175, 100]) == viz.GT  # left edge of the ground-truth box
    assert tuple(a[200, 50]) == viz.PRED  # left edge of the predicted box
    assert tuple(a[50, 400]) == viz.PRED  # the predicted point


def test_a_raw_text_answer_is_drawn_where_eval_reads_it(image_root, tmp_path):
    """A model's raw answer (LLaVA's model_vqa: question_id and text) is parsed in the record's format and frame."""
    rec = record("a", LANDSCAPE, (500, 375), [])
    rec["getok"].pop("config")
    rec["getok"]["format"] = {"name": "text", "decimals": 2}
    ann, preds, out = tmp_path / "ann.json", tmp_path / "answers.jsonl", tmp_path / "a.png"
    ann.write_text(json.dumps([rec]))
    # pad frame of 500 x 375: S = 500, y offset 62; x1 = 0.1 * 500 = 50, y1 = 0.3 * 500 - 62 = 88
    preds.write_text(json.dumps({"question_id": "a", "text": "It is at [0.1, 0.3, 0.5, 0.7]."}) + "\n")
    assert viz.main(["--annotations", str(ann), "--predictions", str(preds), "--image-root", str(image_root),
                     "--output", str(out)]) == 0
    with Image.open(out) as im:
        a = np.asarray(im.convert("RGB"))
    assert tuple(a[150, 50]) == viz.PRED and tuple(a[88, 150]) == viz.PRED  # left and top edges of the answer's box


def test_masks_and_contact_sheet(image_root, tmp_path, shared_data):
    from pycocotools import mask as mask_utils

    h, w = 640, 480
    m = np.zeros((h, w), dtype=np.uint8)
    m[300:400, 200:300] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    records = [record("res", PORTRAIT, (w, h), [], task="res", mask=rle),
               record("b", LANDSCAPE, (500, 375), [{"kind": "point", "points": [[30, 30]]}], task="point")]
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "res", "text": "", "errors": [],
                                 "shapes": [{"kind": "mask", "points": [[250, 350]]}]}) + "\n")
    out, per = tmp_path / "sheet.png", tmp_path / "each"
    assert viz.main(["--annotations", str(ann), "--predictions", str(preds), "--image-root", str(image_root),
                     "--output", str(out), "--output-dir", str(per), "--columns", "2", "--thumb", "100"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (2 * 104 + 4, 100 + viz.CAPTION_STRIP + 4 + 4)
    with Image.open(per / "res.png") as im, Image.open(image_root / PORTRAIT) as raw:
        assert im.size == (480, 640)
        a, r = np.asarray(im.convert("RGB")).astype(int), np.asarray(raw.convert("RGB")).astype(int)
    # outside every mask the picture is the image; inside the ground truth it leans towards green
    assert np.abs(a[600, 20] - r[600, 20]).max() <= 1
    assert (a[310:320, 205:215, 1] - r[310:320, 205:215, 1]).mean() > 20


def test_bad_input_is_named(image_root, tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([record("a", "nope.jpg", (500, 375), [])]))
    assert viz.main(["--annotations", str(ann), "--image-root", str(image_root), "--output", str(tmp_path / "x.png")]) == 1
    assert "record a: field 'image'" in capsys.readouterr().err
    assert viz.main(["--annotations", str(ann), "--image-root", str(image_root), "--output", str(tmp_path / "x.png"),
                     "--ids", "zz"]) == 1
    assert "no record with id 'zz'" in capsys.readouterr().err


def test_contact_sheet_scales_small_pictures_up_sharply():
    small = Image.new("RGB", (8, 4), (255, 0, 0))
    small.putpixel((0, 0), (0, 0, 255))
    sheet = viz.contact_sheet([small, small], columns=2, thumb=80, pad=0)
    assert sheet.size == (160, 80)
    a = np.asarray(sheet)
    # 8 x 4 -> 80 x 40, centred vertically at y = 20; nearest-neighbour keeps the blue pixel a 10 x 10 block
    assert (a[20:30, 0:10] == (0, 0, 255)).all() and (a[20:30, 10:20] == (255, 0, 0)).all()

"""Metrics against hand-computed IoUs, in original pixels, through the pad frame of real COCO images."""
import json

import numpy as np
import pytest
from PIL import Image

from llava_getok.eval import cli as eval_cli
from llava_getok.eval.metrics import NO_TARGET, SampleScore, aggregate, score_record
from llava_getok.parse import parse
from llava_getok.records import prediction_line
from llava_getok.vocab import GETokConfig

GRID4 = GETokConfig(grid=4, mode="grid")
PORTRAIT, LANDSCAPE = "000000183709.jpg", "000000034417.jpg"  # 480 x 640 and 500 x 375


def image_size(shared_data, name):
    with Image.open(shared_data / "coco_mini" / "val2017" / name) as im:
        return im.size


def rec_record(rid, image, size, gt_box, answer, cfg=GRID4, split="val"):
    return {
        "id": rid, "image": image,
        "conversations": [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": answer}],
        "getok": {"source": "coco", "task": "rec", "split": split, "frame": "pad", "size": list(size),
                  "config": cfg.to_dict(), "shapes": [{"kind": "box", "points": [gt_box[:2], gt_box[2:]]}]},
    }


def predicted(record, text, cfg=GRID4):
    g, result = record["getok"], parse(text, cfg)
    return prediction_line(record["id"], text, result.shapes, [e.message for e in result.errors], g["size"], g["frame"])


def test_rec_iou_undoes_the_pad_frame_on_a_portrait_image(shared_data):
    size = image_size(shared_data, PORTRAIT)
    assert size == (480, 640)  # S = 640, the image sits 80 px from the left of the padded square
    r = rec_record("p", PORTRAIT, size, [0, 0, 480, 640], "")
    pred = predicted(r, "<box><grid_0_0><grid_3_3></box>")
    # anchors 1/8 and 7/8 of 640 px = 80 and 560; x - 80, clamped to the image: (0, 80) - (480, 560)
    assert pred["shapes"][0]["points"] == [[0.0, 80.0], [480.0, 560.0]]
    s = score_record(r, pred)
    assert s.status == "ok" and s.iou == pytest.approx(480 * 480 / (480 * 640))  # 0.75


def test_rec_iou_undoes_the_pad_frame_on_a_landscape_image(shared_data):
    size = image_size(shared_data, LANDSCAPE)
    assert size == (500, 375)  # S = 500, the image sits (500 - 375) // 2 = 62 px from the top
    r = rec_record("l", LANDSCAPE, size, [200, 100, 300, 300], "")
    pred = predicted(r, "<box><grid_1_1><grid_2_3></box>")
    # x: 0.375 * 500 = 187.5, 0.625 * 500 = 312.5; y: 187.5 - 62 = 125.5, 437.5 - 62 = 375.5 -> 375
    assert pred["shapes"][0]["points"] == [[187.5, 125.5], [312.5, 375.0]]
    inter = (300 - 200) * (300 - 125.5)
    union = (312.5 - 187.5) * (375 - 125.5) + 100 * 200 - inter
    s = score_record(r, pred)
    assert s.iou == pytest.approx(inter / union) and s.hit  # 0.5172


def test_misses_are_counted_by_kind(shared_data):
    size = image_size(shared_data, LANDSCAPE)
    r = rec_record("l", LANDSCAPE, size, [200, 100, 300, 300], "")
    assert score_record(r, predicted(r, "<box><grid_1_1></box>")).status == "unparseable"
    assert score_record(r, predicted(r, "a dog <grid_1_1>")).status == "no_shape"
    assert score_record(r, None).status == "missing"
    scores = [score_record(r, predicted(r, t)) for t in ("<box><grid_1_1><grid_2_3></box>", "<box><grid_1_1></box>", "no")]
    scores.append(score_record(r, None))
    row = aggregate(scores)["rec"]["coco/val"]
    assert row["n"] == 4 and row["acc@0.5"] == 0.25 and row["acc@0.8"] == 0.0
    assert (row["unparseable"], row["no_shape"], row["missing"]) == (1, 1, 1)
    assert row["miou"] == pytest.approx(scores[0].iou / 4)


def test_ciou_is_cumulative_and_giou_the_mean():
    s = [SampleScore("a", "res", "val", "ok", iou=10 / 20, inter=10, union=20),
         SampleScore("b", "res", "val", "ok", iou=90 / 100, inter=90, union=100),
         SampleScore("c", "res", "val", "no_shape", union=30)]
    row = aggregate(s)["res"]["val"]
    assert row["ciou"] == pytest.approx(100 / 150) and row["giou"] == pytest.approx((0.5 + 0.9 + 0) / 3)


@pytest.fixture(scope="module")
def res_case(shared_data):
    """A real COCO person mask in the portrait image, its anchors from the greedy, and the image."""
    from pycocotools import mask as mask_utils

    from llava_getok.codec import encode_mask_points
    from llava_getok.masks import SuperpixelGenerator, greedy_mask_anchors

    coco = json.loads((shared_data / "coco_mini" / "instances_val2017.json").read_text())
    ann = next(a for a in coco["annotations"] if a["id"] == 425542)  # a person, 238 x 422 px
    with Image.open(shared_data / "coco_mini" / "val2017" / PORTRAIT) as im:
        image = np.asarray(im.convert("RGB"))
    h, w = image.shape[:2]
    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
    rle["counts"] = rle["counts"].decode()
    gt = mask_utils.decode(rle).astype(bool)
    cfg = GETokConfig(grid=32, mode="grid")
    gen = SuperpixelGenerator()
    anchors = np.asarray(greedy_mask_anchors(gt, image, cfg, "pad", gen))
    record = {
        "id": "res-1", "image": PORTRAIT,
        "conversations": [{"from": "human", "value": "<image>\nSegment the person."},
                          {"from": "gpt", "value": encode_mask_points(anchors, cfg)}],
        "getok": {"source": "coco", "task": "res", "split": "val", "frame": "pad", "size": [w, h],
                  "config": cfg.to_dict(), "shapes": [], "mask": rle},
    }
    return record, image, gt, gen, cfg


def test_res_iou_of_one_anchor_is_its_superpixel_against_the_mask(res_case):
    record, image, gt, gen, cfg = res_case
    # one anchor: cell (10, 15) of 32 in the pad frame -> pixels (10.5 / 32 * 640 - 80, 15.5 / 32 * 640)
    text = "<seg><grid_10_15></seg>"
    pred = predicted(record, text, cfg)
    assert pred["shapes"][0]["points"] == [[130.0, 310.0]]
    labels = gen.segments(image)
    sp = labels == labels[310, 130]
    inter, union = (sp & gt).sum(), (sp | gt).sum()
    s = score_record(record, pred, lambda r: image, gen)
    assert (s.inter, s.union) == (inter, union) and s.iou == pytest.approx(inter / union)


def test_res_ceiling_and_misses(res_case, tmp_path):
    from llava_getok.masks import mask_from_anchors

    record, image, gt, gen, cfg = res_case
    loader = lambda r: image  # noqa: E731
    ceiling = eval_cli.ceiling_predictions([record])["res-1"]
    s = score_record(record, ceiling, loader, gen)
    anchors = [p for sh in parse(record["conversations"][1]["value"], cfg).shapes for p in sh.points]
    expected = mask_from_anchors(anchors, image, "pad", gen)
    assert s.iou == pytest.approx((expected & gt).sum() / (expected | gt).sum())
    assert s.iou > 0.5  # the greedy found a mask close to the person
    miss = score_record(record, {"id": "res-1", "text": "", "shapes": [], "errors": []}, loader, gen)
    assert miss.status == "no_shape" and miss.union == gt.sum() and miss.inter == 0


def test_pointing_inside_mask_else_box(res_case):
    record, image, gt, gen, cfg = res_case
    r = json.loads(json.dumps(record))
    r["getok"]["task"] = "point"
    ys, xs = np.nonzero(gt)
    inside = {"id": "x", "shapes": [{"kind": "point", "points": [[float(xs[0]) + 0.5, float(ys[0]) + 0.5]]}], "errors": []}
    outside = {"id": "x", "shapes": [{"kind": "point", "points": [[1.0, 1.0]]}], "errors": []}
    assert score_record(r, inside).hit and not score_record(r, outside).hit
    del r["getok"]["mask"]
    r["getok"]["shapes"] = [{"kind": "box", "points": [[0, 0], [10, 10]]}]
    assert score_record(r, outside).hit
    # target points only: within one grid cell (1/32 of the 640 px pad square = 20 px) of one
    r["getok"]["shapes"] = [{"kind": "point", "points": [[20, 20]]}]
    assert score_record(r, outside).hit
    r["getok"]["shapes"] = [{"kind": "point", "points": [[22, 1]]}]
    assert not score_record(r, outside).hit
    r["getok"]["shapes"] = []  # nothing to point at: a point is a miss, no point the hit (gRefCOCO's no-target)
    s = score_record(r, outside)
    assert (s.status, s.hit, s.reason) == ("ok", False, NO_TARGET)
    assert score_record(r, {"id": "x", "shapes": [], "errors": []}).hit


def test_eval_cli_writes_tables_with_the_ceiling(shared_data, tmp_path, capsys):
    size = image_size(shared_data, LANDSCAPE)
    cfg = GETokConfig(grid=4, mode="grid")
    records = [
        rec_record("a", LANDSCAPE, size, [187.5, 125.5, 312.5, 375], "<box><grid_1_1><grid_2_3></box>", cfg, "testA"),
        rec_record("b", LANDSCAPE, size, [200, 100, 300, 300], "<box><grid_1_1><grid_2_2></box>", cfg, "testB"),
        {"id": "c", "conversations": []},  # not converted: counted
        rec_record("d", LANDSCAPE, size, [0, 0, 9, 9], ""),  # a det record (below): no metric, counted
    ]
    records[3]["getok"]["task"] = "det"
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    preds = tmp_path / "preds.jsonl"
    lines = [predicted(records[0], "<box><grid_1_1><grid_2_3></box>"), predicted(records[1], "<box>"),
             {"id": "zzz", "text": "", "shapes": [], "errors": []}]
    preds.write_text("".join(json.dumps(p) + "\n" for p in lines))
    assert eval_cli.main(["--predictions", str(preds), "--annotations", str(ann), "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| coco/testA | 1 | 100.0 | 100.0 | 100.0 | 0 | 0 | 0 | 0 | 100.0 | 100.0 | 100.0 |" in out
    assert "| coco/testB | 1 | 0.0 | 0.0 | 0.0 | 1 | 0 | 0 | 0 |" in out
    assert "1 prediction id(s) not in the annotations" in out and "1 record(s) without a getok field" in out
    assert "not scored (no metric for the task): det: 1" in out
    metrics = json.loads((tmp_path / "out" / "preds.metrics.json").read_text())
    assert metrics["metrics"]["rec"]["all"]["acc@0.5"] == 0.5
    # the ceiling of testB: its answer's box (187.5, 125.5, 312.5, 312.5 - 62) against (200, 100, 300, 300)
    inter = 100 * (250.5 - 125.5)
    union = 125 * 125 + 100 * 200 - inter
    assert metrics["ceiling"]["rec"]["coco/testB"]["miou"] == pytest.approx(inter / union, abs=1e-3)
    assert len((tmp_path / "out" / "preds.scores.jsonl").read_text().splitlines()) == 4
    # bad input: a repeated id names the file and the line
    preds.write_text("".join(json.dumps(p) + "\n" for p in lines[:1] * 2))
    assert eval_cli.main(["--predictions", str(preds), "--annotations", str(ann)]) == 1
    assert "preds.jsonl:2: id 'a' appears twice" in capsys.readouterr().err
    preds.write_text(json.dumps({"id": "a", "shapes": [{"kind": "box", "points": [[1, 2, 3, 4]]}], "errors": []}) + "\n")
    assert eval_cli.main(["--predictions", str(preds), "--annotations", str(ann)]) == 1
    assert "preds.jsonl:1 (id a): shapes[0]: 'points' must be a non-empty list of [x, y]" in capsys.readouterr().err

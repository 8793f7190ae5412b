"""The records schema (llava_getok.records): pixels <-> frame, one rounding, the mask's RLE, validation."""
import json

import numpy as np
import pytest

from llava_getok.codec import Shape
from llava_getok.records import (
    RecordsError,
    check_getok,
    record_mask,
    shapes_from_pixels,
    shapes_to_pixels,
)
from llava_getok.rle import rle_to_mask, segmentation_to_rle


@pytest.mark.parametrize("frame", ["pad", "orig"])
@pytest.mark.parametrize("size", [(640, 427), (375, 500)])
def test_pixel_shapes_round_trip_through_the_frame(frame, size):
    shapes = [{"kind": "box", "points": [[7.0, 167.835], [156.3, 262.7]]}, {"kind": "point", "points": [[0.0, 374.5]]},
              {"kind": "mask", "points": [[10.125, 20.5], [300.25, 9.0]]}]
    back = shapes_to_pixels(shapes_from_pixels(shapes, size, frame), size, frame)
    assert [s["kind"] for s in back] == ["box", "point", "mask"]
    for got, want in zip(back, shapes):
        assert np.allclose(got["points"], want["points"], atol=1e-3)  # one rounding, to 3 decimals
        assert all(round(v, 3) == v for p in got["points"] for v in p)


def test_shapes_to_pixels_sorts_box_corners_and_clamps_to_the_image():
    out = shapes_to_pixels([Shape("box", ((0.0, 0.0), (1.0, 1.0)))], (480, 640), "pad")  # the whole padded square
    assert out == [{"kind": "box", "points": [[0.0, 0.0], [480.0, 640.0]]}]


def test_rle_in_every_coco_form_decodes_to_the_same_mask(shared_data):
    from pycocotools import mask as mask_utils

    coco = json.loads((shared_data / "coco_mini" / "instances_val2017.json").read_text())
    sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
    crowd = next(a for a in coco["annotations"] if a["iscrowd"])
    assert isinstance(crowd["segmentation"]["counts"], list)  # uncompressed RLE
    polygons = next(a for a in coco["annotations"] if not a["iscrowd"])
    for ann in (crowd, polygons):
        w, h = sizes[ann["image_id"]]
        stored = segmentation_to_rle(ann["segmentation"], h, w)  # what getok.mask holds
        assert isinstance(stored["counts"], str) and stored["size"] == [h, w]
        rles = mask_utils.frPyObjects(ann["segmentation"], h, w)
        want = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles).astype(bool)
        assert want.any()
        forms = [stored, {**stored, "counts": stored["counts"].encode()}] + ([ann["segmentation"]] if ann is crowd else [])
        for rle in forms:
            assert (rle_to_mask(rle) == want).all()
        assert (record_mask({"mask": stored, "size": [w, h]}) == want).all() and record_mask({"size": [w, h]}) is None
        with pytest.raises(RecordsError, match=r"getok.mask is \(\d+, \d+\) \(W, H\) but getok.size"):
            record_mask({"mask": stored, "size": [w + 1, h]})


@pytest.mark.parametrize("getok, match", [
    ({"task": "rec", "size": [4, 4], "shapes": []}, "lacks 'frame'"),
    ({"task": "rec", "frame": "square", "size": [4, 4], "shapes": []}, "'frame' must be one of"),
    ({"task": "rec", "frame": "pad", "size": [4], "shapes": []}, "'size' must be"),
    ({"task": "rec", "frame": "pad", "size": [4, 4], "shapes": [{"kind": "circle", "points": [[1, 1]]}]},
     r"shapes\[0\]: 'kind' must be one of point, box, polyline, mask"),
    ({"task": "rec", "frame": "pad", "size": [4, 4], "shapes": [{"kind": "box", "points": []}]},
     r"shapes\[0\]: 'points' must be a non-empty list"),
])
def test_check_getok_names_the_field(getok, match):
    with pytest.raises(RecordsError, match=match):
        check_getok(getok)

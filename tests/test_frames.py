"""Frames read off the image processor (llava_getok.frames): a box drawn on a non-square image, pushed through the REAL
processor (LLaVA's own process_images, transformers' CLIPImageProcessor, LlavaImageProcessor(do_pad=True),
Qwen2VLImageProcessor's smart_resize, LLaVA-NeXT's anyres), lands on the processed pixels its GETok tokens decode to
in the derived frame, within the lattice's precision; the frames these processors do not use miss them."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import llava_getok as gt
from llava_getok.frames import ANYRES_REFUSED, frame_of, llava_frame, processor_frame
from llava_getok.geometry import (boxes_from_frame, boxes_to_frame, check_frame, crop_frame, frame_region,
                                  points_from_frame, points_to_frame)
from llava_getok.vocab import GETokConfig

CFG = GETokConfig(grid=32, rounds=1)
RED = (255, 0, 0)
LANDSCAPE = ((640, 426), (150, 60, 300, 200))  # 640 x 426: CLIP at 336 keeps x 106.7 .. 533.3
PORTRAIT = ((426, 640), (60, 150, 200, 300))
SHAPES = pytest.mark.parametrize("size,box", [LANDSCAPE, PORTRAIT], ids=["landscape", "portrait"])


def drawn(size, box) -> Image.Image:
    """A grey W x H image with a filled red rectangle covering the pixel box (x1, y1, x2, y2)."""
    w, h = size
    a = np.full((h, w, 3), 128, dtype=np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = RED
    return Image.fromarray(a)


def red_box(pixels: np.ndarray) -> np.ndarray:
    """The pixel box (x1, y1, x2, y2) of the red pixels of an (H, W, 3) image with values in [0, 1]."""
    red = (pixels[..., 0] > 0.6) & (pixels[..., 1] < 0.4) & (pixels[..., 2] < 0.4)
    ys, xs = np.nonzero(red)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def unnormalised(chw, processor) -> np.ndarray:
    """A processor's (3, H, W) normalised tensor -> (H, W, 3) in [0, 1]."""
    a = np.asarray(chw, dtype=np.float64).transpose(1, 2, 0)
    return a * np.asarray(processor.image_std) + np.asarray(processor.image_mean)


def where_tokens_say(box, size, frame, processed_wh) -> np.ndarray:
    """The box's GETok tokens (in ``frame``) decoded and scaled to the processed image's pixels."""
    tokens = gt.encode_box(boxes_to_frame(box, size, frame), CFG)
    return np.asarray(gt.decode_box(tokens, CFG)) * np.tile(processed_wh, 2)


def assert_lands(pixels, box, size, frame, others=("pad", "orig", "crop")):
    """The red box's processed pixels are where its tokens in ``frame`` say, within the lattice's error bound (plus
    1.5 px of resampling blur); in every other frame they are not."""
    h, w = pixels.shape[:2]
    seen = red_box(pixels)
    tol = CFG.max_error * np.array([w, h, w, h]) + 1.5
    got = where_tokens_say(box, size, frame, (w, h))
    assert (np.abs(got - seen) <= tol).all(), (frame, got, seen)
    for other in others:
        if other != frame:
            assert (np.abs(where_tokens_say(box, size, other, (w, h)) - seen) > tol).any(), other


def clip(edge=336, crop=336):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop})


class LlavaConfig:  # what LLaVA's process_images and train.py read of a model config
    def __init__(self, image_aspect_ratio):
        self.image_aspect_ratio = image_aspect_ratio


@SHAPES
@pytest.mark.parametrize("aspect,frame", [("pad", "pad"), ("square", "crop")])
def test_llavas_process_images_lands_the_box_where_its_tokens_say(size, box, aspect, frame):
    from llava.mm_utils import process_images

    processor, config = clip(), LlavaConfig(aspect)
    assert frame_of(config, processor) == frame
    tensor = process_images([drawn(size, box)], processor, config)[0]
    assert_lands(unnormalised(tensor, processor), box, size, frame)


@SHAPES
def test_transformers_clip_processor_is_a_crop_of_its_own_sizes(size, box):
    processor = clip(224, 224)  # clip-vit-large-patch14: another tower, another crop
    assert processor_frame(processor) == "crop:224"
    tensor = processor(drawn(size, box), return_tensors="np")["pixel_values"][0]
    assert_lands(unnormalised(tensor, processor), box, size, "crop:224", others=("pad", "orig"))


@SHAPES
def test_llava_hf_processor_with_do_pad_is_llavas_expand2square(size, box):
    from transformers import LlavaImageProcessor

    processor = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert processor_frame(processor) == "pad"
    tensor = processor(drawn(size, box), return_tensors="np")["pixel_values"][0]
    assert_lands(unnormalised(tensor, processor), box, size, "pad")
    processor.do_pad = False  # as llava-hf checkpoints ship it: CLIP's centre crop
    assert processor_frame(processor) == "crop"


@SHAPES
def test_qwen2_vl_smart_resize_stretches_the_whole_image(size, box):
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(min_pixels=64 * 28 * 28, max_pixels=128 * 28 * 28)  # 640 x 426 -> 364 x 252
    assert frame_of(processor) == "orig"
    out = processor(drawn(size, box), return_tensors="np")
    t, gh, gw = (int(v) for v in out["image_grid_thw"][0])
    m, p, tp = processor.merge_size, processor.patch_size, processor.temporal_patch_size
    # undo the processor's patch flattening: (t gh gw, C tp p p) -> (C, gh p, gw p)
    patches = out["pixel_values"].reshape(t, gh // m, gw // m, m, m, 3, tp, p, p)
    image = patches.transpose(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * tp, 3, gh * p, gw * p)[0]
    assert image.shape[1] % 28 == 0 and image.shape[2] % 28 == 0 and image.shape[1:] != size[::-1]
    assert_lands(unnormalised(image, processor), box, size, "orig")


@SHAPES
def test_llava_next_anyres_global_view_is_the_whole_image_and_llavas_anyres_is_refused(size, box):
    from transformers import LlavaNextImageProcessor

    processor = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert processor_frame(processor) == "orig"
    views = processor(drawn(size, box), return_tensors="np")["pixel_values"][0]
    assert_lands(unnormalised(views[0], processor), box, size, "orig")  # the global view; the tiles are unpadded
    with pytest.raises(ValueError, match="anyres"):
        frame_of(LlavaConfig("anyres"), clip())
    assert "train and predict with 'pad' or 'square'" in ANYRES_REFUSED


def test_crop_frame_repeats_the_processors_rounding_and_names_its_sizes():
    # 640 x 426 at 336: resized to int(336 * 640 / 426) = 504 x 336, cropped at (504 - 336) // 2 = 84
    assert frame_region((640, 426), "crop") == pytest.approx((84 * 640 / 504, 0, 420 * 640 / 504, 426))
    assert frame_region((426, 640), "crop") == pytest.approx((0, 84 * 640 / 504, 426, 420 * 640 / 504))
    assert frame_region((500, 500), "crop") == (0, 0, 500, 500)
    assert [crop_frame(*s) for s in ((336, 336, 336), (224, 224, 224), (256, 224, 200))] == [
        "crop", "crop:224", "crop:256:224x200"]
    assert check_frame("crop:336") == "crop" and check_frame("crop:256:224x200") == "crop:256:224x200"
    for bad in ("square", "crop:0", "crop:336:336", "crop:a", " crop", None):
        with pytest.raises(ValueError, match="frame must be one of"):
            check_frame(bad)
    # 100 x 50 at 40 -> 80 x 40; a 60 x 60 crop cuts 10 px of each side and pads 10 px above and below (transformers'
    # center_crop pads a side smaller than the crop at the same offset): the whole height, inside the frame
    assert frame_region((100, 50), "crop:40:60x60") == pytest.approx((12.5, 0, 87.5, 50))
    assert np.allclose(points_to_frame([[12.5, 0], [87.5, 50]], (100, 50), "crop:40:60x60"), [[0, 10 / 60], [1, 50 / 60]])
    px = np.array([[10.0, 20.0], [90.0, 45.0]])
    for frame in ("crop", "crop:224", "crop:256:224x200", "crop:40:60x60"):
        assert np.allclose(points_from_frame(points_to_frame(px, (100, 50), frame), (100, 50), frame, clamp=False), px)
    # predictions are clamped to what the model sees: [0, 1] of the crop is the kept square
    assert boxes_from_frame([0, 0, 1, 1], (640, 426), "crop").tolist() == pytest.approx(list(frame_region((640, 426), "crop")))


def test_crop_frame_is_transformers_own_resize_and_crop_arithmetic_for_any_size():
    """For many image sizes (odd, extreme aspect ratios, crops larger than the resized side), the crop frame's kept
    region is exactly what get_resize_output_image_size and center_crop compute, in original pixels."""
    from transformers.image_transforms import get_resize_output_image_size

    rng = np.random.default_rng(0)
    sizes = [(640, 426), (426, 640), (333, 333), (1, 700), (700, 1), (337, 336)] + [tuple(rng.integers(1, 3000, 2)) for _ in range(60)]
    for e, cw, ch in ((336, 336, 336), (224, 224, 224), (256, 224, 200), (40, 60, 30)):
        frame = crop_frame(e, cw, ch)
        for w, h in sizes:
            rh, rw = get_resize_output_image_size(np.zeros((h, w, 3), dtype=np.uint8), size=e, default_to_square=False,
                                                  input_data_format="channels_last")
            left, top = (rw - cw) // 2, (rh - ch) // 2  # center_crop's offsets (negative: it pads)
            want = (max(0, left) * w / rw, max(0, top) * h / rh, min(rw, left + cw) * w / rw, min(rh, top + ch) * h / rh)
            assert frame_region((w, h), frame) == pytest.approx(want, rel=1e-12, abs=1e-9), (frame, w, h)
            corners = points_to_frame([[want[0], want[1]], [want[2], want[3]]], (w, h), frame)
            assert np.allclose(corners * [cw, ch], [[max(0, -left), max(0, -top)], [min(cw, rw - left), min(ch, rh - top)]])


def test_processors_whose_output_no_frame_describes_are_refused():
    from transformers import CLIPImageProcessor, LlavaImageProcessor, SiglipImageProcessor

    assert processor_frame(SiglipImageProcessor()) == "orig"  # stretched to 384 x 384: the whole image
    assert processor_frame(CLIPImageProcessor(do_center_crop=False)) == "orig"
    with pytest.raises(ValueError, match="cuts the padded square"):
        processor_frame(LlavaImageProcessor(do_pad=True, size={"shortest_edge": 256}, crop_size=224))
    with pytest.raises(ValueError, match="cuts the padded square"):
        llava_frame("pad", clip(256, 224))
    with pytest.raises(ValueError, match="without a resize"):
        processor_frame(CLIPImageProcessor(do_resize=False))
    with pytest.raises(ValueError, match="not an image processor"):
        processor_frame(object())
    with pytest.raises(ValueError, match="has none"):
        llava_frame("square", None)
    assert llava_frame(None, clip()) == "crop" and llava_frame("pad", clip(224, 224)) == "pad"


# -- converters: clipped across the edge, skipped (and counted) wholly outside ----------------------------------------

def test_convert_crop_clips_shapes_across_the_edge_and_skips_records_with_a_shape_outside(tmp_path):
    from convert_cases import COCO, run_cli
    from data_converters.base import OUTSIDE_CROP
    from llava_getok.records import decode_record

    out = tmp_path / "rec.jsonl"
    argv = ["coco", "--input", COCO, "--task", "rec", "--limit", 60, "--on-error", "skip"]
    assert run_cli(argv + ["--frame", "crop", "--output", out])[0] == 0
    assert run_cli(argv + ["--frame", "orig", "--output", tmp_path / "orig.jsonl"])[0] == 0
    crop = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    whole = {r["id"]: r for r in map(json.loads, (tmp_path / "orig.jsonl").read_text().splitlines())}
    rejects = [json.loads(x) for x in (tmp_path / "rec.rejects.jsonl").read_text().splitlines()]
    outside = [r for r in rejects if r["reason"] == OUTSIDE_CROP]
    summary = json.loads((tmp_path / "rec.summary.json").read_text())
    assert outside and summary["skipped_by_reason"][OUTSIDE_CROP] == len(outside) == len(whole) - len(crop)
    assert all(r["field"] == "bbox" and "lies outside the crop" in r["message"] and not r.get("error") for r in outside)
    clipped = 0
    for rid, r in crop.items():
        g = r["getok"]
        x0, y0, x1, y1 = frame_region(g["size"], "crop")
        (a, b), (c, d) = g["shapes"][0]["points"]
        (wa, wb), (wc, wd) = whole[rid]["getok"]["shapes"][0]["points"]
        assert g["frame"] == "crop" and x0 - 1e-3 <= a < c <= x1 + 1e-3 and y0 - 1e-3 <= b < d <= y1 + 1e-3
        assert [a, b, c, d] == pytest.approx([max(wa, x0), max(wb, y0), min(wc, x1), min(wd, y1)], abs=1e-3)
        clipped += [a, b, c, d] != [wa, wb, wc, wd]
        side = x1 - x0  # the crop's side in original pixels: the lattice's unit
        got = np.asarray(decode_record(r)["shapes"][0]["points"]).ravel()
        assert (np.abs(got - [a, b, c, d]) <= CFG.max_error * side + 2e-3).all(), rid
    assert clipped  # the fixture holds boxes across the crop's edge


def test_a_sample_in_a_crop_keeps_its_mask_and_points_inside():
    from data_converters.base import Sample
    from data_converters.inputs import Filtered

    size = (640, 426)
    x0, _, x1, _ = frame_region(size, "crop")  # 106.7 .. 533.3
    across = [[50.0, 100.0, 200.0, 100.0, 200.0, 200.0, 50.0, 200.0]]  # a square polygon across the left edge
    s = Sample(id="s", image="i.jpg", size=size, polygons=across, points=((150, 150),)).validated(size).in_view("crop")
    mask = s.mask_rle()
    from llava_getok.records import rle_to_mask

    cols = np.nonzero(rle_to_mask(mask).any(0))[0]
    assert s.polygons is None and cols.min() == 107 and cols.max() == 199  # pixel centres inside 106.7 .. 533.3
    for bad, field in (({"points": ((600, 100),)}, "point"),
                       ({"polygons": [[0.0, 0.0, 100.0, 0.0, 100.0, 100.0]]}, "segmentation"),
                       ({"boxes": ((0, 0, 50, 50),), "expression": "x"}, "bbox")):
        with pytest.raises(Filtered, match="outside the crop") as e:
            Sample(id="s", image="i.jpg", size=size, **bad).validated(size).in_view("crop")
        assert e.value.field == field
    same = Sample(id="s", image="i.jpg", size=size, boxes=((0, 0, 50, 50),)).validated(size)
    assert same.in_view("pad") is same and same.in_view("orig") is same


# -- eval: the ground truth as the model sees it ----------------------------------------------------------------------

def test_eval_scores_the_clipped_truth_and_counts_targets_outside_the_crop_apart(tmp_path):
    from llava_getok.codec import Shape
    from llava_getok.eval import cli as eval_cli
    from llava_getok.eval.metrics import OUTSIDE, score_record
    from llava_getok.records import prediction_line

    size, cfg = (640, 426), CFG
    x0, _, x1, _ = frame_region(size, "crop")

    def record(rid, box):
        answer = gt.encode_box(np.clip(boxes_to_frame(box, size, "crop"), 0, 1), cfg)
        return {"id": rid, "image": "i.jpg", "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                                                               {"from": "gpt", "value": answer}],
                "getok": {"source": "coco", "task": "rec", "split": "val", "frame": "crop", "size": list(size),
                          "config": cfg.to_dict(), "shapes": [{"kind": "box", "points": [box[:2], box[2:]]}]}}

    # written by another tool: the truth runs past the crop, or lies wholly beside it
    across, beside = record("across", [20, 0, x0 + 0.25 * (x1 - x0), 426]), record("beside", [0, 0, 100, 426])
    quarter = [Shape("box", ((0.0, 0.0), (0.25, 1.0)))]  # the crop's left quarter, the whole height
    pred = prediction_line("across", "", quarter, [], size, "crop")
    assert np.allclose(pred["shapes"][0]["points"], [[x0, 0], [x0 + 0.25 * (x1 - x0), 426]], atol=1e-3)
    # against the truth as the model sees it (against the whole box, 20 px from the image's edge, it would be 0.38)
    assert score_record(across, pred).iou == pytest.approx(1.0, abs=1e-4)
    s = score_record(beside, prediction_line("beside", "", quarter, [], size, "crop"))
    assert (s.status, s.reason) == ("outside", OUTSIDE)
    ann, preds = tmp_path / "ann.json", tmp_path / "preds.jsonl"
    ann.write_text(json.dumps([across, beside]))
    preds.write_text(json.dumps(pred) + "\n")
    assert eval_cli.main(["--predictions", str(preds), "--annotations", str(ann), "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "preds.metrics.json").read_text())
    row, ceiling = result["metrics"]["rec"]["coco/val"], result["ceiling"]["rec"]["coco/val"]
    assert (row["n"], row["outside"], row["missing"], row["acc@0.5"]) == (1, 1, 0, 1.0) and ceiling["acc@0.5"] == 1.0
    md = (tmp_path / "preds.metrics.md").read_text()
    assert "| skipped | outside |" in md and "| coco/val | 1 | 100.0 |" in md and "outside: 1 record(s)" in md


# -- training, check-data and predict refuse records of another frame ------------------------------------------------

def test_training_and_check_data_refuse_records_of_another_frame_than_the_model_sees(tiny_llava_dir, shared_data,
                                                                                    tmp_path, capsys):
    from transformers import AutoTokenizer

    from llava_getok.llava import check
    from llava_getok.llava.prepare import check_data_frame
    from llava_getok.training.settings import FormatError
    from llava_getok.llava.tiny import make_grounding_data, supervised_data_module

    gt.register()  # LLaVA's code on this stack (compat fixes), as training and check-data run it
    from llava.model import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava_dir)
    model.get_model().get_vision_tower().load_model()
    assert model.config.image_aspect_ratio == "pad" and frame_of(model) == "pad"
    data = make_grounding_data(tmp_path, shared_data / "coco_mini", GETokConfig(grid=8), n_records=2)  # pad frame
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir, use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    dataset = supervised_data_module(tokenizer, model, data)["train_dataset"]
    check_data_frame(model, dataset)
    model.config.image_aspect_ratio = "square"  # LLaVA's default: the tiny tower's CLIP crops 32 of 32
    assert frame_of(model) == "crop:32"
    with pytest.raises(FormatError, match=r"records are in frame\(s\) \['pad'\], but the model sees frame 'crop:32'"):
        check_data_frame(model, dataset)
    model.config.image_aspect_ratio = "anyres"
    with pytest.raises(FormatError, match="anyres"):
        check_data_frame(model, dataset)
    # check-data reads the frame off the model folder (config.json: image_aspect_ratio pad, its tower's processor)
    assert check.main([str(data), "--model-path", str(tiny_llava_dir), "--grid", "8"]) == 0
    capsys.readouterr()
    assert check.main([str(data), "--model-path", str(tiny_llava_dir), "--grid", "8", "--image-aspect-ratio",
                       "square"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"{data}: records are in frame(s) ['pad'], but the model sees frame 'crop:32' (read off its "
                       f"image processor: llava_getok.frames); convert the data with --frame crop:32")

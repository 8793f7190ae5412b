"""Qwen2.5-VL's own box format (formats.Qwen25Format): its prompt and JSON answers in pixels of the smart_resized image,
converted and scored in that frame. Answers written as Qwen writes them score the ceiling; the same answers in original
pixels (the common harness bug) do not."""
from __future__ import annotations

import functools
import json
import sys

import numpy as np
import pytest
from PIL import Image

from llava_getok import formats
from llava_getok.formats import Qwen25Format
from llava_getok.records import decode_record, parse_answer

from convert_cases import COCO, IMAGES, run_cli

PIXELS = {"min_pixels": 128 * 28 * 28, "max_pixels": 256 * 28 * 28}  # not Qwen2.5-VL-7B-Instruct's 3136 / 12845056


@functools.lru_cache(maxsize=None)
def resized_by_the_processor(image_path, **pixels) -> tuple[int, int]:
    """(W', H') of the image as transformers' Qwen2VLImageProcessor feeds it to the model (its image_grid_thw)."""
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(**pixels)
    with Image.open(image_path) as im:
        _, gh, gw = (int(v) for v in processor(im.convert("RGB"), return_tensors="np")["image_grid_thw"][0])
    return gw * processor.patch_size, gh * processor.patch_size


def qwen_answer(boxes, label) -> str:
    """An answer as Qwen2.5-VL writes one: some words, a ```json fence, a list of tab-indented labelled boxes."""
    rows = ",\n".join("\t" + json.dumps({"bbox_2d": [int(round(v)) for v in b], "label": label}) for b in boxes)
    return f"Here is the location.\n```json\n[\n{rows}\n]\n```"


def test_parse_reads_bbox_2d_in_fences_lists_objects_free_text_and_cut_short():
    fmt = Qwen25Format(**PIXELS).for_image((640, 480))
    assert fmt.resized == (504, 364)  # smart_resize(480, 640, 28, 100352, 200704): (364, 504)
    w, h = fmt.resized
    fenced = '```json\n[\n\t{"bbox_2d": [39, 31, 196, 154], "label": "cat"},\n\t{"bbox_2d": [0, 0, 504, 364], "label": "x"}\n]\n```'
    r = formats.parse("Sure.\n" + fenced + "\nDone.", fmt)
    assert r.errors == [] and [s.box for s in r.shapes] == [
        pytest.approx((39 / w, 31 / h, 196 / w, 154 / h)), (0.0, 0.0, 1.0, 1.0)]
    assert formats.parse('{"bbox_2d": [196, 154, 39, 31]}', fmt).shapes[0].box == pytest.approx((39 / w, 31 / h, 196 / w, 154 / h))
    cut = formats.parse('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6', fmt)  # max_new_tokens ran out
    assert len(cut.shapes) == 1 and cut.errors == []
    bad = formats.parse('{"bbox_2d": [1, 2, 3]} {"bbox_2d": [10, 20, 640, 480]} {"bbox_2d": ["1", 2, 3, 4]}', fmt)
    assert bad.shapes == [] and len(bad.errors) == 3 and "image Qwen2.5-VL saw" in bad.errors[1].message
    assert formats.parse("There is no such object in the image.", fmt).shapes == []
    unbound = formats.parse(fenced, Qwen25Format(**PIXELS))
    assert unbound.shapes == [] and "bind the image" in unbound.errors[0].message
    assert formats.render(r.shapes, fmt) == fenced.replace(', "label": "cat"', "").replace(', "label": "x"', "")
    with pytest.raises(ValueError, match="boxes only"):
        formats.encode_point((0.5, 0.5), fmt)
    assert formats.format_from_dict(fmt.to_dict()) == Qwen25Format(**PIXELS) and fmt.tokens() == ()


def test_qwen_answers_score_the_ceiling_and_answers_in_original_pixels_do_not(tmp_path):
    data = tmp_path / "rec.jsonl"
    rc, err = run_cli(["coco", "--input", COCO, "--image-root", IMAGES, "--task", "rec", "--limit", 120, "--on-error", "skip", "--format", "qwen25",
                       "--min-pixels", PIXELS["min_pixels"], "--max-pixels", PIXELS["max_pixels"], "--output", data])
    assert rc == 0, err
    records = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(records) > 10
    fmt = Qwen25Format(**PIXELS)
    right, original, default_pixels = [], [], []
    for r in records:
        g = r["getok"]
        assert g["frame"] == "orig" and g["format"] == {"name": "qwen25", **PIXELS, "patch_size": 14, "merge_size": 2}
        assert r["conversations"][0]["value"] == f"<image>\nLocate {g['expression']}, output its bbox coordinates using JSON format."
        (x1, y1), (x2, y2) = g["shapes"][0]["points"]
        w, h = g["size"]
        rw, rh = resized_by_the_processor(IMAGES / r["image"], **PIXELS)
        assert formats.for_image(fmt, (w, h)).resized == (rw, rh)  # the converter's smart_resize is the processor's
        scale = np.array([rw / w, rh / h, rw / w, rh / h])
        right.append({"id": r["id"], "text": qwen_answer([np.array([x1, y1, x2, y2]) * scale], g["expression"])})
        original.append({"id": r["id"], "text": qwen_answer([[x1, y1, x2, y2]], g["expression"])})
        # run at Qwen2.5-VL-7B-Instruct's own min / max pixels, not the data's
        dw, dh = resized_by_the_processor(IMAGES / r["image"], min_pixels=3136, max_pixels=12845056)
        default_pixels.append({"id": r["id"], "text": qwen_answer([np.array([x1, y1, x2, y2]) * [dw / w, dh / h, dw / w, dh / h]],
                                                                  g["expression"])})
    # the converted answer is what Qwen writes, up to the words around it
    assert parse_answer(records[0], right[0]["text"])["shapes"] == decode_record(records[0])["shapes"]
    scores = {}
    for name, answers in (("right", right), ("original", original), ("default_pixels", default_pixels)):
        preds = tmp_path / f"{name}.jsonl"
        preds.write_text("".join(json.dumps(a) + "\n" for a in answers))
        assert run_cli_eval(preds, data, tmp_path) == 0
        result = json.loads((tmp_path / f"{name}.metrics.json").read_text())
        scores[name] = (result["metrics"]["rec"]["coco/val"], result["ceiling"]["rec"]["coco/val"])
    row, ceiling = scores["right"]
    assert row["unparseable"] == 0 and all(row[k] == ceiling[k] for k in ("acc@0.5", "acc@0.8", "miou"))
    assert ceiling["acc@0.8"] == 1.0 and ceiling["miou"] > 0.9  # integer pixels of a ~450 x 340 image
    for wrong in ("original", "default_pixels"):
        bad, _ = scores[wrong]
        assert bad["miou"] < ceiling["miou"] - 0.2 and bad["acc@0.8"] < 0.5, (wrong, bad)
    table = (tmp_path / "right.metrics.md").read_text()
    assert f"qwen25, JSON pixels of smart_resize (min_pixels {PIXELS['min_pixels']}, max_pixels {PIXELS['max_pixels']})" in table


def run_cli_eval(preds, annotations, out) -> int:
    from llava_getok.eval import cli as eval_cli

    return eval_cli.main(["--predictions", str(preds), "--annotations", str(annotations), "--output-dir", str(out)])


def test_convert_refuses_what_qwens_format_does_not_write(tmp_path, capsys):
    from data_converters.cli import main

    def refused(*args) -> str:
        with pytest.raises(SystemExit) as stop:  # as argparse stops on bad arguments: status 2
            main([str(a) for a in ["coco", "--input", COCO, "--format", "qwen25", "--output", tmp_path / "x.json", *args]])
        assert stop.value.code == 2
        return capsys.readouterr().err

    for args in (["--task", "reg"], ["--frame", "pad"], ["--task", "point"]):  # the arguments are fine: one line
        err = refused(*args)
        assert err.count("\n") == 1 and "--format qwen25 writes Qwen2.5-VL's answers to rec and det questions" in err
    assert "max_pixels must be an integer in [10," in refused("--min-pixels", 10, "--max-pixels", 5)


def test_llava_training_refuses_qwen25_data_in_one_line(tiny_llava_dir, shared_data, tmp_path):
    """The settings take qwen25 as the data's format (the transformers-native backend trains it); LLaVA's training,
    which never sees Qwen's smart_resized pixels, refuses it in one line before any step."""
    import shutil

    from llava_getok import train
    from llava_getok.formats import format_to_dict
    from llava_getok.training.settings import GETokSettings

    fmt = Qwen25Format(**PIXELS)
    assert GETokSettings().location_format([fmt]) == fmt
    image = sorted((shared_data / "coco_mini" / "val2017").glob("*.jpg"))[0]
    (tmp_path / "images").mkdir()
    shutil.copy(image, tmp_path / "images" / image.name)
    record = {"id": "q1", "image": image.name, "conversations": [
        {"from": "human", "value": "<image>\nLocate the dog, output its bbox coordinates using JSON format."},
        {"from": "gpt", "value": '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "dog"}]\n```'}],
        "getok": {"task": "rec", "frame": "orig", "size": [640, 480], "format": format_to_dict(fmt),
                  "shapes": [{"kind": "box", "points": [[10, 20], [30, 40]]}]}}
    (tmp_path / "q.json").write_text(json.dumps([record]))
    argv = ["--model_name_or_path", str(tiny_llava_dir), "--version", "getok_v1", "--data_path", str(tmp_path / "q.json"),
            "--image_folder", str(tmp_path / "images"), "--vision_tower", str(tiny_llava_dir / "vision_tower"),
            "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none", "--use_cpu", "True"]
    saved = sys.argv
    try:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
    finally:
        sys.argv = saved
    message = str(e.value)
    assert "\n" not in message and "the training data is in qwen25" in message and "LLaVA does not train on" in message

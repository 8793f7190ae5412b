"""Images wherever a model reads one: one loader (llava_getok.images) for predict, chat, web, the worker, GRPO, LLaVA's
training dataset and the converters. Bad files are one line naming the record and the file; every PIL mode becomes
8-bit RGB; EXIF-rotated photos are seen upright, their sizes and shapes in upright pixels everywhere."""
import json

import numpy as np
import pytest
from PIL import Image

from llava_getok.images import ImageError, load_image, upright_size

COCO = "000000183709.jpg"  # 480 x 640


def exif_rotated(path, orientation=6, size=(60, 30)):
    """A landscape picture stored as it left the sensor, with an EXIF orientation: a red block on its stored left."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 3] = (255, 0, 0)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, shared_data):
    """Good images of every awkward kind and bad files, as users have them."""
    d = tmp_path_factory.mktemp("images")
    src = shared_data / "coco_mini" / "val2017" / COCO
    (d / "good.jpg").write_bytes(src.read_bytes())
    png = d / "full.png"
    Image.open(src).save(png)
    (d / "truncated.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (d / "not_an_image.png").write_bytes(b"this is a text file with an image's name\n")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "one_pixel.png")
    Image.open(src).convert("CMYK").save(d / "cmyk.jpg")
    grey = (np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(grey).save(d / "grey16.png")
    Image.open(src).convert("P").save(d / "palette.png", transparency=0)
    Image.open(src).convert("RGBA").save(d / "rgba.png")
    exif_rotated(d / "rotated.jpg")
    return d


def test_every_mode_becomes_8_bit_rgb_and_16_bit_grey_is_scaled_not_clipped(image_dir):
    for name in ("good.jpg", "cmyk.jpg", "grey16.png", "palette.png", "rgba.png", "rotated.jpg"):
        im = load_image(image_dir / name)
        assert im.mode == "RGB" and min(im.size) >= 4, name
    grey = np.asarray(load_image(image_dir / "grey16.png"))[..., 0]
    assert grey.max() > 200 and len(np.unique(grey)) > 100  # PIL's own convert("RGB") clips 16 bits at 255: white
    assert load_image((image_dir / "good.jpg").read_bytes()).size == (480, 640)  # bytes, as an upload or the worker


def test_exif_rotated_images_are_seen_upright_with_upright_sizes(image_dir):
    im = load_image(image_dir / "rotated.jpg")  # stored 60 x 30, orientation 6: shown turned a quarter clockwise
    assert im.size == (30, 60) == upright_size(image_dir / "rotated.jpg")
    a = np.asarray(im)
    assert a[2, 15, 0] > 200 and a[57, 15, 0] < 60  # the stored left third is the top of the upright picture


@pytest.mark.parametrize("name, words", [
    ("truncated.png", "cannot decode the image (image file is truncated"),
    ("not_an_image.png", "not an image file"),
    ("one_pixel.png", "the image is 1 x 1 pixels; the model needs at least 4 x 4"),
])
def test_bad_images_are_one_line_naming_the_file(image_dir, name, words):
    with pytest.raises(ImageError) as e:
        load_image(image_dir / name)
    assert str(e.value).startswith(str(image_dir / name)) and words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        load_image(image_dir / "missing.png")


def records_for(image_dir, names):
    from llava_getok.vocab import GETokConfig

    cfg = GETokConfig(grid=8).to_dict()
    out = []
    for k, name in enumerate(names):
        try:
            size = list(upright_size(image_dir / name))
        except (ImageError, FileNotFoundError):
            size = [10, 10]
        out.append({"id": f"r{k}-{name}", "image": name,
                    "conversations": [{"from": "human", "value": "<image>\nWhere is the thing?"},
                                      {"from": "gpt", "value": ""}],
                    "getok": {"task": "rec", "frame": "pad", "size": size, "config": cfg, "shapes": []}})
    return out


GOOD = ["good.jpg", "cmyk.jpg", "grey16.png", "palette.png", "rgba.png", "rotated.jpg"]
BAD = {"truncated.png": "image file is truncated", "not_an_image.png": "not an image file",
       "one_pixel.png": "1 x 1 pixels", "missing.png": "not found"}


def test_predict_stops_in_one_line_or_skips_and_lists_bad_images(tiny_getok_checkpoint, image_dir, tmp_path, capfd):
    """`llava-getok predict` as typed: the default stops at the first bad image in one line naming the record and the
    file (no traceback); --on-error skip predicts the good ones (every mode, the EXIF-rotated photo in upright
    pixels), and counts and lists the bad ones. Nothing else is printed: no load-time notices of the libraries."""
    from llava_getok.cli import main

    names = GOOD[:1] + list(BAD) + GOOD[1:]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records_for(image_dir, names)))
    common = ["predict", "--model-path", str(tiny_getok_checkpoint), "--data", str(data), "--image-root",
              str(image_dir), "--shape-only", "--max-new-tokens", "6", "--batch-size", "4", "--conv-mode", "getok_v1",
              "--device", "cpu"]
    capfd.readouterr()
    assert main(common + ["--output", str(tmp_path / "stop.jsonl")]) == 1
    err = capfd.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("llava-getok predict:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"llava-getok predict: record r1-truncated.png: field 'image': {image_dir / 'truncated.png'}: cannot decode "
        f"the image (image file is truncated"), err
    assert "Traceback" not in err and not (tmp_path / "stop.jsonl").exists()

    out = tmp_path / "skip.jsonl"
    assert main(common + ["--output", str(out), "--on-error", "skip"]) == 0
    err = capfd.readouterr().err
    said = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and not x.startswith("predict:")]
    skipped = [x for x in said if x.startswith("llava-getok predict: skipped record")]
    assert len(skipped) == len(BAD) and all(
        any(f"record r{names.index(n)}-{n}: field 'image': " in x and w in x for x in skipped) for n, w in BAD.items())
    assert said[len(BAD)] == f"llava-getok predict: skipped {len(BAD)} record(s) whose image could not be read"
    assert said[len(BAD) + 1:] == [f"wrote {len(GOOD)} predictions to {out}"], said  # and nothing else
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"].split("-", 1)[1] for x in lines] == GOOD
    for line in lines:
        w, h = upright_size(image_dir / line["id"].split("-", 1)[1])
        (x1, y1), (x2, y2) = line["shapes"][0]["points"]
        assert line["errors"] == [] and 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h, line


def test_converters_give_upright_sizes_and_refuse_sized_records_of_rotated_images(tmp_path, shared_data):
    """convert-datasets agrees with what the model sees: a size read from the header is the upright one, and a
    dataset that states its own sizes for an image stored turned is refused in one counted line (its coordinates may
    be in either orientation)."""
    from data_converters.base import image_size
    from data_converters.cli import main as convert

    root = tmp_path / "images"
    root.mkdir()
    exif_rotated(root / "rotated.jpg", size=(60, 30))
    assert image_size(str(root / "rotated.jpg")) == (30, 60)
    coco = json.loads((shared_data / "coco_mini" / "instances_val2017.json").read_text())
    image = coco["images"][0]
    (root / image["file_name"]).write_bytes((shared_data / "coco_mini" / "val2017" / image["file_name"]).read_bytes())
    rotated = dict(image, id=999_999_999, file_name="rotated.jpg", width=60, height=30)
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"] and not a.get("iscrowd")][:1]
    ann = dict(anns[0], id=888_888_888, image_id=rotated["id"], bbox=[5, 5, 20, 10], area=200,
               segmentation=[[5, 5, 25, 5, 25, 15, 5, 15]])
    sub = dict(coco, images=[image, rotated], annotations=anns + [ann])
    (tmp_path / "coco.json").write_text(json.dumps(sub))
    out = tmp_path / "rec.jsonl"
    assert convert(["coco", "--input", str(tmp_path / "coco.json"), "--image-root", str(root), "--task", "rec",
                    "--output", str(out), "--on-error", "skip", "--no-resume"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records and all(r["image"] == image["file_name"] for r in records)
    rejects = "".join(p.read_text() for p in tmp_path.glob("rec*reject*"))
    assert "EXIF orientation 6" in rejects and "rotated.jpg" in rejects, list(tmp_path.iterdir())


def test_llavas_training_dataset_reads_images_upright(tmp_path, tiny_llava_dir, tiny_tokenizer_dir):
    """After register(), LLaVA's own LazySupervisedDataset gives the pixels predict gives (the upright picture)."""
    import torch

    import llava_getok as gt
    from llava_getok.llava.inputs import image_tensor
    from llava_getok.llava.tiny import supervised_data_module

    gt.register()
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_llava_dir), None, "tiny-llava", device="cpu")
    (tmp_path / "images").mkdir()
    exif_rotated(tmp_path / "images" / "rotated.jpg", size=(64, 32))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "x", "image": "rotated.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "there"}]}]))
    from llava import conversation

    default = conversation.default_conversation
    try:
        item = supervised_data_module(tokenizer, model, data)["train_dataset"][0]
    finally:
        conversation.default_conversation = default
    expected = image_tensor(tmp_path / "images" / "rotated.jpg", processor, model.config)
    assert torch.equal(item["image"], expected)
    stored = image_tensor(Image.open(tmp_path / "images" / "rotated.jpg").convert("RGB"), processor, model.config)
    assert not torch.equal(item["image"], stored)  # the stored (sideways) pixels would differ

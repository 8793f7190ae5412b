"""The procedural `shapes` source: deterministic scenes, expressions that resolve, a real on-disk layout that
convert-datasets reads like any other source."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_converters import shapes
from data_converters.shapes import COLORS, RELATIONS, describe, make_scene, scene_rng


def _resolve(expr, objs):
    """An independent reading of an expression: the indices of the shapes it can mean."""
    def words_match(o, words):
        ok = True
        for w in words:
            if w in shapes.KINDS:
                ok &= o.kind == w
            elif w in COLORS:
                ok &= o.color == w
            elif w in shapes.SIZES:
                ok &= o.size == w
            else:
                assert w == "shape", w
        return ok

    def phrase(p):
        assert p.startswith("the "), p
        return p[4:].split()

    for rel, test in RELATIONS.items():
        key = f" {rel} "
        if key in expr:
            head, anchor = expr.split(key)
            anchors = [a for a in objs if words_match(a, phrase(anchor))]
            assert len(anchors) == 1, f"anchor of {expr!r} is ambiguous"
            return [k for k, o in enumerate(objs) if o is not anchors[0] and words_match(o, phrase(head))
                    and test(o.center, anchors[0].center)]
    return [k for k, o in enumerate(objs) if words_match(o, phrase(expr))]


def test_scenes_are_deterministic_and_independent_of_order():
    a_img, a = make_scene(scene_rng(3, "train", 7))
    make_scene(scene_rng(3, "train", 6))  # drawing another scene first changes nothing
    b_img, b = make_scene(scene_rng(3, "train", 7))
    assert np.array_equal(a_img, b_img) and [o.box for o in a] == [o.box for o in b]
    c_img, _ = make_scene(scene_rng(4, "train", 7))
    assert not np.array_equal(a_img, c_img)


def test_masks_boxes_points_agree_with_the_pixels():
    for k in range(30):
        img, objs = make_scene(scene_rng(0, "val", k), image_size=48, n_objects=(1, 4))
        assert 1 <= len(objs) <= 4
        owned = np.zeros(img.shape[:2], int)
        for o in objs:
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert (img[o.mask] == COLORS[o.color]).all()  # every mask pixel has the shape's colour
            px, py = o.point()
            assert o.mask[int(py), int(px)]
            owned += o.mask
        assert owned.max() <= 1  # shapes never overlap
        background = owned == 0
        assert (img[background] == shapes.BACKGROUND).all()


def test_every_expression_resolves_to_its_target_alone():
    n_rel = n = 0
    for k in range(300):
        rng = scene_rng(1, "train", k)
        _, objs = make_scene(rng, n_objects=(2, 5))
        for t in range(len(objs)):
            expr = describe(objs, t, rng, p_relation=0.5)
            if expr is None:
                continue
            n += 1
            n_rel += any(f" {r} " in expr for r in RELATIONS)
            assert _resolve(expr, objs) == [t], (expr, [(o.kind, o.color, o.size, o.center) for o in objs])
    assert n > 500 and 0.2 < n_rel / n < 0.8  # both kinds of expression occur


def test_written_dataset_converts_like_any_source(tmp_path):
    from data_converters.cli import main as convert

    ann = shapes.generate(tmp_path / "shp", {"train": 6, "val": 3}, seed=5, image_size=40)
    lines = [json.loads(x) for x in ann.read_text().splitlines()]
    assert len(lines) == 9 and {r["split"] for r in lines} == {"train", "val"}
    first = lines[0]
    im = Image.open(tmp_path / "shp" / first["image"])
    assert im.size == (40, 40)
    from pycocotools import mask as mask_utils

    m = mask_utils.decode({"size": first["mask"]["size"], "counts": first["mask"]["counts"].encode()})
    ys, xs = np.nonzero(m)
    assert first["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # the same seed writes the same bytes, drawn by one process or several
    again = shapes.generate(tmp_path / "again", {"train": 6, "val": 3}, seed=5, image_size=40, workers=2)
    assert again.read_text() == ann.read_text()
    for r in lines:
        assert (tmp_path / "again" / r["image"]).read_bytes() == (tmp_path / "shp" / r["image"]).read_bytes()

    out = tmp_path / "rec.json"
    rc = convert(["shapes", "--input", str(tmp_path / "shp"), "--image-root", str(tmp_path / "shp"),
                  "--output", str(out), "--grid", "8", "--split", "val"])
    assert rc == 0
    recs = json.loads(out.read_text())
    assert len(recs) == 3 and all(r["getok"]["split"] == "val" for r in recs)
    r = recs[0]
    src = next(x for x in lines if r["id"].startswith(x["id"]))
    assert src["expression"] in r["conversations"][0]["value"]
    assert r["getok"]["shapes"][0]["points"] == [src["box"][:2], src["box"][2:]]
    assert r["conversations"][1]["value"].startswith("<box><grid_")


def test_bad_record_names_file_line_and_field(tmp_path):
    from data_converters.base import ConvertError, Options

    bad = tmp_path / "annotations.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "a.png", "split": "train", "width": 8, "height": 8,
                               "expression": "the red circle", "box": [1, 2, 3], "point": [1, 1],
                               "mask": {"size": [8, 8], "counts": "08"}}) + "\n")
    (where, raw), = list(shapes.read(Options(input=tmp_path)))
    with pytest.raises(ConvertError, match=r"annotations.jsonl:1.*'box'.*4 numbers"):
        shapes.parse(raw, where, Options(input=tmp_path))


def test_group_turns_makes_one_conversation_per_image_that_llava_preprocesses(tmp_path, tiny_tokenizer_dir):
    """--group-turns K: the expressions of one image as one multi-turn conversation (LLaVA-1.5's own REC
    layout); every answer survives LLaVA's preprocessing unmasked; eval refuses grouped records."""
    from data_converters.cli import main as convert
    from llava_getok.records import RecordsError, decode_record, read_records

    shapes.generate(tmp_path / "shp", {"train": 5}, seed=2, image_size=40, n_objects=(3, 3), refs_per_image=3)
    args = ["shapes", "--input", str(tmp_path / "shp"), "--image-root", str(tmp_path / "shp"), "--grid", "8"]
    assert convert(args + ["--output", str(tmp_path / "one.json")]) == 0
    assert convert(args + ["--output", str(tmp_path / "grouped.json"), "--group-turns", "3"]) == 0
    single, grouped = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "grouped.json").read_text())
    n_turns = [len(r["getok"]["turns"]) if "turns" in r["getok"] else 1 for r in grouped]
    assert len(grouped) == 5 and len(single) == sum(n_turns) > 10 and max(n_turns) == 3
    summary = json.loads((tmp_path / "grouped.summary.json").read_text())
    assert summary["written"] == len(single) and summary["output_records"] == len(grouped)
    at = 0
    for r, n in zip(grouped, n_turns):
        parts = single[at:at + n]
        at += n
        if n == 1:  # an image with one expression keeps the plain record
            assert r == parts[0]
            continue
        turns = r["getok"]["turns"]
        assert {p["image"] for p in parts} == {r["image"]} and r["id"] == f"{parts[0]['id']}+{len(parts) - 1}"
        assert [t["id"] for t in turns] == [p["id"] for p in parts]
        assert [t["expression"] for t in turns] == [p["getok"]["expression"] for p in parts]
        assert sum("<image>" in t["value"] for t in r["conversations"]) == 1
        assert [t["value"] for t in r["conversations"][1::2]] == [p["conversations"][1]["value"] for p in parts]
        assert decode_record(r)["shapes"] == [s for p in parts for s in decode_record(p)["shapes"]]

    import llava_getok as gt
    from transformers import AutoTokenizer

    from llava_getok.llava.check import check_records
    from llava_getok.training.tokens import add_getok_tokens
    from llava_getok.vocab import GETokConfig

    gt.register()
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, use_fast=False)
    add_getok_tokens(tok, GETokConfig(grid=8))
    for version in ("getok_v1", "getok_mistral_instruct"):
        report = check_records(grouped, tok, version=version, limit=-1, source="grouped")
        assert report.problems == [] and report.checked == len(grouped), (version, report.problems[:2])
        assert report.getok_tokens == 6 * len(single)
    with pytest.raises(RecordsError, match=r"groups \d questions.*--group-turns 1"):
        read_records(tmp_path / "grouped.json", one_question=True)


def test_attribute_only_split_names_targets_by_those_attributes_alone(tmp_path):
    """generate(attributes={split: ("color",)}): that split's expressions are "the <colour> shape", each
    resolving to its target alone; the other splits keep the full mix (the demo's colour-first stage)."""
    ann = shapes.generate(tmp_path / "shp", {"colour": 40, "train": 40}, seed=3, image_size=48, refs_per_image=3,
                          attributes={"colour": ("color",)})
    lines = [json.loads(x) for x in ann.read_text().splitlines()]
    colour = [r for r in lines if r["split"] == "colour"]
    assert {r["image"] for r in colour} >= {f"images/colour/colour-{k:06d}.png" for k in range(40)}
    for r in colour:
        assert r["expression"] == f"the {r['target']['color']} shape"
    rest = {r["expression"] for r in lines if r["split"] == "train"}
    assert any(" of " in e or "above" in e or "below" in e for e in rest)  # relations still there
    assert any(e.split()[-1] in shapes.KINDS for e in rest)
    assert json.loads((tmp_path / "shp" / "shapes.json").read_text())["attributes"] == {"colour": ["color"]}
    for k in range(60):  # and in memory: never an expression when the colour is shared
        rng = scene_rng(4, "x", k)
        _, objs = make_scene(rng, n_objects=(2, 4))
        for t in range(len(objs)):
            expr = describe(objs, t, rng, attributes=("color",))
            shared = sum(o.color == objs[t].color for o in objs) > 1
            assert (expr is None) == shared and (expr is None or _resolve(expr, objs) == [t])

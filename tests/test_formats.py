"""Location formats (llava_getok.formats): LLaVA-1.5's text boxes and 1D bins beside GETok, end to end on the
numpy side: encode and parse, convert-datasets --format, and eval of raw answers written by hand from the ground
truth (which must score exactly the quantisation ceiling)."""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from llava_getok import formats
from llava_getok.formats import BinsFormat, TextFormat
from llava_getok.grammar import BinsGrammar
from llava_getok.records import decode_record, parse_answer
from llava_getok.vocab import GETokConfig

from convert_cases import COCO, FIXTURES, IMAGES, run_cli

PORTRAIT = "000000183709.jpg"  # 480 x 640: in the pad frame the image starts 80 px from the left


# -- the formats themselves --------------------------------------------------------------------------------------

def test_text_writes_llavas_own_numbers_and_reads_boxes_anywhere_in_free_text():
    t = TextFormat()
    # as Python writes floats rounded to 2 decimals (llava_v1_5_mix665k: "[0.25, 0.6, 0.66, 0.9]", "[0.0, 0.5, 1.0, 1.0]")
    assert t.encode_boxes([(0.254, 0.6, 0.655, 0.9)]) == ["[0.25, 0.6, 0.66, 0.9]"]
    assert t.encode_boxes([(0.0, 0.5, 1.0, 1.0)]) == ["[0.0, 0.5, 1.0, 1.0]"]
    assert formats.encode_point((0.5, 0.123), t) == "[0.5, 0.12]" and TextFormat(3).number(0.1234) == "0.123"
    text = "Sure! The man in red is at [0.12, 0.34, 0.56, 0.78], next to [0.5, 0.5]."
    r = t.parse(text)
    assert [(s.kind, s.points) for s in r.shapes] == [("box", ((0.12, 0.34), (0.56, 0.78))), ("point", ((0.5, 0.5),))]
    start = text.index("[0.12")
    assert r.errors == [] and r.shapes[0].span == (start, start + len("[0.12, 0.34, 0.56, 0.78]"))
    # integers are never a location (LLaVA's rule for its own data); corners are sorted; pixels are an error
    assert t.parse("options [0, 0, 0, 1] and [1, 2]").shapes == []
    assert t.parse("[0.5,0.6,0.1,0.2]").shapes[0].points == ((0.1, 0.2), (0.5, 0.6))
    bad = t.parse("the box [120.5, 33.0, 300.2, 400.0]")
    assert bad.shapes == [] and "is not a location in [0, 1]" in bad.errors[0].message
    assert t.parse("[0.1, 0.2, 0.3]").shapes == [] and t.parse("[0.1, 0.2, 0.3, 0.4, 0.5]").shapes == []


def test_bins_quantise_by_floor_decode_to_the_centre_and_group_by_adjacency():
    b = BinsFormat(bins=10)
    assert b.tokens()[:2] == ("<loc_0>", "<loc_1>") and len(b.tokens()) == 10
    # min(floor(x K), K - 1): 0.999 and 1.0 both land in the last bin; decoded to (k + 0.5) / K
    assert b.encode_boxes([(0.0, 0.19, 0.999, 1.0)]) == ["<loc_0><loc_1><loc_9><loc_9>"]
    assert formats.encode_point((0.35, 0.05), b) == "<loc_3><loc_0>"
    r = b.parse("a <loc_3><loc_0> b <loc_0><loc_1><loc_9><loc_9> c")
    assert [(s.kind, s.points) for s in r.shapes] == [("point", ((0.35, 0.05),)), ("box", ((0.05, 0.15), (0.95, 0.95)))]
    # 3 tokens; an index past K; <loc_007> is no token (one spelling per index), so <loc_1> stands alone
    r = b.parse("<loc_1><loc_2><loc_3> <loc_1><loc_10> <loc_007><loc_1>")
    assert r.shapes == [] and [e.message for e in r.errors] == [
        "3 location tokens at 0: a point is 2, a box 4", "a location token at 22 is outside the 10 bins",
        "1 location tokens at 47: a point is 2, a box 4"]
    ids = {100 + k: t for k, t in enumerate(b.tokens())}
    r = b.parse_ids([5, 101, 102, 103, 104, 6, 101, 101], ids)  # strictly by ids, runs of adjacent positions
    assert [s.kind for s in r.shapes] == ["box", "point"] and r.errors == []


@pytest.mark.parametrize("fmt", [TextFormat(), TextFormat(decimals=4), BinsFormat(), BinsFormat(bins=64)], ids=str)
def test_round_trip_error_is_within_the_formats_bound(fmt):
    rng = np.random.default_rng(0)
    boxes = np.sort(rng.random((500, 2, 2)), axis=1).transpose(0, 2, 1).reshape(-1, 4)[:, [0, 2, 1, 3]]
    got = np.array([formats.parse(t, fmt).shapes[0].box for t in formats.encode_boxes(boxes, fmt)])
    assert np.abs(got - boxes).max() <= fmt.max_error + 1e-12
    assert formats.render([formats.parse(t, fmt).shapes[0] for t in formats.encode_boxes(boxes[:3], fmt)], fmt) == \
        " ".join(formats.encode_boxes(boxes[:3], fmt))


def test_parse_never_raises_whatever_the_string():
    rng = random.Random(0)
    alphabet = ["[", "]", ",", " ", ".", "-", "0", "1", "9", "e", "<loc_", ">", "<loc_5>", "１", "nan", "\x00", "é",
                "9" * 5000, "<loc_" + "9" * 5000 + ">", "[0.1, 0.2, 0.3, 0.4]", "<box>", "<grid_1_1>"]
    for fmt in (TextFormat(), BinsFormat(bins=8), GETokConfig(grid=4)):
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            r = formats.parse(text, fmt)
            assert all(0 <= v <= 1 for s in r.shapes for p in s.points for v in p), text


def test_format_dicts_records_and_the_shapes_text_and_bins_cannot_write():
    for fmt in (TextFormat(decimals=3), BinsFormat(bins=64), GETokConfig(grid=8, mode="grid")):
        assert formats.format_from_dict(formats.format_to_dict(fmt)) == fmt
    assert formats.format_from_dict({"grid": 8}) == GETokConfig(grid=8)  # a sidecar from before formats: GETok
    assert formats.record_format({"config": {"grid": 8}}) == GETokConfig(grid=8)
    assert formats.record_format({"format": {"name": "bins", "bins": 5}}) == BinsFormat(5)
    with pytest.raises(ValueError, match="unknown location format 'polar'"):
        formats.format_from_dict({"name": "polar"})
    with pytest.raises(ValueError, match="bins must be an integer"):
        BinsFormat(bins=1)
    mask = formats.Shape("mask", ((0.1, 0.1), (0.2, 0.2)))
    for fmt in (TextFormat(), BinsFormat()):
        with pytest.raises(ValueError, match=f"the {fmt.name} format has no form for a mask"):
            formats.encode_shape(mask, fmt)
    assert formats.same_tokens(GETokConfig(grid=8, mode="refine"), GETokConfig(grid=8))
    assert not formats.same_tokens(BinsFormat(64), BinsFormat(65)) and formats.same_tokens(TextFormat(2), TextFormat(3))


def test_bins_grammar_allows_runs_of_two_or_four_only():
    g = BinsGrammar(BinsFormat(bins=8))
    g.walk(["text", "loc", "loc", "text", "loc", "loc", "loc", "loc", "eos"])  # a point, then a box
    for bad in (["loc", "eos"], ["loc", "loc", "loc", "text"], ["loc"] * 5):
        with pytest.raises(ValueError, match="is not allowed"):
            g.walk(bad)
    point = BinsGrammar(BinsFormat(bins=8), only="point")
    assert g.accepting(g.walk(["loc", "loc"])[-1]) and not point.accepting(point.walk(["loc"])[-1])
    with pytest.raises(ValueError, match="boxes and points only"):
        BinsGrammar(BinsFormat(bins=8), only="mask")


# -- convert-datasets --format -----------------------------------------------------------------------------------

# sha256 of convert-datasets' GETok output at commit 1a6ea61, before location formats existed: the default format's
# output must stay byte for byte what it was.
GETOK_BEFORE_FORMATS = {
    ("coco", "rec.json", "--task", "rec"): "b5a4c4d21d38b4aacd033958983538af50ae4521b7f354fad0c335dfeb095241",
    ("coco", "refine.jsonl", "--task", "refine", "--seed", "3"): "80bad21f878cd41b183470b183dd2651d8d4c9e4ebe84cf6c029436f840dbf6b",
    ("coco", "det.jsonl", "--task", "det", "--frame", "orig", "--grid", "16", "--mode", "grid"):
        "27f4f016eae3db54eabc00f867376b5e2be409d80d0461c49c094f54bd8f19ef",
    ("coco", "point.jsonl", "--task", "point"): "a06df1f27fe2a3982ea99607e349c4ee12680ca8b3e2b9d382411215e68a0837",
    ("coco", "reg.jsonl", "--task", "reg", "--group-turns", "3"): "0f69ffc948698712f982f1f820b27d8af0dcfe9feb1407305774b754882e8bf0",
    ("llava", "llava.jsonl"): "3c14444dc7e80293ee53d8c60f7a7243568d22ddd49abf21b1a8cca0ddaa7efd",
}


@pytest.mark.parametrize("job", list(GETOK_BEFORE_FORMATS), ids=lambda j: j[1])
def test_getok_output_is_byte_identical_to_before_formats(tmp_path, job):
    source, name, *args = job
    out = tmp_path / name
    if source == "llava":
        argv = ["llava", "--input", FIXTURES / "llava_mix.json", "--image-root", IMAGES]
    else:
        argv = ["coco", "--input", COCO, "--limit", 20 if args[1] == "reg" else 40, "--on-error", "skip", *args]
    assert run_cli(argv + ["--output", out])[0] == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == GETOK_BEFORE_FORMATS[job]
    assert run_cli(argv + ["--output", tmp_path / ("x" + name), "--format", "getok"])[0] == 0
    assert (tmp_path / ("x" + name)).read_bytes() == out.read_bytes()


@pytest.mark.parametrize("fmt,args", [(TextFormat(), ["--format", "text"]), (TextFormat(3), ["--format", "text", "--decimals", "3"]),
                                      (BinsFormat(100), ["--format", "bins", "--bins", "100"])], ids=["text", "text3", "bins"])
@pytest.mark.parametrize("frame", ["pad", "orig"])
def test_convert_writes_each_format_and_decodes_within_its_bound(tmp_path, fmt, args, frame):
    out = tmp_path / "rec.json"
    assert run_cli(["coco", "--input", COCO, "--task", "rec", "--limit", 40, "--frame", frame, "--on-error", "skip",
                    "--output", out, *args])[0] == 0
    records = json.loads(out.read_text())
    assert records and all(r["getok"]["format"] == fmt.to_dict() and "config" not in r["getok"] for r in records)
    for r in records:
        answer = r["conversations"][1]["value"]
        assert answer == formats.render(formats.parse(answer, fmt).shapes, fmt)  # exactly the format's writing
        w, h = r["getok"]["size"]
        scale = np.array([max(w, h)] * 2) if frame == "pad" else np.array([w, h])
        got, want = decode_record(r)["shapes"][0]["points"], r["getok"]["shapes"][0]["points"]
        assert (np.abs(np.subtract(got, want)) <= fmt.max_error * scale + 2e-3).all(), (r["id"], got, want)
    if isinstance(fmt, TextFormat):
        assert all(r["conversations"][1]["value"].startswith("[0") for r in records)
    points = tmp_path / "point.json"
    assert run_cli(["coco", "--input", COCO, "--task", "point", "--limit", 5, "--output", points, *args])[0] == 0
    assert all(len(formats.parse(r["conversations"][1]["value"], fmt).shapes[0].points) == 1
               for r in json.loads(points.read_text()))


@pytest.mark.parametrize("args", [["--task", "res"], ["--task", "refine"], ["--task", "rec", "--mode", "refine"]])
@pytest.mark.parametrize("fmt", ["text", "bins"])
def test_masks_and_refinements_in_text_or_bins_are_one_line_errors(tmp_path, fmt, args, capsys):
    from data_converters.cli import main

    with pytest.raises(SystemExit) as stop:  # as argparse stops on bad arguments: status 2
        main([str(a) for a in ["coco", "--input", COCO, "--image-root", IMAGES, "--output", tmp_path / "x.json",
                                "--format", fmt, *args]])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and f"--format {fmt} has no form for" in err
    assert ("masks (task res)" if args[1] == "res" else "refine mode") in err and not (tmp_path / "x.json").exists()


# -- eval of raw answers -----------------------------------------------------------------------------------------

def test_a_raw_text_answer_maps_from_the_pad_frame_with_llavas_integer_offset():
    record = {"id": "p", "image": PORTRAIT, "conversations": [],
              "getok": {"task": "rec", "frame": "pad", "size": [480, 640], "format": {"name": "text", "decimals": 2},
                        "shapes": []}}
    line = parse_answer(record, "It is at [0.25, 0.25, 0.5, 0.75].")
    # S = 640, offset (640 - 480) // 2 = 80: x = 0.25 * 640 - 80 = 80, 0.5 * 640 - 80 = 240; y = 160, 480
    assert line["shapes"] == [{"kind": "box", "points": [[80.0, 160.0], [240.0, 480.0]]}] and line["errors"] == []
    line = parse_answer(dict(record, getok=dict(record["getok"], format={"name": "bins", "bins": 4})), "<loc_1><loc_1><loc_2><loc_3>")
    assert line["shapes"][0]["points"] == [[160.0, 240.0], [320.0, 560.0]]  # centres 0.375 .. 0.875


@pytest.mark.parametrize("args", [[], ["--format", "text"], ["--format", "bins", "--bins", "64"]],
                         ids=["getok", "text", "bins"])
def test_answers_written_by_hand_from_the_ground_truth_score_exactly_the_ceiling(tmp_path, args):
    from llava_getok.eval import cli as eval_cli

    ann = tmp_path / "val.json"
    assert run_cli(["coco", "--input", COCO, "--task", "rec", "--limit", 60, "--on-error", "skip", "--output", ann, *args])[0] == 0
    records = json.loads(ann.read_text())
    lines = []
    for k, r in enumerate(records):  # raw answers as a model writes them: in a sentence; model_vqa's question_id
        key = "question_id" if k % 2 else "id"
        lines.append({key: r["id"], "text": f"Sure. {r['conversations'][1]['value']} is where it is.", "answer_id": k})
    preds = tmp_path / "answers.jsonl"
    preds.write_text("".join(json.dumps(p) + "\n" for p in lines))
    result = eval_cli.evaluate(preds, ann, output_dir=tmp_path / "out")
    got, ceiling = result["metrics"]["rec"]["coco/val"], result["ceiling"]["rec"]["coco/val"]
    assert got["n"] == len(records) > 20 and got["unparseable"] == got["no_shape"] == 0
    assert all(got[k] == ceiling[k] for k in ("acc@0.5", "acc@0.8", "miou")), (got, ceiling)
    assert 0.3 < ceiling["acc@0.5"] < 1.0  # COCO's small objects: the ceiling is a real bound, not 100
    fmt = formats.describe(formats.record_format(records[0]["getok"]))
    assert result["formats"]["rec"]["coco/val"] == fmt and f"| {fmt} |" in result["markdown"]


def test_questions_for_llavas_model_vqa_ask_exactly_the_converted_question(tmp_path):
    ann, questions = tmp_path / "val.json", tmp_path / "questions.jsonl"
    assert run_cli(["coco", "--input", COCO, "--task", "rec", "--format", "text", "--limit", 10, "--on-error", "skip",
                    "--output", ann])[0] == 0
    assert run_cli(["questions", ann, "--output", questions])[0] == 0
    records = json.loads(ann.read_text())
    lines = [json.loads(x) for x in questions.read_text().splitlines()]
    assert [q["question_id"] for q in lines] == [r["id"] for r in records]
    for q, r in zip(lines, records):  # llava.eval.model_vqa puts DEFAULT_IMAGE_TOKEN + "\n" in front of "text"
        assert "<image>\n" + q["text"] == r["conversations"][0]["value"] and q["image"] == r["image"]
        assert q["text"].startswith("Please provide the bounding box coordinate of the region this sentence describes: ")

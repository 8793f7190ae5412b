"""parse, ``convert-datasets decode`` and ``llava-getok eval`` under hostile input: parse never raises, whatever
the string; decode and eval read converted records and predictions through one schema (llava_getok.records)
and answer bad input with one line naming the file, the record and the field, never a traceback."""
from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert_cases import IMAGES, case, load, run_cli
from llava_getok.eval import cli as eval_cli
from llava_getok.parse import parse
from llava_getok.vocab import GETokConfig

CFG = GETokConfig(grid=32, rounds=1, mode="inline")


# -- parse ----------------------------------------------------------------------------------------------------------

def test_parse_reads_a_5000_digit_index_as_out_of_range_not_as_an_exception():
    r = parse("<box><grid_" + "1" * 5000 + "_2><off_0_0><grid_3_3><off_0_0></box>", CFG)
    assert not r.shapes and "outside the 32x32 grid" in r.errors[0].message and len(r.errors[0].message) < 100
    r = parse("<grid_1_2><off_" + "9" * 5000 + "_0>", CFG)
    assert not r.shapes and "outside the offset alphabet" in r.errors[0].message


def test_fullwidth_digits_are_not_indices():
    assert parse("<box><grid_１_２><off_0_0><grid_3_3><off_0_0></box>", CFG).shapes == []  # one point: an error
    assert parse("<grid_１_２><off_0_0>", CFG).shapes == [] and parse("<grid_1_2><off_0_0>", CFG).shapes


TOKENS = ["<box>", "</box>", "<seg>", "</seg>", "<pl>", "</pl>", "<offset>", "</offset>", "<delete>", "<grid_3_4>",
          "<grid_31_0>", "<grid_32_1>", "<grid_-1_2>", "<grid_" + "7" * 4400 + "_1>", "<grid_１_2>", "<off_0_0>",
          "<off_1_-1>", "<off_-0_0>", "<off_2_0>", "<off_٣_0>", "<off_" + "1" * 4400 + "_0>", " ", "x", "\x00", "\ud800"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=8)), max_size=30),
       st.sampled_from([CFG, GETokConfig(grid=4, mode="grid"), GETokConfig(grid=8, rounds=2, offset_levels=5, mode="inline"),
                        GETokConfig(grid=32, mode="refine")]))
def test_parse_never_raises_whatever_the_string(parts, cfg):
    r = parse("".join(parts), cfg)
    for s in r.shapes:
        assert all(0 <= v <= 1 for p in s.points for v in p)
    assert all(isinstance(e.position, int) and "\n" not in e.message for e in r.errors)


# -- decode ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Real converted records (COCO REC, a record per annotation) and their decoded predictions."""
    d = tmp_path_factory.mktemp("conv")
    argv, _ = case("coco", d / "in")
    assert run_cli(argv[:-2] + ["--task", "rec", "--output", d / "ann.jsonl"])[0] == 0
    assert run_cli(["decode", d / "ann.jsonl", "--output", d / "pred.jsonl"])[0] == 0
    return d / "ann.jsonl", d / "pred.jsonl"


HOSTILE = [None, True, False, "10", "", -1, 0, 1e308, math.nan, [], {}, [1, 2], [[1, 2], [3]], {"a": 1}, "\u0000",
           "\ud800", "<box><grid_" + "1" * 5000 + "_1>", [[True, 1.0]], "pad"]


def _mutated(line: str, data) -> str:
    """One JSON mutation of a record: a node replaced by a hostile value, or a key deleted."""
    value = json.loads(line)
    paths, stack = [], [((), value)]
    while stack:
        path, v = stack.pop()
        paths.append(path)
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        stack += [(path + (k,), x) for k, x in items]
    path = data.draw(st.sampled_from(sorted(paths, key=str)))
    if not path:
        return json.dumps(data.draw(st.sampled_from(HOSTILE)))
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(st.sampled_from(HOSTILE))
    return json.dumps(value)


def _corrupt(lines: list[str], data) -> bytes:
    """The file of ``lines`` with one of its records mutated (_mutated), or one byte changed, or cut short."""
    k = data.draw(st.integers(0, len(lines) - 1))
    kind = data.draw(st.sampled_from(["json", "json", "byte", "cut"]))
    if kind == "json":
        return ("\n".join(lines[:k] + [_mutated(lines[k], data)] + lines[k + 1:]) + "\n").encode()
    raw = bytearray(("\n".join(lines) + "\n").encode())
    at = data.draw(st.integers(0, len(raw) - 1))
    if kind == "cut":
        return bytes(raw[:at])
    raw[at] = data.draw(st.integers(0, 255))
    return bytes(raw)


def _one_line_or_done(rc, err, prog):
    assert "Traceback" not in err
    if rc != 0:
        lines = err.splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"{prog}: "), err


def test_decode_of_corrupt_records_is_one_line_or_a_count(converted, tmp_path):
    ann, _ = converted
    lines = ann.read_text().splitlines()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def prop(data):
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            src = Path(d) / "c.jsonl"
            src.write_bytes(_corrupt(lines, data))
            rc, err = run_cli(["decode", src, "--output", Path(d) / "fail.jsonl"])
            _one_line_or_done(rc, err, "convert-datasets decode")
            rc2, err2 = run_cli(["decode", src, "--output", Path(d) / "skip.jsonl", "--on-error", "skip"])
            assert rc2 == 0 and "Traceback" not in err2
            read = len([line for line in src.read_bytes().split(b"\n") if line.strip()])
            skipped = int(err2.rsplit("skipped ", 1)[1]) if "decoded" in err2 else 0
            assert len(load(Path(d) / "skip.jsonl")) == read - skipped and (rc == 1) == (skipped > 0)  # read = decoded + skipped

    prop()


# -- eval -------------------------------------------------------------------------------------------------------------

def run_eval(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = eval_cli.main([str(a) for a in argv])
    return rc, err.getvalue()


def test_eval_of_corrupt_annotations_or_predictions_is_one_line(converted, tmp_path):
    ann, pred = converted
    files = {"ann": ann.read_text().splitlines(), "pred": pred.read_text().splitlines()}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def prop(data):
        which = data.draw(st.sampled_from(sorted(files)))
        corrupt = _corrupt(files[which], data)
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            paths = {name: Path(d) / f"{name}.jsonl" for name in files}
            for name, path in paths.items():
                path.write_bytes(corrupt if name == which else ("\n".join(files[name]) + "\n").encode())
            rc, err = run_eval("--predictions", paths["pred"], "--annotations", paths["ann"], "--output-dir", d)
            _one_line_or_done(rc, err.replace("\nwrote ", " wrote ") if rc == 0 else err, "llava-getok eval")

    prop()


def _rec(rid, task="rec", shapes=None, **getok):
    g = {"source": "grefcoco", "task": task, "split": "val", "frame": "pad", "size": [640, 427],
         "config": CFG.to_dict(), "shapes": [] if shapes is None else shapes, **getok}
    return {"id": rid, "image": "000000397133.jpg", "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                                                                      {"from": "gpt", "value": "There is no such object in the image."}], "getok": g}


def _write(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


DELETE = object()


@pytest.mark.parametrize("field, value, message", [
    ("frame", DELETE, "getok lacks 'frame'"), ("size", None, "'size' must be [width, height]"),
    ("shapes", [{"kind": "box", "points": [[True, 1], [3, 4]]}], "'points' must be a non-empty list"),
    ("shapes", [{"kind": "box", "points": [[0, 0], [1e308, 50]]}], "shapes[0]: a point lies outside the 640 x 427 image"),
    ("config", {"grid": "32"}, "'config'"), ("mask", {"size": [427, 640], "counts": [5, -3]}, "'mask.counts'")])
def test_eval_names_the_annotation_field_it_cannot_score(field, value, message, tmp_path):
    rec = _rec("a", shapes=[{"kind": "box", "points": [[10, 10], [50, 60]]}])
    if value is DELETE:
        del rec["getok"][field]
    else:
        rec["getok"][field] = value
    ann = _write(tmp_path / "ann.jsonl", [rec])
    pred = _write(tmp_path / "pred.jsonl", [{"id": "a", "text": "", "shapes": [], "errors": []}])
    rc, err = run_eval("--predictions", pred, "--annotations", ann)
    assert rc == 1 and len(err.splitlines()) == 1 and "ann.jsonl: record 0 (id a): getok" in err and message in err, err


@pytest.mark.parametrize("which, lines, message", [
    ("ann", [_rec(True)], "'id' must be a string or an integer, got True"),
    ("ann", [_rec(None)], "no 'id' field"),
    ("ann", [_rec("a"), _rec("a")], "ann.jsonl:2: id 'a' repeats the id of line 1"),
    ("pred", [{"id": False, "shapes": [], "errors": []}], "pred.jsonl:1: 'id' must be a string or an integer, got False"),
    ("pred", [{"id": None, "shapes": [], "errors": []}], "pred.jsonl:1: a prediction must be an object with an 'id'"),
    ("pred", [{"id": "a", "shapes": [{"kind": "point", "points": [[True, 2]]}], "errors": []}], "shapes[0]: 'points' must be"),
])
def test_eval_refuses_boolean_null_and_repeated_ids(which, lines, message, tmp_path):
    ann = _write(tmp_path / "ann.jsonl", lines if which == "ann" else [_rec("a")])
    pred = _write(tmp_path / "pred.jsonl", lines if which == "pred" else [{"id": "a", "shapes": [], "errors": []}])
    rc, err = run_eval("--predictions", pred, "--annotations", ann)
    assert rc == 1 and len(err.splitlines()) == 1 and message in err, err


def test_eval_non_utf8_annotations_and_unreadable_image_are_one_line(tmp_path):
    ann = tmp_path / "ann.jsonl"
    ann.write_bytes(json.dumps(_rec("a")).encode() + b"\n\xff\n")
    pred = _write(tmp_path / "pred.jsonl", [{"id": "a", "shapes": [], "errors": []}])
    rc, err = run_eval("--predictions", pred, "--annotations", ann)
    assert rc == 1 and "ann.jsonl:2: not UTF-8 text (byte 0xff" in err and len(err.splitlines()) == 1
    images = tmp_path / "images"
    images.mkdir()
    (images / "000000397133.jpg").write_bytes((IMAGES / "000000397133.jpg").read_bytes()[:3000])
    res = _rec("r", task="res", shapes=[{"kind": "mask", "points": [[100, 100]]}],
               mask={"size": [427, 640], "counts": [1000, 500, 427 * 640 - 1500]})
    _write(ann, [res])
    _write(pred, [{"id": "r", "shapes": [{"kind": "mask", "points": [[100.0, 100.0]]}], "errors": []}])
    rc, err = run_eval("--predictions", pred, "--annotations", ann, "--image-root", images, "--no-ceiling")
    assert rc == 1 and len(err.splitlines()) == 1 and "record r: field 'image': cannot read" in err and "truncated" in err, err


def test_an_expression_that_matches_nothing_answered_with_nothing_is_a_hit(tmp_path):
    """gRefCOCO's no-target expressions: empty ground truth; "nothing" is right, any mask or box is wrong."""
    from llava_getok.masks import SuperpixelGenerator

    records = [_rec("res-none", task="res"), _rec("res-wrong", task="res"), _rec("rec-none"), _rec("rec-wrong")]
    ann = _write(tmp_path / "ann.jsonl", records)
    nothing = {"text": "There is no such object in the image.", "shapes": [], "errors": []}
    mask = {"text": "<seg>..</seg>", "shapes": [{"kind": "mask", "points": [[320.0, 200.0]]}], "errors": []}
    box = {"text": "<box>..</box>", "shapes": [{"kind": "box", "points": [[10.0, 10.0], [50.0, 50.0]]}], "errors": []}
    pred = _write(tmp_path / "pred.jsonl", [{"id": "res-none", **nothing}, {"id": "res-wrong", **mask},
                                            {"id": "rec-none", **nothing}, {"id": "rec-wrong", **box}])
    result = eval_cli.evaluate(pred, ann, IMAGES, tmp_path, generator=SuperpixelGenerator(64))
    res, rec = result["metrics"]["res"]["grefcoco/val"], result["metrics"]["rec"]["grefcoco/val"]
    assert (res["n"], res["no_target"], res["giou"]) == (2, 2, 0.5)  # gIoU: 1 for the right "nothing", 0 for the mask
    assert res["ciou"] == 0.0  # the wrong mask's pixels join the cumulative union; nothing intersects
    assert (rec["n"], rec["no_target"], rec["acc@0.5"], rec["miou"]) == (2, 2, 0.5, 0.5)
    scores = [json.loads(line) for line in (tmp_path / "pred.scores.jsonl").read_text().splitlines()]
    assert [s["hit"] for s in scores] == [True, False, True, False] and scores[1]["union"] > 0
    assert result["ceiling"]["res"]["grefcoco/val"]["giou"] == 1.0  # the ground truth's own "nothing" is always right

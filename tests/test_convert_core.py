"""convert-datasets on real files: the llava and coco sources, the pipeline's guarantees (counts, rejects,
determinism, atomic writes, resume) and the round trip converted -> decoded within the codec's bound."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_converters import pipeline, registry
from data_converters.cli import build_job, main
from llava_getok.records import decode_record
from llava_getok.vocab import GETokConfig

FIXTURES = Path(__file__).parent / "fixtures" / "convert"


def load(path):
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def convert(*argv):
    rc = main([str(a) for a in argv])
    return rc


def assert_round_trip(records):
    """Every decoded shape lies within the codec's error bound of the ground truth, in original pixels."""
    n = 0
    for rec in records:
        g = rec.get("getok")
        if not g:
            continue
        cfg = GETokConfig.from_dict(g["config"])
        w, h = g["size"]
        scale = np.array([max(w, h)] * 2) if g["frame"] == "pad" else np.array([w, h])
        decoded = decode_record(rec)
        assert not decoded["errors"], decoded
        assert [s["kind"] for s in decoded["shapes"]] == [s["kind"] for s in g["shapes"]]
        for got, want in zip(decoded["shapes"], g["shapes"]):
            err = np.abs(np.asarray(got["points"]) - np.asarray(want["points"]))
            assert (err <= cfg.max_error * scale + 2e-3).all(), (rec["id"], got, want, cfg.max_error * scale)
            n += 1
    assert n > 0


@pytest.fixture(scope="module")
def coco_json(shared_data):
    return shared_data / "coco_mini" / "instances_val2017.json"


@pytest.fixture(scope="module")
def coco_images(shared_data):
    return shared_data / "coco_mini" / "val2017"


def test_list_names_every_source_and_marks_missing_ones(capsys, monkeypatch):
    monkeypatch.setitem(registry.SOURCES, "ghost", "data_converters.ghost_source")
    assert convert("--list") == 0
    out = capsys.readouterr().out
    for name in ("llava", "coco", "refcoco", "vlm-r1", "shapes", "ghost"):
        assert name in out
    assert "ghost" in out and "not installed" in out.split("ghost", 1)[1].splitlines()[0] + out.split("ghost", 1)[1].splitlines()[1]


@pytest.mark.parametrize("frame,mode,rounds", [("pad", "inline", 1), ("orig", "inline", 2), ("pad", "grid", 0), ("orig", "refine", 1)])
def test_coco_rec_round_trip_within_codec_bound(tmp_path, coco_json, frame, mode, rounds):
    out = tmp_path / "rec.jsonl"
    assert convert("coco", "--input", coco_json, "--output", out, "--frame", frame, "--mode", mode, "--rounds", rounds, "--on-error", "skip") == 0
    recs = load(out)
    summary = load(tmp_path / "rec.summary.json")
    assert summary["read"] == 624 and summary["written"] == 619 and summary["skipped_by_reason"] == {"crowd region (iscrowd=1)": 5}
    assert len(load(tmp_path / "rec.rejects.jsonl")) == 5
    assert_round_trip(recs)
    r = recs[0]
    assert r["conversations"][0]["value"].startswith("<image>\nPlease provide the bounding box coordinate")
    assert r["getok"]["frame"] == frame and r["getok"]["config"]["mode"] == mode
    if mode == "refine":
        assert len(r["conversations"]) == 4 and r["conversations"][3]["value"].startswith("<offset><box>")
        assert "<off_" not in r["conversations"][1]["value"]


def test_coco_det_groups_instances_by_image_and_category(tmp_path, coco_json):
    out = tmp_path / "det.json"
    assert convert("coco", "--input", coco_json, "--output", out, "--task", "det", "--frame", "orig") == 0
    recs = load(out)
    raw = json.loads(coco_json.read_text())
    pairs = {(a["image_id"], a["category_id"]) for a in raw["annotations"] if not a["iscrowd"]}
    assert len(recs) == len(pairs)
    person = next(r for r in recs if r["id"] == "coco-397133-cat1-det")
    assert len(person["getok"]["shapes"]) == sum(1 for a in raw["annotations"] if a["image_id"] == 397133 and a["category_id"] == 1)
    assert person["conversations"][1]["value"].count("<box>") == len(person["getok"]["shapes"])
    assert_round_trip(recs)


def test_llava_rewrites_boxes_in_place_and_nothing_else(tmp_path, coco_images):
    out = tmp_path / "mix.json"
    src = load(FIXTURES / "llava_mix.json")
    for frame in ("pad", "orig"):
        assert convert("llava", "--input", FIXTURES / "llava_mix.json", "--image-root", coco_images, "--output", out, "--frame", frame) == 0
        recs = load(out)
        assert [r["id"] for r in recs] == [r["id"] for r in src]
        assert recs[0] == src[0] and recs[3] == src[3]  # no box: untouched, no getok field
        vg = recs[1]
        for before, after in zip(src[1]["conversations"], vg["conversations"]):
            if "[0." in before["value"]:
                assert "[0." not in after["value"] and "<box>" in after["value"]
            else:
                assert after == before
        assert vg["conversations"][5]["value"].count("<box>") == 2 and " and " in vg["conversations"][5]["value"]
        assert recs[2]["model"] == "" and len(vg["getok"]["shapes"]) == 4
        # the input boxes are in the padded square of a 640 x 427 image: 0.19 * 640 - 106 = 15.6 px
        assert vg["getok"]["shapes"][0]["points"] == [[236.8, 15.6], [364.8, 130.8]]
        assert_round_trip(recs)


def test_llava_needs_sizes_from_images(tmp_path):
    out = tmp_path / "mix.json"
    assert convert("llava", "--input", FIXTURES / "llava_mix.json", "--output", out, "--on-error", "skip") == 0
    s = load(tmp_path / "mix.summary.json")
    assert s["skipped_by_reason"] == {"image size unknown": 2} and s["read"] == s["written"] + s["skipped"] == 4


def test_same_input_and_seed_give_identical_bytes_with_any_worker_count(tmp_path, coco_json):
    outs = []
    for k, workers in enumerate((1, 2)):
        out = tmp_path / f"r{k}.jsonl"
        assert convert("coco", "--input", coco_json, "--output", out, "--task", "refine", "--seed", 7, "--workers", workers, "--on-error", "skip") == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    other = tmp_path / "seed8.jsonl"
    convert("coco", "--input", coco_json, "--output", other, "--task", "refine", "--seed", 8, "--on-error", "skip")
    assert other.read_bytes() != outs[0]  # the seed draws the refine examples' first answers


def bad_coco(tmp_path, coco_json):
    """coco_mini with one broken annotation per kind of bad input."""
    d = json.loads(coco_json.read_text())
    anns = d["annotations"]
    anns[0]["bbox"] = [10, 10, -5, 20]  # negative width (x2 < x1)
    anns[1]["bbox"] = [float("nan"), 1, 2, 3]
    del anns[2]["bbox"]
    anns[3]["image_id"] = 999999999
    anns[4]["bbox"] = [5000, 10, 20, 20]  # far outside
    anns[5]["segmentation"] = [[1, 2, 3, 4]]  # a polygon of 2 points
    p = tmp_path / "instances_val2017.json"
    p.write_text(json.dumps(d))
    return p, [a["id"] for a in anns[:6]]


def test_bad_input_skip_counts_every_reason(tmp_path, coco_json):
    src, _ = bad_coco(tmp_path, coco_json)
    out = tmp_path / "out.jsonl"
    assert convert("coco", "--input", src, "--output", out, "--task", "point", "--on-error", "skip") == 0
    s = load(tmp_path / "out.summary.json")
    assert s["read"] == 624 == s["written"] + s["skipped"]
    assert s["skipped_by_reason"] == {
        "box x2 < x1 or y2 < y1": 1, "NaN or infinite coordinate": 1, "missing bbox": 1, "unknown image_id": 1,
        "far outside the image": 1, "polygon with < 3 points": 1, "crowd region (iscrowd=1)": 5,
    }
    rejects = load(tmp_path / "out.rejects.jsonl")
    assert {r["field"] for r in rejects if r.get("error")} == {"bbox", "image_id", "segmentation[0]"}


def test_bad_input_fail_names_file_record_and_field_and_keeps_old_output(tmp_path, coco_json, capsys):
    src, ids = bad_coco(tmp_path, coco_json)
    out = tmp_path / "out.jsonl"
    out.write_text("OLD\n")
    assert convert("coco", "--input", src, "--output", out) == 1
    err = capsys.readouterr().err
    assert "instances_val2017.json:annotations[" in err and any(f"(id {i}): field 'bbox'" in err for i in ids)
    assert out.read_text() == "OLD\n"  # atomic: a failed run never touches the previous output


def test_malformed_jsonl_line_is_named_or_counted(tmp_path, coco_images, capsys):
    lines = [json.dumps(r) for r in load(FIXTURES / "llava_mix.json")]
    lines.insert(2, '{"id": "broken", "conversations": [')
    src = tmp_path / "mix.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.jsonl"
    assert convert("llava", "--input", src, "--image-root", coco_images, "--output", out) == 1
    err = capsys.readouterr().err
    assert "mix.jsonl:3: malformed JSON at column 37" in err and len(err.splitlines()) == 1
    assert convert("llava", "--input", src, "--image-root", coco_images, "--output", out, "--on-error", "skip") == 0
    assert load(tmp_path / "o.summary.json")["skipped_by_reason"] == {"malformed JSON": 1}
    assert len(load(out)) == 4


def test_missing_image_is_an_error(tmp_path, coco_images):
    src = tmp_path / "m.json"
    src.write_text(json.dumps([{"id": "x", "image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>\n[0.1, 0.2, 0.3, 0.4]"}]}]))
    assert convert("llava", "--input", src, "--image-root", coco_images, "--output", tmp_path / "o.json", "--on-error", "skip") == 0
    assert load(tmp_path / "o.rejects.jsonl")[0]["reason"] == "image not found"


def test_interrupted_run_resumes_after_the_last_record_written(tmp_path, coco_json, capsys):
    argv = ["coco", "--input", coco_json, "--output", tmp_path / "o.jsonl", "--on-error", "skip"]
    assert convert(*argv) == 0
    full = (tmp_path / "o.jsonl").read_text().splitlines()
    rejects = (tmp_path / "o.rejects.jsonl").read_text().splitlines()
    # rebuild what an interrupted run leaves: the first 100 records (one of them marked), a cut line, state
    head = [full[0].replace('"rec"', '"rec", "marker": 1', 1)] + full[1:100]
    (tmp_path / "o.jsonl.partial").write_text("".join("W" + line + "\n" for line in head) + 'W{"id": "cut sh')
    job = build_job([str(x) for x in argv])
    (tmp_path / "o.jsonl.partial.state.json").write_text(json.dumps(pipeline._state(job)))
    capsys.readouterr()
    assert convert(*argv) == 0
    assert "resuming" in capsys.readouterr().err
    again = (tmp_path / "o.jsonl").read_text().splitlines()
    assert again[0] == head[0] and again[1:] == full[1:]  # kept what was written, converted the rest
    assert not (tmp_path / "o.jsonl.partial").exists()
    assert convert(*argv, "--no-resume") == 0 and (tmp_path / "o.jsonl").read_text().splitlines() == full


def test_res_and_point_on_real_coco_masks(tmp_path, coco_json, coco_images):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    # the crowd RLE object of image 34417 and the polygon objects around it (annotations are ordered by image)
    d = json.loads(coco_json.read_text())
    keep = [a for a in d["annotations"] if a["image_id"] == 34417]
    d["annotations"] = keep
    src = tmp_path / "instances_val2017.json"
    src.write_text(json.dumps(d))
    out = tmp_path / "res.jsonl"
    assert convert("coco", "--input", src, "--image-root", coco_images, "--output", out, "--task", "res", "--on-error", "skip") == 0
    recs = load(out)
    s = load(tmp_path / "res.summary.json")
    assert s["read"] == len(keep) == s["written"] + s["skipped"] and s["written"] >= len(keep) - 2
    coco = COCO(str(src))
    crowd = [r for r in recs if r["getok"]["expression"].startswith("group of")]
    assert crowd, "the RLE crowd mask converts"
    for r in recs:
        ann = coco.anns[int(r["id"].split("ann")[1].split("-")[0])]
        assert (mask_utils.decode(r["getok"]["mask"]) == coco.annToMask(ann)).all()
        answer = r["conversations"][1]["value"]
        assert answer.startswith("<seg>") and answer.count("<grid_") == len(r["getok"]["shapes"][0]["points"])
        assert r["getok"]["proposals"] == {"generator": "superpixel", "n_segments": 512, "compactness": 10.0}
    assert_round_trip(recs)
    out = tmp_path / "point.jsonl"
    assert convert("coco", "--input", src, "--output", out, "--task", "point", "--frame", "orig", "--on-error", "skip") == 0
    for r in load(out):
        ann = coco.anns[int(r["id"].split("ann")[1].split("-")[0])]
        (x, y), = r["getok"]["shapes"][0]["points"]
        assert coco.annToMask(ann)[int(y), int(x)] == 1  # the point lies on the object
    assert_round_trip(load(out))


def test_res_refine_mode_offsets_and_deletes(tmp_path, coco_json, coco_images):
    d = json.loads(coco_json.read_text())
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] == 397133 and not a["iscrowd"]][:4]
    src = tmp_path / "instances_val2017.json"
    src.write_text(json.dumps(d))
    out = tmp_path / "res.jsonl"
    assert convert("coco", "--input", src, "--image-root", coco_images, "--output", out, "--task", "res", "--mode", "refine", "--on-error", "skip") == 0
    recs = load(out)
    assert recs
    for r in recs:
        first, ask, second = (t["value"] for t in r["conversations"][1:])
        assert first.startswith("<seg>") and "<off_" not in first and first in ask
        assert second.startswith("<offset><seg>") and second.count("<off_") + second.count("<delete>") == first.count("<grid_")
    assert any("<delete>" in r["conversations"][3]["value"] for r in recs)  # the drawn wrong anchors
    for r in recs:
        assert decode_record(r)["shapes"] == r["getok"]["shapes"]  # shapes = the refined anchors, in pixels


def test_decode_command_writes_pixel_shapes(tmp_path, coco_json):
    out = tmp_path / "rec.json"
    assert convert("coco", "--input", coco_json, "--output", out, "--limit", 20, "--frame", "orig", "--on-error", "skip") == 0
    assert convert("decode", out, "--output", tmp_path / "decoded.jsonl") == 0
    decoded = load(tmp_path / "decoded.jsonl")
    recs = load(out)
    assert [d["id"] for d in decoded] == [r["id"] for r in recs] and len(decoded) == 20
    assert all(d["shapes"][0]["kind"] == "box" and not d["errors"] and d["text"].startswith("<box>") for d in decoded)


def test_round_trip_property_over_sizes_frames_and_boxes():
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st

    from data_converters.base import Sample
    from data_converters.conversations import build_record

    @settings(max_examples=60, deadline=None)
    @given(w=st.integers(1, 4000), h=st.integers(1, 4000), frame=st.sampled_from(["pad", "orig"]),
           rounds=st.integers(0, 3), corners=st.lists(st.floats(0, 1), min_size=4, max_size=4))
    def check(w, h, frame, rounds, corners):
        x1, x2 = sorted(corners[:2])
        y1, y2 = sorted(corners[2:])
        assume(x1 * w < x2 * w and y1 * h < y2 * h)  # a box of zero width or height is bad input
        cfg = GETokConfig(grid=32, rounds=rounds, mode="grid" if rounds == 0 else "inline")
        s = Sample(id="p", image="p.jpg", size=(w, h), expression="it", boxes=((x1 * w, y1 * h, x2 * w, y2 * h),)).validated((w, h))
        assert_round_trip([build_record(s, "rec", cfg, frame)])

    check()

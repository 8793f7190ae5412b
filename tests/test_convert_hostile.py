"""convert-datasets under hostile and real-world input, one test per way it used to fail (issue 15): every bad
input is a one-line error naming file, record and the source's own field (``--on-error fail``, exit 1), or a
counted skip (``skip``); never a traceback, never a silent loss; read = written + skipped."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert_cases import FIXTURES, IMAGES, SOURCES, case, coco_subset, load, run_cli
from data_converters import pipeline
from data_converters.cli import build_job

ROOT = Path(__file__).resolve().parents[1]


def both_modes(argv, out: Path):
    """(skip summary, skip rejects, fail exit status, fail stderr) for one input."""
    rc, err = run_cli(argv + ["--output", out, "--on-error", "skip"])
    assert rc == 0, err
    summary = load(out.with_suffix(".summary.json"))
    assert summary["read"] == summary["written"] + summary["skipped"]
    rejects = load(out.with_suffix(".rejects.jsonl")) if summary["skipped"] else []
    rc_fail, err_fail = run_cli(argv + ["--output", out.with_name("fail.jsonl"), "--on-error", "fail"])
    return summary, rejects, rc_fail, err_fail


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert-datasets: error: ") and "Traceback" not in err, err
    return lines[0]


# -- bytes ------------------------------------------------------------------------------------------------------

# A word of each fixture that only some of its records carry; its first byte becomes 0xff (not UTF-8).
NON_UTF8 = {"llava": ("llava_mix.json", b"kitchen"), "coco": ("instances_val2017.json", b"000000183709.jpg"),
            "refcoco": ("instances.json", b"000000034417.jpg"), "vlm-r1": ("vlm_r1.json", b"the plate"),
            "shikra": ("shikra.jsonl", b"white plate"), "odvg": ("odvg.jsonl", b"two cups"),
            "flickr30k": ("1000092795.txt", b"shaggy"), "vg": ("region_descriptions.json", b"tall white"),
            "qwen": ("qwen.json", b"vegetables"), "kosmos2": ("kosmos2.jsonl", b"A plate"), "shapes": ("annotations.jsonl", b'"the ')}


@pytest.mark.parametrize("source", SOURCES)
def test_bytes_that_are_not_utf8_cost_only_their_records(source, tmp_path):
    argv, files = case(source, tmp_path / "in")
    name, word = NON_UTF8[source]
    path = next(p for p in [*files, *(tmp_path / "in").rglob(name)] if p.name == name)
    data = path.read_bytes()
    assert word in data
    path.write_bytes(data.replace(word, b"\xff" + word[1:], 1))
    summary, rejects, rc, err = both_modes(argv, tmp_path / "out.jsonl")
    assert {r["reason"] for r in rejects if r.get("error")} == {"not UTF-8"}, rejects
    if source not in ("flickr30k", "odvg"):  # (there one file / one line holds every record of the fixture)
        assert summary["written"] >= 1  # the other records convert
    assert rc == 1 and "not UTF-8" in one_line(err)


def test_a_bom_and_crlf_line_ends_are_read(tmp_path):
    lines = (FIXTURES / "shikra.jsonl").read_bytes().replace(b"\n", b"\r\n")
    (tmp_path / "s.jsonl").write_bytes(b"\xef\xbb\xbf" + lines)
    rc, err = run_cli(["shikra", "--input", tmp_path / "s.jsonl", "--output", tmp_path / "o.jsonl"])
    assert rc == 0 and load(tmp_path / "o.summary.json")["written"] == 2, err


def test_numbers_python_cannot_hold_and_nesting_it_cannot_follow(tmp_path):
    lines = (FIXTURES / "shikra.jsonl").read_text().splitlines()
    bad = [lines[0].replace("382.5", "1" * 5000), lines[1].replace('"bbox": [', '"bbox": ' + "[" * 100_000, 1), lines[1]]
    (tmp_path / "s.jsonl").write_text("\n".join(bad) + "\n")
    summary, rejects, rc, err = both_modes(["shikra", "--input", tmp_path / "s.jsonl"], tmp_path / "o.jsonl")
    assert summary["written"] == 1 and [r["reason"] for r in rejects] == ["malformed JSON", "malformed JSON"]
    assert "4300 digits" in rejects[0]["message"] and "nested deeper" in rejects[1]["message"]
    (tmp_path / "v.json").write_text("[" + "1" * 5000 + "]")  # a whole-file JSON: the file cannot be read
    rc, err = run_cli(["vlm-r1", "--input", tmp_path / "v.json", "--output", tmp_path / "v.jsonl", "--on-error", "skip"])
    assert rc == 1 and "v.json: malformed JSON" in one_line(err)


# -- masks and images -------------------------------------------------------------------------------------------

def test_uncompressed_rle_with_a_negative_count_names_segmentation_counts(tmp_path):
    d = coco_subset()
    ann = next(a for a in d["annotations"] if not a["iscrowd"])
    im = next(i for i in d["images"] if i["id"] == ann["image_id"])
    ann["segmentation"] = {"size": [im["height"], im["width"]], "counts": [5, -3, im["height"] * im["width"] - 2]}
    src = tmp_path / "instances_val2017.json"
    src.write_text(json.dumps(d))
    summary, rejects, rc, err = both_modes(["coco", "--input", src, "--task", "point"], tmp_path / "o.jsonl")
    assert [(r["field"], r["message"]) for r in rejects if r.get("error")] == [("segmentation.counts", "negative run length")]
    assert rc == 1 and f"(id {ann['id']}): field 'segmentation.counts': negative run length" in one_line(err)


def test_unreadable_and_truncated_images_for_res_are_named(tmp_path):
    d = coco_subset(limit=3)
    d["annotations"] = [a for a in d["annotations"] if not a["iscrowd"]][:2]
    assert {a["image_id"] for a in d["annotations"]} == {34417, 183709}
    src = tmp_path / "instances_val2017.json"
    src.write_text(json.dumps(d))
    images = tmp_path / "images"
    images.mkdir()
    data = (IMAGES / "000000034417.jpg").read_bytes()
    (images / "000000034417.jpg").write_bytes(data[: len(data) // 3])  # header intact, pixels cut short
    (images / "000000183709.jpg").write_text("not an image\n")
    argv = ["coco", "--input", src, "--task", "res", "--image-root", images, "--superpixels", 50]
    summary, rejects, rc, err = both_modes(argv, tmp_path / "o.jsonl")
    assert summary["written"] == 0 and [(r["field"], r["reason"]) for r in rejects] == [("images[0].file_name", "unreadable image"), ("images[1].file_name", "unreadable image")]
    assert any("truncated" in r["message"] for r in rejects) and any("cannot identify image" in r["message"] for r in rejects)
    assert rc == 1 and ".file_name': cannot read the image" in one_line(err)


# -- records and lookup tables ----------------------------------------------------------------------------------

def test_refcoco_ref_that_is_not_a_dict_is_counted_and_an_instances_entry_without_id_stops(tmp_path):
    import pickle

    argv, (refs_path, instances) = case("refcoco", tmp_path / "in")
    refs = pickle.loads(refs_path.read_bytes())
    refs_path.write_bytes(pickle.dumps(refs[:1] + ["not a ref"] + refs[1:], protocol=2))
    summary, rejects, rc, err = both_modes(argv, tmp_path / "o.jsonl")
    assert summary["written"] == 6 and [(r["where"], r["reason"]) for r in rejects] == [("refs(unc).p:refs[1]", "ref is not a dict")]
    assert rc == 1 and "refs(unc).p:refs[1]: expected a ref (a dict), got str" in one_line(err)
    inst = json.loads(instances.read_text())
    del inst["annotations"][1]["id"]
    instances.write_text(json.dumps(inst))
    for mode in ("skip", "fail"):  # a broken lookup table: no record can be trusted
        rc, err = run_cli(argv + ["--output", tmp_path / f"t-{mode}.jsonl", "--on-error", mode])
        assert rc == 1 and "instances.json: field 'annotations[1].id': missing" in one_line(err)


def test_a_pickle_that_names_code_is_refused_not_run(tmp_path):
    argv, (refs_path, _) = case("refcoco", tmp_path / "in")
    refs_path.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")  # os.system("true")
    rc, err = run_cli(argv + ["--output", tmp_path / "o.jsonl", "--on-error", "skip"])
    assert rc == 1 and "pickle opcode GLOBAL at byte 2: only plain data is read" in one_line(err)


def test_vg_image_data_that_is_not_a_list_stops_with_one_line(tmp_path):
    argv, (_, image_data) = case("vg", tmp_path / "in")
    image_data.write_text(json.dumps({"images": json.loads(image_data.read_text())}))
    for mode in ("skip", "fail"):
        rc, err = run_cli(argv + ["--output", tmp_path / f"o-{mode}.jsonl", "--on-error", mode])
        assert rc == 1 and "image_data.json: expected a list of images, got an object" in one_line(err)


def test_odvg_lines_whose_structure_is_broken_are_counted_one_each(tmp_path):
    lines = (FIXTURES / "odvg.jsonl").read_text().splitlines()
    grounding = json.loads(lines[1])
    regions_not_a_list = {**grounding, "grounding": {**grounding["grounding"], "regions": {"bbox": [1, 2, 3, 4]}}}
    grounding_not_an_object = {**grounding, "grounding": "a plate"}
    src = tmp_path / "o.jsonl"
    src.write_text("\n".join([lines[0], json.dumps(regions_not_a_list), lines[1], json.dumps(grounding_not_an_object)]) + "\n")
    summary, rejects, rc, err = both_modes(["odvg", "--input", src, "--task", "rec"], tmp_path / "out.jsonl")
    assert summary["read"] == 5 and summary["written"] == 2  # the two regions of the good grounding line
    assert [(r["where"], r["field"]) for r in rejects if r.get("error")] == [("o.jsonl:2", "grounding.regions"), ("o.jsonl:4", "grounding")]
    assert rc == 1 and "o.jsonl:2: field 'grounding.regions': expected a list, got an object" in one_line(err)


# -- values ------------------------------------------------------------------------------------------------------

# (source, file, old text, new text, the field the error must name): numbers written as strings
STRING_NUMBERS = [
    ("coco", "instances_val2017.json", None, None, "bbox"),
    ("vlm-r1", "vlm_r1.json", '"solution": [382, 57, 450, 162]', '"solution": ["382", "57", "450", "162"]', "solution"),
    ("shikra", "shikra.jsonl", "[382.5, 57.3, 450.1, 162.8]", '["382.5", "57.3", "450.1", "162.8"]', "bbox"),
    ("odvg", "odvg.jsonl", "[120.0, 384.0, 316.8, 576.0]", '["120", "384", "316.8", "576"]', "grounding.regions[0].bbox"),
    ("vg", "region_descriptions.json", '"x": 20', '"x": "20"', "regions[0].x"),
]


@pytest.mark.parametrize("source, name, old, new, field", STRING_NUMBERS)
def test_numbers_written_as_strings_are_refused_naming_the_field(source, name, old, new, field, tmp_path):
    argv, files = case(source, tmp_path / "in")
    path = next(p for p in files if p.name == name)
    if source == "coco":
        d = json.loads(path.read_text())
        d["annotations"][1]["bbox"] = [str(v) for v in d["annotations"][1]["bbox"]]
        path.write_text(json.dumps(d))
    else:
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new, 1))
    summary, rejects, rc, err = both_modes(argv, tmp_path / "o.jsonl")
    assert [r["field"] for r in rejects if r.get("error")] == [field]
    assert rc == 1 and f"field '{field}': expected" in one_line(err)


def test_boxes_of_zero_width_or_height_are_bad_input(tmp_path):
    d = coco_subset()
    ann = next(a for a in d["annotations"] if not a["iscrowd"])
    ann["bbox"][2] = 0
    (tmp_path / "instances_val2017.json").write_text(json.dumps(d))
    summary, rejects, rc, err = both_modes(["coco", "--input", tmp_path / "instances_val2017.json"], tmp_path / "o.jsonl")
    assert [(r["field"], r["reason"]) for r in rejects if r.get("error")] == [("bbox", "box of zero width or height")]
    assert rc == 1 and "has zero width or height" in one_line(err)
    # LLaVA's own data rounds boxes to two decimals, which makes thin ones zero-wide: a conversation of the source's
    # own is training text, never scored, and keeps its box
    src = tmp_path / "m.json"
    rec = load(FIXTURES / "llava_mix.json")[2]
    rec["conversations"][1]["value"] = "[0.25, 0.6, 0.25, 0.9]"
    src.write_text(json.dumps([rec]))
    summary, rejects, rc, err = both_modes(["llava", "--input", src, "--image-root", IMAGES], tmp_path / "l.jsonl")
    (x1, _), (x2, _) = load(tmp_path / "l.jsonl")[0]["getok"]["shapes"][0]["points"]
    assert rc == 0 and not rejects and x1 == x2


@pytest.mark.parametrize("bad", ["[nan, 0.6, 0.66, 0.9]", "[-0.25, 0.6, 0.66, 0.9]", "[0.25, 0.6, 1.66, 0.9]", "[0.25, 0.6, 0.66, 1.9]"])
def test_llava_record_with_a_box_it_cannot_read_is_rejected_whole_never_half_rewritten(bad, tmp_path):
    rec = load(FIXTURES / "llava_mix.json")[1]  # four boxes in three turns
    rec["conversations"][3]["value"] = f"{bad} and [0.1, 0.2, 0.3, 0.4]"
    src = tmp_path / "m.json"
    src.write_text(json.dumps([rec, load(FIXTURES / "llava_mix.json")[2]]))
    summary, rejects, rc, err = both_modes(["llava", "--input", src, "--image-root", IMAGES], tmp_path / "o.json")
    assert summary["written"] == 1 and [r["field"] for r in rejects] == ["conversations[3].value"]
    assert [r["id"] for r in load(tmp_path / "o.json")] == ["VG_100K_183709"]
    assert rc == 1 and "m.json:0: field 'conversations[3].value': box" in one_line(err)


def test_placeholder_characters_in_the_input_never_take_another_records_tokens(tmp_path):
    recs = load(FIXTURES / "llava_mix.json")
    forged = json.loads(json.dumps(recs[2]))
    forged["conversations"][0]["value"] += " \u0000T0\u0000"  # the batch encoder's placeholder for the batch's first box
    literal = json.loads(json.dumps(recs[3]))
    literal["conversations"][1]["value"] = "In JSON, \\u0000T0\\u0000 is written with backslashes."
    before_box = json.loads(json.dumps(recs[2]))  # the same text right before a real box's placeholder
    before_box["conversations"][1]["value"] = "\\u0000T0[0.25, 0.6, 0.66, 0.9]"
    src = tmp_path / "m.json"
    src.write_text(json.dumps([recs[1], forged, literal, before_box]))
    summary, rejects, rc, err = both_modes(["llava", "--input", src, "--image-root", IMAGES], tmp_path / "o.json")
    assert [(r["where"], r["field"], r["reason"]) for r in rejects] == [("m.json:1", "conversations[0].value", "NUL character")]
    out = load(tmp_path / "o.json")
    assert out[1] == literal  # text that merely reads like a placeholder stays text
    assert out[2]["conversations"][1]["value"].startswith("\\u0000T0<box><grid_") and out[2]["getok"]["shapes"]
    assert out[0]["conversations"][1]["value"] == recs[1]["conversations"][1]["value"] and out[0]["getok"]["shapes"]
    assert rc == 1 and "NUL character" in one_line(err)
    # a NUL in a field no source reads still cannot reach the output
    other = json.loads(json.dumps(recs[2]))
    other["model"] = "\u0000T0\u0000"
    src.write_text(json.dumps([recs[1], other]))
    summary, rejects, _, _ = both_modes(["llava", "--input", src, "--image-root", IMAGES], tmp_path / "p.json")
    assert [(r["field"], r["reason"]) for r in rejects] == [("model", "NUL character")]


# -- ids ---------------------------------------------------------------------------------------------------------

def _repeat_first(source, files):
    """Repeat a record of the source's fixture (the same id), in the source's own format."""
    path = files[0]
    if source in ("coco",):
        d = json.loads(path.read_text())
        d["annotations"].append(dict(d["annotations"][-1]))
        path.write_text(json.dumps(d))
    elif source == "refcoco":
        import pickle

        refs = pickle.loads(path.read_bytes())
        path.write_bytes(pickle.dumps(refs + refs[:1], protocol=2))
    elif source == "vg":
        d = json.loads(path.read_text())
        d[1]["regions"].append(d[0]["regions"][0] | {"image_id": d[1]["id"], "region_id": d[1]["regions"][0]["region_id"]})
        path.write_text(json.dumps(d))
    elif path.suffix == ".json":
        d = json.loads(path.read_text())
        d = [dict(r, id=r.get("id", f"r{k}")) for k, r in enumerate(d)] if source in ("vlm-r1",) else d
        path.write_text(json.dumps(d + d[-1:]))
    else:
        lines = path.read_text().splitlines()
        if source == "shikra":
            lines = [json.dumps(dict(json.loads(line), id=f"r{k}")) for k, line in enumerate(lines)]
        path.write_text("\n".join(lines + lines[-1:]) + "\n")


@pytest.mark.parametrize("source", [s for s in SOURCES if s not in ("odvg", "flickr30k")])  # their ids are positions
def test_a_repeated_record_id_is_counted_or_failed(source, tmp_path):
    argv, files = case(source, tmp_path / "in")
    rc, _ = run_cli(argv + ["--output", tmp_path / "before.jsonl"])
    written = load(tmp_path / "before.summary.json")["written"]
    _repeat_first(source, files)
    if source in ("llava", "qwen", "kosmos2"):  # LLaVA's format repeats ids (mix665k: one per image): kept, counted
        rc, err = run_cli(argv + ["--output", tmp_path / "o.jsonl"])
        s = load(tmp_path / "o.summary.json")
        assert rc == 0 and s["written"] == written + 1 and s["repeated_ids"] == 1 and "repeat an earlier record's id" in err
        return
    summary, rejects, rc, err = both_modes(argv, tmp_path / "o.jsonl")
    assert summary["written"] == written and {r["reason"] for r in rejects if r.get("error")} == {"duplicate id"}
    assert rc == 1 and "repeats an earlier record's (the input holds it twice)" in one_line(err)


# -- LLaVA-1.5's mix665k -----------------------------------------------------------------------------------------

def test_mix665k_text_only_records_pass_through_untouched_and_integer_lists_are_never_boxes(tmp_path):
    root = tmp_path / "data"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "train2017").symlink_to(IMAGES)
    src = FIXTURES / "llava_mix665k_sample.jsonl"
    rc, err = run_cli(["llava", "--input", src, "--image-root", root, "--output", tmp_path / "o.jsonl"])
    assert rc == 0, err
    lines_in, lines_out = src.read_text().splitlines(), (tmp_path / "o.jsonl").read_text().splitlines()
    assert lines_out[:2] == lines_in[:2]  # text-only ShareGPT records, [0, 0, 0, 1] and [0.25, 0.5, 0.75, 1.0] included
    image = json.loads(lines_out[2])
    assert image["conversations"][1]["value"].startswith("<box><grid_") and len(image["getok"]["shapes"]) == 1
    assert image["conversations"][2]["value"] == "Is the list [0, 0, 0, 1] written on the plate?"
    rc, err = run_cli(["llava", "--input", src, "--image-root", root, "--output", tmp_path / "o.json", "--on-error", "fail"])
    assert rc == 0 and load(tmp_path / "o.json")[:2] == [json.loads(line) for line in lines_in[:2]]


# -- the output ---------------------------------------------------------------------------------------------------

def test_summary_is_written_only_after_the_output_is_in_place(tmp_path):
    argv, _ = case("shikra", tmp_path / "in")
    out = tmp_path / "o.jsonl"
    out.mkdir()  # the final rename cannot put a file where a folder is
    (out / "keep").write_text("x")
    rc, err = run_cli(argv + ["--output", out])
    assert rc == 1 and "cannot write" in one_line(err)
    assert not (tmp_path / "o.summary.json").exists() and not (tmp_path / "o.rejects.jsonl").exists()
    shutil.rmtree(out)
    rc, err = run_cli(argv + ["--output", out])  # the same command then finishes (from the kept partial)
    assert rc == 0 and len(load(out)) == 2 and load(tmp_path / "o.summary.json")["written"] == 2


# -- resume ---------------------------------------------------------------------------------------------------------

def _interrupted(argv, out: Path, keep: int):
    """What an interrupted run of ``argv`` leaves: its first ``keep`` records in OUT.partial, and its state."""
    full = out.with_name("full" + out.suffix)
    assert run_cli(argv + ["--output", full])[0] == 0
    job = build_job([str(a) for a in argv + ["--output", out]])
    head = full.read_text().splitlines()[:keep]
    out.with_name(out.name + ".partial").write_text("".join("W" + line + "\n" for line in head))
    out.with_name(out.name + ".partial.state.json").write_text(json.dumps(pipeline._state(job)))
    return full.read_text()


@pytest.mark.parametrize("source, side", [("vg", "image_data.json"), ("flickr30k", "1000092795.xml"), ("refcoco", "instances.json")])
def test_resume_is_keyed_by_every_file_the_source_reads(source, side, tmp_path):
    argv, files = case(source, tmp_path / "in")
    out = tmp_path / "o.jsonl"
    full = _interrupted(argv, out, keep=1)
    rc, err = run_cli(argv + ["--output", out])
    assert rc == 0 and "resuming" in err and out.read_text() == full  # unchanged input: resumes, same output
    _interrupted(argv, out, keep=1)
    path = next(p for p in (tmp_path / "in").rglob(side))
    if side.endswith(".xml"):
        path.write_text(path.read_text().replace("<xmin>172</xmin>", "<xmin>17</xmin>"))  # a new size as well as a new mtime
    else:
        d = json.loads(path.read_text())
        if source == "vg":
            d[0]["width"] = 1600
            d[0]["height"] = 1200
        else:
            d["annotations"][0]["bbox"][0] = 0.5
        path.write_text(json.dumps(d))
    rc, err = run_cli(argv + ["--output", out])
    assert rc == 0 and "starting over" in err and "resuming" not in err
    assert run_cli(argv + ["--output", tmp_path / "fresh.jsonl"])[0] == 0
    assert out.read_text() == (tmp_path / "fresh.jsonl").read_text() != full


# -- decode ---------------------------------------------------------------------------------------------------------

def test_decode_names_records_it_cannot_read(tmp_path, capsys):
    argv, _ = case("shikra", tmp_path / "in")
    assert run_cli(argv + ["--output", tmp_path / "c.jsonl"])[0] == 0
    good = (tmp_path / "c.jsonl").read_text().splitlines()
    rec = json.loads(good[0])
    no_config = json.loads(good[0])
    del no_config["getok"]["config"]
    no_conversations = {k: v for k, v in rec.items() if k != "conversations"}
    size_null = json.loads(good[0])
    size_null["getok"]["size"] = None
    bad = [("getok lacks 'config'", no_config), ("'conversations' must be a list", no_conversations),
           ("'size' must be [width, height]", size_null), ("a record must be an object", [rec])]
    for k, (message, record) in enumerate(bad):
        src = tmp_path / f"bad{k}.jsonl"
        src.write_text(good[1] + "\n" + json.dumps(record) + "\n")
        rc, err = run_cli(["decode", src, "--output", tmp_path / "d.jsonl"])
        assert rc == 1 and err.startswith(f"convert-datasets decode: error: bad{k}.jsonl:2: ") and message in err
        assert len(err.splitlines()) == 1
        rc, err = run_cli(["decode", src, "--output", tmp_path / "d.jsonl", "--on-error", "skip"])
        assert rc == 0 and "read 2, decoded 1, skipped 1" in err and len(load(tmp_path / "d.jsonl")) == 1


# -- real processes -------------------------------------------------------------------------------------------------

def cli(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "data_converters.cli", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, **kw)


def test_the_issue_example_exits_1_with_one_line_or_counts_under_skip(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_bytes(b'{"id":"a","image":"x.jpg","conversations":[{"from":"human","value":"\xff"}]}\n')
    p = cli("llava", "--input", src, "--output", tmp_path / "o.jsonl", "--on-error", "skip")
    assert p.returncode == 0 and "skipped 1: not UTF-8" in p.stderr and "Traceback" not in p.stderr
    p = cli("llava", "--input", src, "--output", tmp_path / "o.jsonl")
    assert p.returncode == 1 and p.stderr.splitlines() == [
        "convert-datasets: error: r.jsonl:1: not UTF-8 text: byte 0xff at column 69  (use --on-error skip to skip such records)"]


def test_ctrl_c_is_one_line_and_the_same_command_resumes_to_the_same_output(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it, in the middle of a 2-worker conversion."""
    rec = load(FIXTURES / "llava_mix.json")[1]
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for k in range(10_000):
            f.write(json.dumps({**rec, "id": f"r{k}"}) + "\n")
    argv = ["llava", "--input", src, "--image-root", IMAGES, "--output", tmp_path / "o.jsonl", "--workers", 2]
    # SIGINT as a terminal leaves it: a suite started in the background by a non-interactive shell inherits it ignored
    p = subprocess.Popen([sys.executable, "-m", "data_converters.cli", *map(str, argv)], cwd=ROOT, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = tmp_path / "o.jsonl.partial"
    deadline = time.time() + 60
    while time.time() < deadline and (not partial.exists() or partial.stat().st_size < 100_000):
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.splitlines()[-1] == "convert-datasets: interrupted (run the same command again to resume)"
    assert "Traceback" not in err and "BrokenPipe" not in err and "KeyboardInterrupt" not in err, err
    assert partial.exists() and not (tmp_path / "o.jsonl").exists()
    again = cli(*argv)
    assert again.returncode == 0 and "resuming" in again.stderr, again.stderr
    fresh = cli(*argv[:-4], "--output", tmp_path / "fresh.jsonl")
    assert fresh.returncode == 0 and (tmp_path / "o.jsonl").read_bytes() == (tmp_path / "fresh.jsonl").read_bytes()


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path):
    """`convert-datasets decode FILE | head -1` (more output than a pipe holds): status 0, nothing on stderr."""
    from convert_cases import COCO

    assert run_cli(["coco", "--input", COCO, "--output", tmp_path / "rec.jsonl", "--on-error", "skip"])[0] == 0
    assert (tmp_path / "rec.jsonl").stat().st_size > 1 << 17
    p = subprocess.Popen([sys.executable, "-m", "data_converters.cli", "decode", str(tmp_path / "rec.jsonl")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline()
    p.stdout.close()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and err == b"", err

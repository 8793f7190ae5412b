"""Every source on a fixture in its real format: what is read, what is written, what is skipped and why,
and the round trip back to the source's boxes in original pixels for both frames."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_converters.cli import main
from data_converters.kosmos2 import patch_index_to_coordinate
import convert_cases
from test_convert_core import assert_round_trip, load

FIXTURES = Path(__file__).parent / "fixtures" / "convert"


def run(tmp_path, *argv, frame="pad"):
    out = tmp_path / f"out-{frame}.jsonl"
    assert main([str(a) for a in argv] + ["--output", str(out), "--frame", frame, "--on-error", "skip"]) == 0
    return load(out), load(tmp_path / f"out-{frame}.summary.json")


@pytest.fixture(scope="module")
def images(shared_data):
    return shared_data / "coco_mini" / "val2017"


@pytest.fixture(scope="module")
def refer_folder(tmp_path_factory):
    """A refer-toolkit folder built from real COCO annotations (convert_cases.refer_folder): four refs of two
    sentences, the fourth in testA, and a ref whose ann_id instances.json lacks."""
    return convert_cases.refer_folder(tmp_path_factory.mktemp("data") / "refcoco", ((397133, 3), (34417, 1)),
                                      test_a={3}, unknown_ann=True)


@pytest.mark.parametrize("frame", ["pad", "orig"])
def test_refcoco_rec_and_res(tmp_path, refer_folder, images, frame):
    recs, s = run(tmp_path, "refcoco", "--input", refer_folder, "--task", "rec", frame=frame)
    assert s["read"] == 10 and s["written"] == 8 and s["skipped_by_reason"] == {"unknown ann_id": 2}
    assert recs[0]["id"] == "refcoco-unc-ref100-sent0-rec" and recs[0]["getok"]["split"] == "train"
    assert recs[0]["conversations"][0]["value"].endswith("describes: the " + recs[0]["getok"]["expression"].split(" ", 1)[1] + ".")
    assert_round_trip(recs)
    test_a, s = run(tmp_path, "refcoco", "--input", refer_folder / "refs(unc).p", "--split", "testA", frame=frame)
    assert s["read"] == 2 == len(test_a) and {r["getok"]["split"] for r in test_a} == {"testA"}
    if frame == "pad":
        res, s = run(tmp_path, "refcoco", "--input", refer_folder, "--task", "res", "--image-root", images, "--limit", 3,
                     "--superpixels", 100, "--max-points", 5, frame=frame)
        assert s["written"] == 3 and all(r["conversations"][1]["value"].startswith("<seg>") for r in res)
        assert all(r["getok"]["proposals"]["n_segments"] == 100 and 1 <= r["conversations"][1]["value"].count("<grid_") <= 5 for r in res)
        assert all(r["getok"]["mask"]["counts"] for r in res)


def test_refcoco_names_a_missing_split_by(tmp_path, refer_folder, capsys):
    assert main(["refcoco", "--input", str(refer_folder), "--split-by", "google", "--output", str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err
    assert "refs(google).p" in err and "file not found" in err and "refs(unc).p" in err  # says what the folder has


@pytest.mark.parametrize("frame", ["pad", "orig"])
def test_vlm_r1_null_solution_says_no_match(tmp_path, frame):
    recs, s = run(tmp_path, "vlm-r1", "--input", FIXTURES / "vlm_r1.json", frame=frame)
    assert s["written"] == 3
    assert recs[1]["conversations"][1]["value"] == "There is no such object in the image." and recs[1]["getok"]["shapes"] == []
    assert recs[2]["getok"]["shapes"][0]["points"] == [[120.0, 384.0], [316.8, 576.0]]  # 0-1000 of 480 x 640
    assert_round_trip(recs)


@pytest.mark.parametrize("frame", ["pad", "orig"])
def test_shikra(tmp_path, frame):
    recs, s = run(tmp_path, "shikra", "--input", FIXTURES / "shikra.jsonl", frame=frame)
    assert s["written"] == 2 and recs[0]["getok"]["expression"] == "man cooking at the stove"
    assert_round_trip(recs)
    reg, _ = run(tmp_path, "shikra", "--input", FIXTURES / "shikra.jsonl", "--task", "reg", frame=frame)
    assert reg[0]["conversations"][1]["value"] == "man cooking at the stove." and "<box>" in reg[0]["conversations"][0]["value"]
    assert_round_trip(reg)


def test_odvg_detection_and_grounding_lines(tmp_path):
    det, s = run(tmp_path, "odvg", "--input", FIXTURES / "odvg.jsonl", "--task", "det")
    assert s["read"] == 3 and s["written"] == 2 and list(s["skipped_by_reason"]) == ["odvg grounding line, not used by task det"]
    assert [len(r["getok"]["shapes"]) for r in det] == [2, 1] and det[0]["getok"]["expression"] == "person"
    assert_round_trip(det)
    rec, s = run(tmp_path, "odvg", "--input", FIXTURES / "odvg.jsonl", "--task", "rec", frame="orig")
    assert s["written"] == 2 and [len(r["getok"]["shapes"]) for r in rec] == [1, 2]
    assert_round_trip(rec)


def test_flickr30k_phrases_with_boxes(tmp_path):
    recs, s = run(tmp_path, "flickr30k", "--input", FIXTURES / "flickr30k", "--split", "val")
    # 6 phrases: "the yard" is a scene without a box
    assert s["read"] == 6 and s["written"] == 5 and s["skipped_by_reason"] == {"phrase without a box (scene)": 1}
    assert recs[0]["getok"]["expression"] == "Two young guys" and len(recs[0]["getok"]["shapes"]) == 2
    assert recs[0]["image"] == "1000092795.jpg" and recs[0]["getok"]["size"] == [500, 333]
    assert_round_trip(recs)


def test_vg_regions_take_paths_and_sizes_from_image_data(tmp_path):
    recs, s = run(tmp_path, "vg", "--input", FIXTURES / "vg" / "region_descriptions.json", frame="orig")
    assert s["written"] == 3 and recs[0]["getok"]["task"] == "reg"
    assert recs[0]["image"] == "VG_100K_2/1.jpg" and recs[2]["image"] == "VG_100K/107899.jpg" and recs[0]["getok"]["size"] == [800, 600]
    assert recs[0]["conversations"][1]["value"] == "the clock is green in colour."
    assert_round_trip(recs)


def test_qwen_rewrites_ref_box_markup(tmp_path, images):
    recs, s = run(tmp_path, "qwen", "--input", FIXTURES / "qwen.json", "--image-root", images)
    assert s["written"] == 2
    a = recs[0]
    assert a["image"] == "000000397133.jpg" and a["conversations"][0] == {"from": "human", "value": "<image>\nWhere is the man in the white shirt?"}
    assert a["conversations"][1]["value"].startswith("The man in the white shirt <box><grid_") and a["conversations"][1]["value"].endswith("</box> is cooking.")
    assert a["getok"]["shapes"][0]["points"] == [[381.44, 56.791], [449.92, 161.833]]  # (596, 133) / 1000 of 640 x 427
    assert "getok" not in recs[1] and recs[1]["conversations"][1] == {"from": "gpt", "value": "Rice and vegetables."}
    assert_round_trip(recs)


def test_kosmos2_patch_pairs(tmp_path, images):
    recs, s = run(tmp_path, "kosmos2", "--input", FIXTURES / "kosmos2.jsonl", "--image-root", images, frame="orig")
    assert s["written"] == 2
    answer = recs[0]["conversations"][1]["value"]
    assert answer.startswith("An image of a man <box>") and answer.count("<box>") == 3 and "patch_index" not in answer
    x1, y1, x2, y2 = patch_index_to_coordinate(307, 470)
    assert np.allclose(recs[0]["getok"]["shapes"][0]["points"], [[x1 * 640, y1 * 427], [x2 * 640, y2 * 427]], atol=1e-3)
    assert_round_trip(recs)


def test_point_records_carry_the_target_region(tmp_path, refer_folder, images):
    """Pointing is scored as "inside the object": point records keep its mask and box beside the point."""
    recs, _ = run(tmp_path, "refcoco", "--input", refer_folder, "--task", "point", "--image-root", images)
    assert recs
    for r in recs:
        g = r["getok"]
        assert g["mask"]["counts"] and len(g["boxes"]) == 1
        (x, y), = g["shapes"][0]["points"]
        x1, y1, x2, y2 = g["boxes"][0]
        assert x1 <= x <= x2 and y1 <= y <= y2


# -- Kosmos-2 as transformers' own processor writes it ---------------------------------------------------------

# (id, image, caption with <phrase> tags, the boxes Kosmos2Processor is given: patch index pairs or normalised
# (x1, y1, x2, y2), one entry per phrase, a list for a phrase with several boxes)
KOSMOS2_EXAMPLES = [
    ("grit-proc-1", "000000397133.jpg", "<grounding> An image of<phrase> a man</phrase> cooking next to<phrase> two bowls</phrase>.",
     [[(307, 470)], [(640, 710), (650, 720)]]),
    ("grit-proc-2", "000000183709.jpg", "<grounding><phrase> A plate</phrase> of food on<phrase> a table</phrase>.",
     [(0.25, 0.6, 0.66, 0.9), (0.0, 0.5, 1.0, 1.0)]),
]


def kosmos2_processor_records(tokenizer_dir):
    """The kosmos2_processor.jsonl fixture: each caption's markup written by transformers' Kosmos2Processor
    (its text side: preprocess_examples without an image), with the spaces it puts around patch tokens."""
    from transformers import CLIPImageProcessor, Kosmos2Processor, XLMRobertaTokenizer

    processor = Kosmos2Processor(CLIPImageProcessor(), XLMRobertaTokenizer(vocab_file=str(tokenizer_dir / "tokenizer.model")))
    return [{"id": rid, "image": image, "text": processor.preprocess_examples(text, bboxes=boxes)}
            for rid, image, text, boxes in KOSMOS2_EXAMPLES]


def test_kosmos2_fixture_is_what_transformers_processor_writes(tiny_tokenizer_dir):
    fixture = [json.loads(line) for line in (FIXTURES / "kosmos2_processor.jsonl").read_text().splitlines()]
    assert fixture == kosmos2_processor_records(tiny_tokenizer_dir)
    assert "<object> <patch_index_0640> <patch_index_0710> </delimiter_of_multi_objects/> <patch_index_0650>" in fixture[0]["text"]


def test_kosmos2_spaced_markup_converts_exactly_like_the_compact_form(tmp_path, images):
    """The processor's spaced markup and the compact form the model generates give the same boxes: transformers'
    own patch_index_to_coordinate of each pair, in pixels."""
    import re

    from transformers.models.kosmos2.processing_kosmos2 import extract_entities_with_patch_indices, patch_index_to_coordinate

    spaced = [json.loads(line) for line in (FIXTURES / "kosmos2_processor.jsonl").read_text().splitlines()]
    compact = [{**r, "text": re.sub(r"\s*(</?object>|</delimiter_of_multi_objects/>|<patch_index_\d+>)\s*", r"\1", r["text"])} for r in spaced]
    (tmp_path / "compact.jsonl").write_text("".join(json.dumps(r) + "\n" for r in compact))
    recs_spaced, s = run(tmp_path, "kosmos2", "--input", FIXTURES / "kosmos2_processor.jsonl", "--image-root", images, frame="orig")
    assert s["written"] == 2 and s["skipped"] == 0
    recs_compact, _ = run(tmp_path, "kosmos2", "--input", tmp_path / "compact.jsonl", "--image-root", images, frame="orig")
    assert [r["getok"]["shapes"] for r in recs_spaced] == [r["getok"]["shapes"] for r in recs_compact]
    for rec, src in zip(recs_compact, compact):
        w, h = rec["getok"]["size"]
        pairs = [p for _, _, boxes in extract_entities_with_patch_indices(src["text"]) for p in boxes]
        assert len(pairs) == len(rec["getok"]["shapes"]) == src["text"].count("<patch_index_") // 2
        for (a, b), shape in zip(pairs, rec["getok"]["shapes"]):
            x1, y1, x2, y2 = patch_index_to_coordinate(a, b, 32)
            assert np.allclose(shape["points"], [[x1 * w, y1 * h], [x2 * w, y2 * h]], atol=1e-3)
        assert "patch_index" not in json.dumps(rec["conversations"]) and rec["conversations"][1]["value"].count("<box>") == len(pairs)
    assert_round_trip(recs_spaced)

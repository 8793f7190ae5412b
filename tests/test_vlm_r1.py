"""VLM-R1's own REC files, read as they are. tests/fixtures/convert/vlm_r1_rec.jsonl holds records in the shape VLM-R1's
RefCOCO files have (om-ai-lab/VLM-R1#11 shows one: ``problem`` is the whole question, LLaVA-1.5's REC instruction
included, ``normal_caption`` the expression, ``solution`` pixels, ``normalized_solution`` 0-1000, and keys the
converter does not read), with real COCO val2017 boxes; the second record lacks ``normal_caption``."""
import json
from pathlib import Path

import pytest

from convert_cases import DATA, load, run_cli
from llava_getok.records import PROMPTS
from test_convert_core import assert_round_trip

FIXTURE = Path(__file__).parent / "fixtures" / "convert" / "vlm_r1_rec.jsonl"
INSTRUCTION = "Please provide the bounding box coordinate of the region this sentence describes:"
EXPRESSIONS = ["man in the white shirt", "the bottle on the table", "woman with the handbag"]


def convert(tmp_path, *argv, source=FIXTURE):
    out = tmp_path / "out.jsonl"
    rc, err = run_cli(["vlm-r1", "--input", source, "--image-root", DATA / "coco_mini", *argv, "--output", out])
    assert rc == 0, err
    return load(out)


@pytest.mark.parametrize("frame", ["pad", "orig"])
def test_the_prompt_says_the_instruction_once_around_the_expression(tmp_path, frame):
    records = convert(tmp_path, "--frame", frame)
    assert [r["getok"]["expression"] for r in records] == EXPRESSIONS  # the second from problem, less the instruction
    for record, expression in zip(records, EXPRESSIONS):
        question = record["conversations"][0]["value"]
        assert question == "<image>\n" + PROMPTS["rec"].format(expression=expression)
        assert question.count(INSTRUCTION) == 1
    source = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert records[0]["getok"]["shapes"][0]["points"] == [source[0]["solution"][:2], source[0]["solution"][2:]]
    assert_round_trip(records)


def test_reg_and_point_use_the_expression_not_the_question(tmp_path):
    reg = convert(tmp_path, "--task", "reg")
    assert [r["conversations"][1]["value"] for r in reg] == [e + "." for e in EXPRESSIONS]
    point = convert(tmp_path, "--task", "point")
    assert point[1]["conversations"][0]["value"] == "<image>\n" + PROMPTS["point"].format(expression=EXPRESSIONS[1])


def test_a_problem_without_the_instruction_is_the_expression(tmp_path):
    record = json.loads(FIXTURE.read_text().splitlines()[1])
    record["problem"] = "the green bottle"
    (tmp_path / "in.json").write_text(json.dumps([record]))
    out = convert(tmp_path, source=tmp_path / "in.json")
    assert out[0]["conversations"][0]["value"] == "<image>\n" + PROMPTS["rec"].format(expression="the green bottle")


@pytest.mark.parametrize("change, field, message", [
    ({"normal_caption": 5}, "normal_caption", "expected a string, got a number"),
    ({"normal_caption": ["the man"]}, "normal_caption", "expected a string, got a list"),
    ({"normal_caption": None, "problem": None}, "normal_caption", "missing (and no problem)"),
    ({"normal_caption": None, "problem": {"text": "the man"}}, "problem", "expected a string, got an object"),
    ({"normal_caption": "  "}, "normal_caption", "missing or empty"),
    ({"solution": "388.66, 69.92"}, "solution", "expected"),
])
def test_bad_records_are_one_line_naming_file_record_and_field(tmp_path, change, field, message):
    lines = FIXTURE.read_text().splitlines()
    record = {**json.loads(lines[0]), **change}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    rc, err = run_cli(["vlm-r1", "--input", path, "--output", tmp_path / "fail.jsonl"])
    lines_out = err.splitlines()
    assert rc == 1 and len(lines_out) == 1 and "Traceback" not in err, err
    assert f"{path.name}:1: field '{field}': {message}" in lines_out[0], err  # file, record (its line), field
    rc, err = run_cli(["vlm-r1", "--input", path, "--output", tmp_path / "skip.jsonl", "--on-error", "skip"])
    summary = load(tmp_path / "skip.summary.json")
    assert rc == 0 and summary["written"] == 2 and summary["skipped"] == 1, err

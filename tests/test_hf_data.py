"""llava_getok.hf, before training: the tiny models of both families load through transformers' own classes, and
converted records become the model's chat messages and processor inputs with labels on the assistant turns only."""
import json

import pytest
import torch
from hf_helpers import CFG

FRAMES = {"qwen": "orig", "llava": "pad"}


@pytest.fixture(scope="module")
def model_dirs(tiny_qwen_dir, tiny_llava_hf_dir):
    return {"qwen": tiny_qwen_dir, "llava": tiny_llava_hf_dir}


def with_getok(model_dir):
    from llava_getok.hf.family import load_processor
    from llava_getok.training.tokens import add_getok_tokens

    processor = load_processor(model_dir)
    ids = add_getok_tokens(processor.tokenizer, CFG)
    return processor, ids


def multi_turn(record):
    """The record with a second question and an answer that mixes text and GETok tokens."""
    second = "<box><grid_1_2><off_0_0><grid_3_4><off_1_1></box> is the other one"
    return {**record, "conversations": record["conversations"] + [
        {"from": "human", "value": "And the other one?"}, {"from": "gpt", "value": second}]}


def labelled_runs(item):
    runs, run = [], []
    for token, label in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def test_tiny_models_load_through_transformers_auto_classes(tiny_qwen_dir, tiny_qwen_tied_dir, tiny_llava_hf_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_getok.frames import processor_frame
    from llava_getok.hf.family import family_of, load_processor
    from llava_getok.hf.prepare import tied

    qwen = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    tied_qwen = AutoModelForImageTextToText.from_pretrained(tiny_qwen_tied_dir)
    llava = AutoModelForImageTextToText.from_pretrained(tiny_llava_hf_dir)
    assert type(qwen).__name__ == "Qwen2_5_VLForConditionalGeneration" and not tied(qwen) and tied(tied_qwen)
    assert type(llava).__name__ == "LlavaForConditionalGeneration"
    assert [family_of(d).name for d in (tiny_qwen_dir, tiny_llava_hf_dir)] == ["qwen2.5-vl", "llava-hf"]
    # Qwen's special tokens are single ids where the config says; the processor class on disk is Qwen's own
    tok = load_processor(tiny_qwen_dir).tokenizer
    assert tok.convert_tokens_to_ids("<|image_pad|>") == qwen.config.image_token_id
    assert tok("<|im_start|>user\nhi<|im_end|>").input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    saved = json.loads((tiny_qwen_dir / "preprocessor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"
    assert saved["image_processor_type"] == "Qwen2VLImageProcessor"
    llava_processor = AutoProcessor.from_pretrained(tiny_llava_hf_dir)
    assert type(llava_processor).__name__ == "LlavaProcessor" and llava_processor.image_processor.do_pad
    assert [processor_frame(load_processor(d)) for d in (tiny_qwen_dir, tiny_llava_hf_dir)] == ["orig", "pad"]


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_labels_are_exactly_the_assistant_answers_of_every_turn(family, model_dirs, hf_grounding):
    from llava_getok.hf.data import encode

    processor, ids = with_getok(model_dirs[family])
    data = hf_grounding[FRAMES[family]]
    record = multi_turn(json.loads(data.read_text())[0])
    item = encode(processor, record, data.parent / "images")
    answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    runs = labelled_runs(item)
    end = processor.tokenizer.eos_token  # the chat template's end of turn: <|im_end|>, </s>
    decoded = [processor.tokenizer.decode(r, skip_special_tokens=False) for r in runs]
    assert decoded == [a + end for a in answers], decoded
    getok_ids = set(ids)
    for run, answer in zip(runs, answers):  # every GETok token of an answer is one labelled id
        assert sum(i in getok_ids for i in run) == sum(answer.count(t) for t in CFG.tokens())
    # the prompt, the image tokens and the question of the second turn are not labelled
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    image_positions = item["input_ids"] == image_id
    assert image_positions.sum() > 1 and (item["labels"][image_positions] == -100).all()
    assert item["pixel_values"].shape[0] >= 1 and item["labels"].shape == item["input_ids"].shape


def test_bad_records_are_refused_in_one_line(tiny_qwen_dir):
    from llava_getok.hf.data import record_messages
    from llava_getok.records import RecordsError

    good = {"id": "r1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                                                             {"from": "gpt", "value": "There."}]}
    record_messages(good)
    bad = [({**good, "conversations": [{"from": "human", "value": "<image>\n<image> x"}, good["conversations"][1]]},
            "field 'conversations': 2 '<image>' placeholders for one image"),
           ({**good, "conversations": [good["conversations"][0], {"from": "bot", "value": "x"}]},
            "field 'conversations[1]'"),
           ({**good, "conversations": good["conversations"][:1]}, "no gpt turn"),
           ({"id": "r2", "conversations": good["conversations"]}, "1 '<image>' placeholders for no image")]
    for record, message in bad:
        with pytest.raises(RecordsError) as e:
            record_messages(record)
        assert f"record {record['id']}: " in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_missing_image_names_the_record(tiny_llava_hf_dir, hf_grounding, tmp_path):
    from llava_getok.hf.data import encode

    processor, _ = with_getok(tiny_llava_hf_dir)
    record = json.loads(hf_grounding["pad"].read_text())[0]
    with pytest.raises(FileNotFoundError, match=f"record {record['id']}: field 'image'"):
        encode(processor, record, tmp_path)


def test_collator_pads_right_and_concatenates_the_images(model_dirs, hf_grounding):
    from llava_getok.hf.data import Collator, encode

    for family, model_dir in model_dirs.items():
        processor, _ = with_getok(model_dir)
        data = hf_grounding[FRAMES[family]]
        records = json.loads(data.read_text())
        items = [encode(processor, multi_turn(records[0]), data.parent / "images"),
                 encode(processor, records[1], data.parent / "images")]
        batch = Collator(processor.tokenizer.pad_token_id)(items)
        n = [len(x["input_ids"]) for x in items]
        assert batch["input_ids"].shape == (2, max(n)) and batch["attention_mask"][1].sum() == n[1]
        assert (batch["labels"][1, n[1]:] == -100).all()
        assert (batch["input_ids"][1, n[1]:] == processor.tokenizer.pad_token_id).all()
        assert torch.equal(batch["pixel_values"], torch.cat([x["pixel_values"] for x in items]))


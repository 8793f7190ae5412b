"""Location tokens are content, not control (spec section 2 and section 10, "Location tokens are content"): decoding
with ``skip_special_tokens=True`` keeps them, and every converted record tokenizes to exactly the ids it had when
they were added as special tokens, on the tiny session tokenizer and on the real 32,000-piece LLaMA-layout
vocabulary (Mistral-7B v0.1's sentencepiece model from the mistral_common wheel that scripts/setup_env.sh downloads,
as in tests/test_legacy_tokenizer.py), slow and fast. A checkpoint saved when they were special loads with the same
ids and its answers survive the decoders too.

The records are real converted data: COCO fixtures through ``convert-datasets`` (rec in multi-turn conversations,
det, reg with tokens in the question, point, res, refine's two turns, bins), the demo's shapes, and LLaVA / Kosmos-2 /
Qwen-VL conversations with boxes inside free text; their ids are LLaVA's own preprocessing under four templates.
"""
import copy
import functools
import json
import pickle
import zipfile
from pathlib import Path

import pytest

import llava_getok as gt
from llava_getok import formats

REPO = Path(__file__).resolve().parents[1]
DOWNLOADS = REPO / "tests" / "fixtures" / "downloads"
CFG = gt.GETokConfig(grid=32)  # convert-datasets' default lattice: 1,042 tokens
BINS = formats.BinsFormat(bins=100)
TEMPLATES = ("getok_v1", "getok_llama_2", "getok_mistral_instruct", "getok_plain")
# text right before and after a location token, a newline, the start of an answer, a turn's end
AROUND = ("{a}", " {a}", "x{a}", "\n{a}", "ASSISTANT: {a}</s>", "[/INST] {a} </s>", "{a}x", "{a} x", "{a}\n", "{a}.")


def add_the_old_way(tokenizer, fmt):
    """What add_getok_tokens did before: unnormalised, unstripped added *special* tokens."""
    from transformers import AddedToken

    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
                                       for t in fmt.tokens()]}, replace_additional_special_tokens=False)


def load_tokenizer(folder, fast=False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=fast, legacy=False)
    tokenizer.pad_token = tokenizer.unk_token  # what LLaVA's train() sets
    return tokenizer


@functools.cache
def old_and_new(folder, fast=False):
    """The same tokenizer folder with the location tokens of GETok (grid 32) and bins (K = 100) added the old way
    and as content (made once per folder; the tests only read them)."""
    from llava_getok.training.tokens import add_getok_tokens

    old, new = load_tokenizer(folder, fast), load_tokenizer(folder, fast)
    for fmt in (CFG, BINS):
        add_the_old_way(old, fmt)
        assert add_getok_tokens(new, fmt) == old.convert_tokens_to_ids(list(fmt.tokens()))
    return old, new


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    wheels = sorted(DOWNLOADS.glob("mistral_common-*.whl"))
    if not wheels:
        pytest.skip(f"no mistral_common wheel in {DOWNLOADS}: `bash scripts/setup_env.sh` downloads it from PyPI")
    out = tmp_path_factory.mktemp("llama-32k")
    with zipfile.ZipFile(wheels[-1]) as z:
        (out / "tokenizer.model").write_bytes(z.read("mistral_common/data/tokenizer.model.v1"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 4096}))
    return out


@pytest.fixture(params=["tiny", "llama-32k"])
def vocabulary(request, tiny_tokenizer_dir):
    return tiny_tokenizer_dir if request.param == "tiny" else request.getfixturevalue("llama_dir")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> records, each written by convert-datasets from the repository's fixtures."""
    from convert_cases import COCO, FIXTURES, IMAGES, coco_subset, load, run_cli, shapes_folder

    out = tmp_path_factory.mktemp("converted")
    coco = out / "instances.json"
    coco.write_text(json.dumps(coco_subset(image_ids=(34417, 183709, 397133), limit=12)))
    on_coco = ["coco", "--input", coco, "--image-root", IMAGES]
    jobs = {
        "rec in turns of 3": [*on_coco, "--task", "rec", "--group-turns", "3"],
        "det": [*on_coco, "--task", "det"],
        "reg": [*on_coco, "--task", "reg"],
        "point": [*on_coco, "--task", "point"],
        "res": [*on_coco, "--task", "res"],
        "refine": [*on_coco, "--task", "refine"],
        "bins det": [*on_coco, "--task", "det", "--format", "bins", "--bins", "100"],
        "bins rec": [*on_coco, "--task", "rec", "--format", "bins", "--bins", "100"],
        "llava": ["llava", "--input", FIXTURES / "llava_mix.json", "--image-root", IMAGES],
        "kosmos2": ["kosmos2", "--input", FIXTURES / "kosmos2.jsonl", "--image-root", IMAGES],
        "qwen": ["qwen", "--input", FIXTURES / "qwen.json", "--image-root", IMAGES],
    }
    shapes = shapes_folder(out / "shapes")  # the demo's data, drawn small
    jobs["shapes in turns of 3"] = ["shapes", "--input", shapes, "--image-root", shapes, "--group-turns", "3"]
    records = {}
    for name, argv in jobs.items():
        path = out / (name.replace(" ", "_") + ".json")
        rc, err = run_cli([*argv, "--output", path])
        assert rc == 0, (name, err)
        records[name] = load(path)
    return records


def answers(records):
    return [t["value"] for r in records for t in r["conversations"] if t["from"] == "gpt"]


def location_count(text):
    return sum(1 for _ in formats.LOCATION_TOKEN_RE.finditer(text))


def llava_preprocess(record, tokenizer, template):
    """LLaVA's own preprocessing of one record under ``template``: (input_ids, labels) as lists."""
    from llava import conversation
    from llava.train import train as llava_train

    from llava_getok.llava.check import _DataArgs
    from llava_getok.llava.templates import resolve_template

    sources = copy.deepcopy([record["conversations"]])
    if "image" in record:
        sources = llava_train.preprocess_multimodal(sources, _DataArgs())
    saved = conversation.default_conversation
    conversation.default_conversation = resolve_template(template)
    try:
        data = llava_train.preprocess(sources, tokenizer, has_image="image" in record)
    finally:
        conversation.default_conversation = saved
    return data["input_ids"][0].tolist(), data["labels"][0].tolist()


def test_every_converted_record_tokenizes_to_the_ids_it_had_with_special_tokens(vocabulary, converted, capsys):
    """LLaVA's preprocessing (input ids and labels) of every record under four templates, and each answer alone and
    in the contexts of AROUND, give the same ids whether the location tokens are special or content."""
    gt.register()
    old, new = old_and_new(vocabulary)
    compared = 0
    for name, records in converted.items():
        for record in records:
            for template in TEMPLATES:
                if template == "getok_plain" and (len(record["conversations"]) != 2 or "image" not in record):
                    continue  # LLaVA's plain template: one image, one answer
                want = llava_preprocess(record, old, template)
                assert llava_preprocess(record, new, template) == want, (name, record["id"], template)
                compared += 1
        for answer in answers(records):
            for context in AROUND:
                text = context.format(a=answer)
                assert new(text).input_ids == old(text).input_ids, (name, text)
    assert "tokenization mismatch" not in capsys.readouterr().out
    assert compared > 150
    assert sum(location_count(a) for rs in converted.values() for a in answers(rs)) > 300


def test_decoders_keep_location_tokens_and_spaced_and_unspaced_texts_parse_alike(tiny_tokenizer_dir, converted):
    """Every decoding of an answer's ids (skip_special_tokens True / False, with and without spaces between added
    tokens, slow and fast tokenizer) keeps its location tokens and parses to the answer's shapes; with the old
    special tokens, skip_special_tokens=True dropped them all."""
    old, slow = old_and_new(tiny_tokenizer_dir)
    fast = old_and_new(tiny_tokenizer_dir, fast=True)[1]
    checked = 0
    for name, records in converted.items():
        fmt = BINS if name.startswith("bins") else CFG
        for answer in answers(records):
            want = [(s.kind, s.points) for s in formats.parse(answer, fmt).shapes]
            if not want or (fmt is BINS and len(want) > 1):
                continue  # bins: a slow decoding loses the space between two shapes (spec section 10)
            ids = slow(answer, add_special_tokens=False).input_ids
            assert fast(answer, add_special_tokens=False).input_ids == ids
            texts = [slow.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
                     for skip in (True, False) for spaces in (True, False)]
            texts.append(fast.decode(ids, skip_special_tokens=True))
            for text in texts:
                assert location_count(text) == location_count(answer), (answer, text)
                assert [(s.kind, s.points) for s in formats.parse(text, fmt).shapes] == want, (answer, text)
            assert location_count(old.decode(ids, skip_special_tokens=True)) == 0
            checked += 1
    assert checked > 40


def test_fast_tokenizers_give_the_same_ids_either_way(llama_dir, converted):
    """The fast (Rust) LLaMA tokenizer, converted from the same sentencepiece model: content and special location
    tokens give the same ids, and decoding with skip_special_tokens=True writes the answer back exactly."""
    old, new = old_and_new(llama_dir, fast=True)
    assert new.is_fast
    for records in converted.values():
        for record in records:
            for turn in record["conversations"]:
                for context in AROUND[:5]:
                    text = context.format(a=turn["value"])
                    assert new(text).input_ids == old(text).input_ids, text
    for answer in answers(converted["det"]) + answers(converted["bins det"]):
        assert new.decode(new(answer, add_special_tokens=False).input_ids, skip_special_tokens=True) == answer


def test_a_tokenizer_with_special_location_tokens_is_refused_and_turned_into_content(tiny_tokenizer_dir):
    from llava_getok.training.tokens import check_token_ids, location_tokens_as_content

    tok = load_tokenizer(tiny_tokenizer_dir)
    add_the_old_way(tok, CFG)
    ids = tok.convert_tokens_to_ids(list(CFG.tokens()))
    with pytest.raises(ValueError, match="is a special token: decoding it .* gives ''.*location_tokens_as_content"):
        check_token_ids(tok, CFG)
    assert location_tokens_as_content(tok, CFG) == len(CFG.tokens())
    assert location_tokens_as_content(tok, CFG) == 0  # idempotent
    check_token_ids(tok, CFG)
    assert tok.convert_tokens_to_ids(list(CFG.tokens())) == ids and tok.all_special_tokens == ["<s>", "</s>", "<unk>"]
    for copied in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):  # what DataLoader workers and trl do
        assert copied("<box><grid_0_0></box>").input_ids == tok("<box><grid_0_0></box>").input_ids
        assert copied.convert_ids_to_tokens(copied("<box>").input_ids) == ["<s>", "<box>"]


@pytest.fixture(scope="module")
def old_checkpoint(tiny_llava_dir, tmp_path_factory):
    """A GETok checkpoint as earlier versions saved it: the location tokens special in its tokenizer files."""
    import torch

    from llava_getok.llava import register
    from llava_getok.llava.builder import load_getok_checkpoint
    from llava_getok.training.sidecar import Sidecar
    from llava_getok.training.tokens import init_getok_rows, resize_embeddings
    from llava_getok.rl.checkpoint import save_getok_checkpoint

    register()
    torch.manual_seed(0)
    cfg = gt.GETokConfig(grid=8)
    tok, model, _, _ = load_getok_checkpoint(tiny_llava_dir)
    add_the_old_way(tok, cfg)
    ids = tok.convert_tokens_to_ids(list(cfg.tokens()))
    init_getok_rows(model, ids, cfg, n_old=resize_embeddings(model, len(tok)))
    sidecar = Sidecar.of(cfg, ids, vocab_size=len(tok), tokenizer_legacy=False, frame="pad", kind="full",
                         processor={"image_aspect_ratio": "pad"})
    out = save_getok_checkpoint(model, tok, tmp_path_factory.mktemp("old") / "getok-old", sidecar, None,
                                quantized=False, final=True)
    # and its sidecar as those versions wrote it (schema 1)
    (out / "getok_config.json").write_text(json.dumps({
        "getok": cfg.to_dict(), "tokens": list(cfg.tokens()), "token_ids": ids, "vocab_size": len(tok),
        "tokenizer_legacy": False, "image_aspect_ratio": "pad", "frame": "pad", "kind": "full", "base_model": None,
        "init": "sincos2d", "loss": {}, "vision_tower_trained": False, "format": None, "format_version": 1}))
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert "<box>" in saved["additional_special_tokens"]  # written the old way
    return out, cfg, ids


def test_a_checkpoint_saved_with_special_tokens_loads_with_the_same_ids_and_its_answers_survive(
        old_checkpoint, converted, tmp_path):
    from llava.model.builder import load_pretrained_model

    from llava_getok.llava.check import main as check_data
    from llava_getok.llava.tiny import make_grounding_data

    folder, cfg, ids = old_checkpoint
    old = load_tokenizer(folder)  # as transformers alone loads it: special
    tokenizer, _, _, _ = load_pretrained_model(str(folder), None, "anything", device="cpu")  # LLaVA's, hooked
    assert tokenizer.convert_tokens_to_ids(list(cfg.tokens())) == ids
    assert not any(t in tokenizer.all_special_tokens for t in cfg.tokens())
    answer = "<box><grid_0_3><off_0_0><grid_7_5><off_1_0></box>"
    for context in AROUND:
        text = context.format(a=answer)
        assert tokenizer(text).input_ids == old(text).input_ids
    kept = tokenizer.decode(tokenizer(f"the tv is at {answer} ok").input_ids, skip_special_tokens=True)
    assert [s.points for s in gt.parse(kept, cfg).shapes] == [s.points for s in gt.parse(answer, cfg).shapes]
    assert location_count(old.decode(tokenizer(answer).input_ids, skip_special_tokens=True)) == 0
    # check-data on such a checkpoint, and saving its tokenizer again writes content tokens
    data = make_grounding_data(tmp_path, REPO / "tests" / "fixtures" / "data" / "coco_mini", cfg, n_records=2)
    assert check_data([str(data), "--model-path", str(folder)]) == 0
    tokenizer.save_pretrained(tmp_path / "resaved")
    again = load_tokenizer(tmp_path / "resaved")
    assert again.convert_tokens_to_ids(list(cfg.tokens())) == ids and "<box>" not in again.all_special_tokens

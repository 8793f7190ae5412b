"""A LLaMA tokenizer folder without ``"legacy": false`` in its ``tokenizer_config.json`` (transformers then loads it
with legacy=True, which puts stray '▁' pieces around added tokens) on the real 32,000-piece LLaMA-layout vocabulary:
GETok switches it to legacy=False wherever it loads one (``add_getok_tokens``: training and ``check-data --grid``;
``check-data`` itself; the builder), says so in one line, and records it in the checkpoint; every GETok token
stays one id and LLaVA's own preprocessing reports no mismatch.

The vocabulary is Mistral-7B v0.1's sentencepiece model (LLaMA layout: <unk>, <s>, </s> = 0-2, byte fallback),
read out of the mistral_common wheel (Apache-2.0) that scripts/setup_env.sh downloads from PyPI into
tests/fixtures/downloads (never installed: its pins would downgrade numpy).
"""
import copy
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import llava_getok as gt

REPO = Path(__file__).resolve().parents[1]
DOWNLOADS = REPO / "tests" / "fixtures" / "downloads"
CFG = gt.GETokConfig(grid=32)  # the paper's grid: 1,042 GETok tokens
SWITCHED = "using it with legacy=False"
# a LLaMA folder as the hub had them before transformers#24565: no "legacy" key
OLD_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048}


def write_old_tokenizer_files(folder: Path) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(OLD_CONFIG))
    (folder / "special_tokens_map.json").write_text(json.dumps({k: OLD_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token")}))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    wheels = sorted(DOWNLOADS.glob("mistral_common-*.whl"))
    if not wheels:
        pytest.skip(f"no mistral_common wheel in {DOWNLOADS}: `bash scripts/setup_env.sh` downloads it from PyPI")
    out = tmp_path_factory.mktemp("llama-tokenizer")
    with zipfile.ZipFile(wheels[-1]) as z:
        (out / "tokenizer.model").write_bytes(z.read("mistral_common/data/tokenizer.model.v1"))
    write_old_tokenizer_files(out)
    return out


@pytest.fixture(scope="module")
def records(tmp_path_factory, shared_data):
    """Real COCO boxes at grid 32, plus a two-turn conversation (LLaVA's round arithmetic for later rounds)."""
    from llava_getok.llava.tiny import make_grounding_data

    data = make_grounding_data(tmp_path_factory.mktemp("rec32"), shared_data / "coco_mini", CFG, n_records=3)
    recs = json.loads(data.read_text())
    two = copy.deepcopy(recs[0])
    two["id"] += "-two-turns"
    two["conversations"] += [{"from": "human", "value": "And the other one?"}, recs[1]["conversations"][1]]
    data.write_text(json.dumps(recs + [two]))
    return data


def load(folder, **kw):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, use_fast=False, **kw)


def test_a_legacy_llama_tokenizer_is_switched_once_and_every_getok_token_stays_one_id(llama_dir, capsys):
    from llava_getok.training.tokens import add_getok_tokens, check_token_ids

    tok = load(llama_dir)
    assert tok.legacy is True and len(tok) == 32000  # what transformers does with such a folder
    # as it loaded, the GETok tokens get stray pieces: what stopped check-data and training before
    plain = load(llama_dir)
    plain.add_special_tokens({"additional_special_tokens": list(CFG.tokens())}, replace_additional_special_tokens=False)
    with pytest.raises(ValueError, match="stray '\u2581' piece"):
        check_token_ids(plain, CFG)

    ids = add_getok_tokens(tok, CFG)
    assert add_getok_tokens(tok, CFG) == ids  # a second call neither adds nor says anything
    said = [line for line in capsys.readouterr().err.splitlines() if SWITCHED in line]
    assert len(said) == 1 and str(llama_dir) in said[0]
    assert tok.legacy is False and tok.init_kwargs["legacy"] is False  # save_pretrained writes "legacy": false
    assert ids == list(range(32000, 32000 + len(CFG.tokens())))
    check_token_ids(tok, CFG, tokens=list(CFG.tokens()))  # every one of the 1,042 tokens, in every context
    # the switch is exactly what loading with legacy=False gives
    reference = load(llama_dir, legacy=False)
    assert add_getok_tokens(reference, CFG) == ids
    for text in ("USER: <image>\nWhere is the cat? ASSISTANT: <box><grid_3_4><off_0_1><grid_30_31><off_-1_0></box></s>",
                 " leading space", "a <grid_0_0> b\n<point><grid_7_7></point>", "Zürich 42 <delete>"):
        assert tok(text).input_ids == reference(text).input_ids, text


def test_check_data_on_a_legacy_folder_switches_it_and_llava_preprocessing_has_no_mismatch(llama_dir, records, capsys):
    from llava_getok.llava.check import main

    for version in ("getok_v1", "getok_mistral_instruct"):
        assert main([str(records), "--model-path", str(llama_dir), "--grid", "32", "--version", version]) == 0
        out, err = capsys.readouterr()
        assert "| problems | 0 |" in out and "| checked | 4 |" in out
        assert "| location tokens in answers | 30 |" in out  # 3 boxes + 2 in the two-turn record, 6 tokens each
        assert sum(SWITCHED in line for line in err.splitlines()) == 1 and "Traceback" not in err


def test_training_from_a_legacy_folder_records_it_and_the_checkpoint_reloads_non_legacy(llama_dir, records, tmp_path):
    from llava_getok.training.sidecar import read_sidecar
    from llava_getok.llava.tiny import build_tiny_llava

    model_dir = build_tiny_llava(tmp_path / "tiny-llava-32k", llama_dir)
    write_old_tokenizer_files(model_dir)  # the model folder as a user has it: no "legacy" key
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llava_getok.train", "--model_name_or_path", str(model_dir), "--version", "getok_v1",
           "--data_path", str(records), "--image_folder", str(records.parent / "images"),
           "--vision_tower", str(model_dir / "vision_tower"), "--mm_projector_type", "mlp2x_gelu",
           "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad",
           "--getok_grid", "32", "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "2",
           "--save_strategy", "no", "--report_to", "none", "--model_max_length", "256", "--dataloader_num_workers", "0",
           "--use_cpu", "True", "--disable_tqdm", "True"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sum(SWITCHED in line for line in proc.stderr.splitlines()) == 1
    assert "stray" not in proc.stderr and "Traceback" not in proc.stderr
    sidecar = read_sidecar(out)
    assert sidecar.tokenizer_legacy is False and sidecar.token_ids[0] == 32000
    assert json.loads((out / "tokenizer_config.json").read_text())["legacy"] is False

    # a checkpoint whose tokenizer_config.json lost the flag (copied in by hand) still loads non-legacy
    saved = json.loads((out / "tokenizer_config.json").read_text())
    del saved["legacy"]
    (out / "tokenizer_config.json").write_text(json.dumps(saved))
    gt.register()
    from llava.model.builder import load_pretrained_model

    tokenizer, model, _, _ = load_pretrained_model(str(out), None, "checkpoint", device="cpu")
    assert tokenizer.legacy is False
    assert tokenizer.convert_tokens_to_ids(list(CFG.tokens())) == sidecar.token_ids
    assert model.get_input_embeddings().weight.shape[0] == sidecar.vocab_size

"""`python -m llava_getok.train` on the tiny LLaVA (full, LoRA, 4-bit QLoRA, ZeRO-2), then the builder hook
loads the checkpoints back: same GETok ids, same logits, generate returns GETok tokens.

Full and LoRA run in this process through ``llava_getok.train.main`` (the trainer is kept to compare logits
before save and after load); QLoRA runs as ``python -m llava_getok.train`` and ZeRO-2 through the deepspeed
launcher, as users run them. Cost on 2 cores: ~15 s per run, ZeRO-2 ~30 s (plus a one-off ~40 s to compile
DeepSpeed's CPU communication op in a fresh environment).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llava_getok as gt

GRID = 8
CFG = gt.GETokConfig(grid=GRID)
REPO = Path(__file__).resolve().parents[1]
LOGIT_TOL = 1e-5  # float32 on CPU; the same weights through a different load path


@pytest.fixture(scope="module")
def train_data(tmp_path_factory, shared_data):
    from llava_getok.llava.tiny import make_grounding_data

    return make_grounding_data(tmp_path_factory.mktemp("rec"), shared_data / "coco_mini", CFG, n_records=2)


def train_argv(model_dir, data, out, *extra, steps=8):
    return [
        "--model_name_or_path", str(model_dir), "--version", "getok_v1",
        "--data_path", str(data), "--image_folder", str(data.parent / "images"),
        "--vision_tower", str(model_dir / "vision_tower"), "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--getok_grid", str(GRID),
        "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
        "--learning_rate", "3e-3", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1",
        "--logging_steps", "1", "--report_to", "none", "--model_max_length", "256",
        "--dataloader_num_workers", "0", "--seed", "0", "--disable_tqdm", "True", *extra,
    ]


def train_in_process(argv):
    """Run the real entry point here and keep the trainer it built."""
    from llava_getok import train as entry
    from llava_getok.llava.trainer import GETokTrainer

    kept = []
    original = GETokTrainer.train

    def keep(self, *a, **k):
        kept.append(self)
        return original(self, *a, **k)

    saved_argv = sys.argv
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GETokTrainer, "train", keep)
        try:
            entry.main(argv + ["--use_cpu", "True"])
        finally:
            sys.argv = saved_argv
    return kept[0]


def run_cli(cmd, cwd=REPO, timeout=400):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    if os.environ.get("GETOK_SHOW_CLI"):
        print(proc.stdout[-6000:], proc.stderr[-6000:])
    return proc


def losses(out_dir):
    history = json.loads((Path(out_dir) / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h], history


def rows_file(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "getok_rows.safetensors"))


def base_matrices(model_dir):
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    return state["model.embed_tokens.weight"], state["lm_head.weight"]


def probe_inputs(tokenizer, processor, model_config, data):
    from llava import conversation
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    record = json.loads(data.read_text())[0]
    conv = conversation.conv_templates["getok_v1"].copy()
    conv.append_message(conv.roles[0], record["conversations"][0]["value"])
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    image = Image.open(data.parent / "images" / record["image"]).convert("RGB")
    return ids, process_images([image], processor, model_config).float()


def logits_of(model, ids, images):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, images=images).logits.float()


def load(path, base=None, **kw):
    gt.register()
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(str(path), None if base is None else str(base), "anything", device="cpu", **kw)


# -- full fine-tuning -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tiny_llava_dir, train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    # 32 steps at a constant lr: enough for the answer's GETok tokens to be what greedy decoding emits
    trainer = train_in_process(train_argv(tiny_llava_dir, train_data, out, "--unfreeze_mm_vision_tower",
                                          "--save_steps", "8", "--save_total_limit", "4",
                                          "--lr_scheduler_type", "constant", steps=32))
    return trainer, out


def test_full_training_loss_falls_and_rows_and_tower_train(full_run, tiny_llava_dir):
    trainer, out = full_run
    values, history = losses(out)
    assert all(map(torch.isfinite, map(torch.tensor, values))) and len(values) == 32
    assert values[-1] < values[0] * 0.8, values
    assert {"loss_lm", "loss_grid", "loss_box"} <= set(history[0])
    sidecar = json.loads((out / "getok_config.json").read_text())
    assert sidecar["kind"] == "full" and sidecar["vision_tower_trained"] and sidecar["format"]["grid"] == GRID
    assert sidecar["template"] == "getok_v1" and sidecar["settings"]["grid"] == GRID  # every option of the run
    assert sidecar["settings"]["train_vision_tower"] and sidecar["processor"] == {"image_aspect_ratio": "pad"}
    ids = sidecar["token_ids"]
    assert ids == trainer.getok.ids and sidecar["vocab_size"] == trainer.model.get_input_embeddings().weight.shape[0]
    # GETok rows moved away from their initialisation (checkpoint-8 vs the end) and the CLIP tower trained
    assert not torch.equal(rows_file(out / "checkpoint-8")["input_rows"], rows_file(out)["input_rows"])
    from safetensors.torch import load_file

    tower = load_file(str(out / "getok_vision_tower.safetensors"))
    original = load_file(str(tiny_llava_dir / "vision_tower" / "model.safetensors"))
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(tower[key], original[key])


def test_full_checkpoint_round_trip_same_ids_logits_and_generates_getok(full_run, train_data):
    trainer, out = full_run
    tokenizer, model, processor, _ = load(out)
    assert model.dtype == torch.float32 and model.get_vision_tower().vision_tower.dtype == torch.float32
    assert tokenizer.convert_tokens_to_ids(list(CFG.tokens())) == trainer.getok.ids
    ids, images = probe_inputs(tokenizer, processor, model.config, train_data)
    before = logits_of(trainer.model, ids, images)
    after = logits_of(model, ids, images)
    assert (before - after).abs().max() <= LOGIT_TOL
    out_ids = model.generate(ids, images=images, do_sample=False, max_new_tokens=8)
    getok_ids = set(trainer.getok.ids)
    assert any(int(i) in getok_ids for i in out_ids[0]), tokenizer.convert_ids_to_tokens(out_ids[0])
    # an intermediate checkpoint loads on its own too
    _, mid, _, _ = load(out / "checkpoint-8")
    assert mid.get_input_embeddings().weight.shape == model.get_input_embeddings().weight.shape


def test_seed_reproduces_a_run_whose_base_has_no_projector_yet(tiny_tokenizer_dir, train_data, tmp_path):
    """LLaVA's train() builds the projector (and LoRA's adapters) before the Trainer seeds: two runs of one command
    differed from their first logged loss. --seed now seeds torch first: the runs agree exactly."""
    from llava_getok.llava.tiny import build_tiny_llava

    base = build_tiny_llava(tmp_path / "vicuna-like-llava", tiny_tokenizer_dir, projector=False)
    from safetensors.torch import load_file

    assert not any("mm_projector" in k for k in load_file(str(base / "model.safetensors")))
    runs = []
    for k in range(2):
        torch.manual_seed(1000 + k)  # whatever the process did before, the run's own --seed decides
        out = tmp_path / f"run{k}"
        train_in_process(train_argv(base, train_data, out, "--lora_enable", "True", "--lora_r", "4",
                                    "--save_strategy", "no", "--seed", "7", steps=3))
        runs.append(losses(out)[0])
    assert len(runs[0]) == 3 and runs[0] == runs[1], runs


def test_a_model_path_that_llava_would_take_for_mpt_is_one_line(tiny_llava_dir, train_data, tmp_path):
    """LLaVA's train() loads any model whose path contains 'mpt' as MPT ('/tmp/tmpt...' is enough), and stopped deep
    inside with "'LlavaConfig' object has no attribute 'attn_config'"."""
    attempt = tmp_path / "attempt-1"  # "attempt" holds "mpt"
    attempt.symlink_to(tiny_llava_dir)
    with pytest.raises(SystemExit) as e:
        train_in_process(train_argv(attempt, train_data, tmp_path / "out", steps=1))
    message = str(e.value)
    assert "\n" not in message and "contains 'mpt'" in message and str(attempt) in message, message


def test_a_data_file_without_records_is_one_line(tiny_llava_dir, tmp_path):
    """A conversion that skipped everything writes an empty list: training says so in one line, naming the file,
    instead of torch's sampler error ("num_samples should be a positive integer value") with a traceback."""
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit) as e:
        train_in_process(train_argv(tiny_llava_dir, empty, tmp_path / "out", steps=2))
    message = str(e.value)
    assert "\n" not in message and f"{empty}: no records to train on" in message, message


# -- LoRA -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tiny_llava_dir, train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    trainer = train_in_process(train_argv(tiny_llava_dir, train_data, out, "--lora_enable", "True", "--lora_r", "8",
                                          "--lora_alpha", "16", steps=6))
    return trainer, out


def test_lora_trains_only_getok_rows_of_the_matrices(lora_run, tiny_llava_dir):
    trainer, out = lora_run
    values, _ = losses(out)
    assert values[-1] < values[0], values
    base_emb, base_head = base_matrices(tiny_llava_dir)
    llava = trainer.model.get_base_model()
    emb, head = llava.get_input_embeddings().weight, llava.get_output_embeddings().weight
    n = base_emb.shape[0]
    assert torch.equal(emb[:n], base_emb) and torch.equal(head[:n], base_head)  # bit-identical
    assert llava.getok_rows.input_delta.abs().sum() > 0 and llava.getok_rows.output_delta.abs().sum() > 0
    # the adapter holds LoRA weights only, the GETok rows sit in their own small file
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys), keys[:5]
    rows = rows_file(out)
    assert rows["input_rows"].shape == (len(CFG.tokens()), emb.shape[1])
    assert (out / "checkpoint-6" / "getok_rows.safetensors").exists()
    assert (out / "checkpoint-6" / "non_lora_trainables.bin").exists() and (out / "checkpoint-6" / "config.json").exists()


def test_lora_checkpoint_round_trip_same_ids_and_logits(lora_run, tiny_llava_dir, train_data):
    trainer, out = lora_run
    tokenizer, model, processor, _ = load(out, tiny_llava_dir)
    assert tokenizer.convert_tokens_to_ids(list(CFG.tokens())) == trainer.getok.ids
    ids, images = probe_inputs(tokenizer, processor, model.config, train_data)
    before = logits_of(trainer.model, ids, images)  # unmerged LoRA + row deltas
    after = logits_of(model, ids, images)  # merged LoRA, rows written into the matrices
    assert (before - after).abs().max() <= LOGIT_TOL
    base_emb, _ = base_matrices(tiny_llava_dir)
    assert torch.equal(model.get_input_embeddings().weight[: base_emb.shape[0]], base_emb)
    # the intermediate LoRA checkpoint is complete: base model path recorded, loads without model_base
    _, mid, _, _ = load(out / "checkpoint-6")
    assert (logits_of(mid, ids, images) - after).abs().max() <= LOGIT_TOL


def test_lora_resume_restores_getok_rows_and_projector(lora_run, tiny_llava_dir, train_data):
    """LLaVA's train() resumes from checkpoint-* in the output folder; the Trainer alone would reload only
    the LoRA adapter (LLaVA#1200)."""
    trainer, out = lora_run
    before = rows_file(out / "checkpoint-6")
    resumed = train_in_process(train_argv(tiny_llava_dir, train_data, out, "--lora_enable", "True", "--lora_r", "8",
                                          "--lora_alpha", "16", steps=6))  # already at step 6: trains nothing
    assert resumed.state.global_step == 6
    after = getok_rows_values_of(resumed)
    assert torch.allclose(after["input_rows"], before["input_rows"], atol=1e-6)
    assert torch.allclose(after["output_rows"], before["output_rows"], atol=1e-6)
    proj = lambda t: t.model.get_base_model().get_model().mm_projector[0].weight.detach()
    assert torch.equal(proj(resumed), proj(trainer))


def test_resuming_a_checkpoint_of_another_format_is_refused_in_one_line(lora_run, tiny_llava_dir, shared_data, tmp_path):
    """LLaVA's train() resumes from any checkpoint-* in --output_dir: a rerun of another location format into the
    same folder names both formats instead of stopping in torch's load_state_dict on the embedding's size."""
    import shutil

    from llava_getok.formats import BinsFormat
    from llava_getok.llava.tiny import make_grounding_data

    _, out = lora_run
    shutil.copytree(out / "checkpoint-6", tmp_path / "out" / "checkpoint-6")
    data = make_grounding_data(tmp_path / "data", shared_data / "coco_mini", BinsFormat(bins=32), n_records=2)
    with pytest.raises(SystemExit) as e:
        train_in_process(train_argv(tiny_llava_dir, data, tmp_path / "out", "--lora_enable", "True", steps=8))
    message = str(e.value)
    assert "\n" not in message and "checkpoint-6 was trained on getok, grid 8" in message, message
    assert "this run trains bins, K = 32" in message and "use a new --output_dir" in message, message


def getok_rows_values_of(trainer):
    from llava_getok.training.rows import getok_rows_values

    return getok_rows_values(trainer.model.get_base_model(), trainer.getok.ids)


def test_projector_only_checkpoint_round_trip(tiny_llava_dir, train_data, tmp_path):
    """--tune_mm_mlp_adapter: LLaVA saves mm_projector.bin only; the GETok rows come in their own file."""
    out = tmp_path / "projector"
    trainer = train_in_process(train_argv(tiny_llava_dir, train_data, out, "--tune_mm_mlp_adapter", "True",
                                          "--save_strategy", "no", steps=2))
    assert trainer.getok.rows_mode == "delta" and (out / "mm_projector.bin").exists()
    assert json.loads((out / "getok_config.json").read_text())["kind"] == "projector"
    tokenizer, model, processor, _ = load(out)  # base model taken from the sidecar
    ids, images = probe_inputs(tokenizer, processor, model.config, train_data)
    assert (logits_of(trainer.model, ids, images) - logits_of(model, ids, images)).abs().max() <= LOGIT_TOL


# -- the other location formats: 1D bins and text coordinates --------------------------------------------

def test_bins_training_takes_the_format_from_the_data_and_predict_needs_no_flag(tiny_llava_dir, shared_data, tmp_path):
    """No --getok_format: the data's bins format is trained, its tokens added and initialised through the GETok hooks,
    the 1D loss logged; the sidecar records the format, so the builder, predict and eval need no flag."""
    from llava_getok.cli import main
    from llava_getok.formats import BinsFormat
    from llava_getok.llava.tiny import make_grounding_data
    from llava_getok.training.tokens import getok_row_targets

    fmt = BinsFormat(bins=32)
    data = make_grounding_data(tmp_path / "data", shared_data / "coco_mini", fmt, n_records=2)
    out = tmp_path / "out"
    trainer = train_in_process(train_argv(tiny_llava_dir, data, out, "--save_strategy", "no",
                                          "--lr_scheduler_type", "constant", steps=12))
    assert trainer.getok.format == fmt and len(trainer.getok.ids) == 32 and trainer.loss_on
    values, history = losses(out)
    assert {"loss_lm", "loss_grid", "loss_box"} <= set(history[0]) and values[-1] < values[0], values
    sidecar = json.loads((out / "getok_config.json").read_text())
    assert sidecar["format"] == {"name": "bins", "bins": 32} and sidecar["tokens"] == list(fmt.tokens())
    rows = rows_file(out)["input_rows"]
    base_emb, _ = base_matrices(tiny_llava_dir)
    start = getok_row_targets(fmt, "sincos2d", base_emb.mean(0), float(base_emb.std(0).mean()))
    assert rows.shape == start.shape and not torch.allclose(rows, start, atol=1e-4)  # initialised, then trained
    tokenizer, model, processor, _ = load(out)
    assert tokenizer.convert_tokens_to_ids(list(fmt.tokens())) == trainer.getok.ids
    ids, images = probe_inputs(tokenizer, processor, model.config, data)
    assert (logits_of(trainer.model, ids, images) - logits_of(model, ids, images)).abs().max() <= LOGIT_TOL
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--model-path", str(out), "--data", str(data), "--image-root", str(data.parent / "images"),
                 "--output", str(preds), "--shape-only", "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert all(x["errors"] == [] and x["text"].count("<loc_") == 4 and x["shapes"][0]["kind"] == "box" for x in lines)
    result_dir = tmp_path / "eval"
    assert main(["eval", "--predictions", str(preds), "--annotations", str(data), "--output-dir", str(result_dir)]) == 0
    assert json.loads((result_dir / "preds.metrics.json").read_text())["formats"]["rec"]["coco"] == "bins, K = 32"
    # under LoRA the bin rows train as GETok's do: a delta on their rows only, saved in getok_rows.safetensors
    lora = train_in_process(train_argv(tiny_llava_dir, data, tmp_path / "lora", "--lora_enable", "True", "--lora_r", "8",
                                       "--save_strategy", "no", steps=2))
    llava = lora.model.get_base_model()
    n = base_emb.shape[0]
    assert lora.getok.rows_mode == "delta" and torch.equal(llava.get_input_embeddings().weight[:n], base_emb)
    assert llava.getok_rows.input_delta.shape[0] == 32 and llava.getok_rows.input_delta.abs().sum() > 0
    assert rows_file(tmp_path / "lora")["input_rows"].shape == rows.shape


def test_text_training_adds_no_token_and_trains_with_llavas_plain_loss(tiny_llava_dir, shared_data, tmp_path, monkeypatch):
    from llava_getok import train as entry
    from llava_getok.formats import TextFormat
    from llava_getok.llava.tiny import make_grounding_data

    data = make_grounding_data(tmp_path / "data", shared_data / "coco_mini", TextFormat(), n_records=2)
    assert json.loads(data.read_text())[0]["conversations"][1]["value"].startswith("[0.")
    out = tmp_path / "out"
    trainer = train_in_process(train_argv(tiny_llava_dir, data, out, "--lora_enable", "True", "--lora_r", "8",
                                          "--save_strategy", "no", steps=3))
    assert trainer.getok.ids == [] and trainer.getok.table is None and not trainer.loss_on
    _, history = losses(out)
    assert "loss" in history[0] and "loss_grid" not in history[0]  # LLaVA's own loss path
    sidecar = json.loads((out / "getok_config.json").read_text())
    assert sidecar["format"] == {"name": "text", "decimals": 2} and sidecar["tokens"] == [] and sidecar["kind"] == "lora"
    base_emb, _ = base_matrices(tiny_llava_dir)
    tokenizer, model, _, _ = load(out, tiny_llava_dir)  # a LoRA checkpoint with no location rows loads
    assert len(tokenizer) == base_emb.shape[0] and torch.equal(model.get_input_embeddings().weight, base_emb)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the entry point hands LLaVA its arguments in sys.argv
    with pytest.raises(SystemExit, match="--getok_format bins, but the training data is in text, 2 decimals"):
        entry.main(train_argv(tiny_llava_dir, data, tmp_path / "x", "--getok_format", "bins", steps=1))


# -- QLoRA and ZeRO-2, as users launch them -----------------------------------------------------------

def test_qlora_4bit_cli_trains_getok_rows_only(tiny_llava_dir, train_data, tmp_path):
    out = tmp_path / "qlora"
    run_cli([sys.executable, "-m", "llava_getok.train", *train_argv(
        tiny_llava_dir, train_data, out, "--lora_enable", "True", "--lora_r", "8", "--bits", "4",
        "--use_cpu", "True", "--save_steps", "3", "--save_total_limit", "2", steps=4)])
    values, _ = losses(out)
    assert all(v == v for v in values) and values[-1] < values[0], values
    assert not torch.equal(rows_file(out / "checkpoint-3")["input_rows"], rows_file(out)["input_rows"])
    _, model, _, _ = load(out, tiny_llava_dir, load_4bit=True)
    llava = model.get_base_model()
    base_emb, base_head = base_matrices(tiny_llava_dir)
    n = base_emb.shape[0]
    assert torch.equal(llava.get_input_embeddings().weight[:n].float(), base_emb)
    assert torch.equal(llava.get_output_embeddings().weight[:n].float(), base_head)
    assert "Linear4bit" in {type(m).__name__ for m in llava.modules()}


def test_qlora_with_zero3_is_refused_with_a_reason(tiny_llava_dir, train_data, tmp_path):
    from llava_getok.train import check_launch

    with pytest.raises(SystemExit, match="ZeRO-3"):
        check_launch(["--bits", "4", "--deepspeed", str(REPO / "scripts" / "zero3.json")])
    check_launch(["--bits", "4", "--deepspeed", str(REPO / "scripts" / "zero2.json")])  # allowed


def test_entry_refuses_flash_attention_without_the_package_and_unknown_templates(tiny_llava_dir, train_data, tmp_path):
    import importlib.util

    from llava_getok import train as entry

    argv = train_argv(tiny_llava_dir, train_data, tmp_path / "x", steps=1)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(SystemExit, match="flash-attn package is not installed"):
            entry.main(argv + ["--attn_implementation", "flash_attention_2"])
    bad = [a if a != "getok_v1" else "getok_v9" for a in argv]
    with pytest.raises(SystemExit, match="not a LLaVA conversation template"):
        entry.main(bad)
    assert "flash_attn" not in sys.modules  # never imported unless asked

"""``python -m llava_getok.hf.train`` (trl's SFTTrainer with GETok) on the tiny Qwen2.5-VL (untied and tied, as the 3B
model) and llava-hf: full fine-tuning and LoRA in this process through the entry point's ``build`` (the trainer is
kept to compare logits before save and after load), 4-bit QLoRA of the tied model in this process, then data parallel (torchrun, LoRA) and DeepSpeed ZeRO-3 (full) on
two CPU ranks as users launch them, in bf16 with gradient checkpointing (ZeRO-2: the Qwen recipe, test_recipes.py).
Every checkpoint loads back through ``llava_getok.hf.checkpoint`` with the same GETok ids and the same logits."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import CFG, LOGIT_TOL, base_matrices, logits_of, losses, probe, rows_file, train_argv, train_here

REPO = Path(__file__).resolve().parents[1]
SAME_ROWS = "identical on all 2 ranks"


# -- full fine-tuning (Qwen2.5-VL) ------------------------------------------------------------------------------

def test_full_training_learns_and_records_backend_family_and_frame(hf_full_run, tiny_qwen_dir):
    trainer, out = hf_full_run
    history = losses(out)
    assert {"loss_lm", "loss_grid", "loss_box"} <= set(history[0]) and history[-1]["loss"] < history[0]["loss"] * 0.9
    sidecar = json.loads((out / "getok_config.json").read_text())
    assert sidecar["backend"] == "hf" and sidecar["model_family"] == "qwen2.5-vl" and sidecar["kind"] == "full"
    assert sidecar["frame"] == "orig" and sidecar["processor"]["max_pixels"] == 64 * 64
    assert sidecar["token_ids"] == trainer.getok.ids and sidecar["base_model"] == str(tiny_qwen_dir)
    assert not torch.equal(rows_file(out / "checkpoint-3")["input_rows"], rows_file(out)["input_rows"])
    # the projector (Qwen's patch merger) trained, the vision tower did not
    from safetensors.torch import load_file

    before, after = load_file(str(tiny_qwen_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    tower = "visual.blocks.0.mlp.up_proj.weight"  # as saved (transformers writes the original checkpoint keys)
    merger = next(k for k in before if k.startswith("visual.merger") and k.endswith("weight"))
    assert torch.equal(before[tower], after[tower]) and not torch.equal(before[merger], after[merger])


def test_full_checkpoint_round_trip_same_ids_and_logits(hf_full_run, hf_grounding):
    from llava_getok.hf.checkpoint import load_checkpoint

    trainer, out = hf_full_run
    processor, model, _ = load_checkpoint(out)
    assert processor.tokenizer.convert_tokens_to_ids(list(CFG.tokens())) == trainer.getok.ids
    inputs = probe(processor, hf_grounding["orig"])
    assert (logits_of(trainer.model, inputs) - logits_of(model, inputs)).abs().max() <= LOGIT_TOL
    _, mid, _ = load_checkpoint(out / "checkpoint-3")  # an intermediate checkpoint loads on its own
    assert mid.get_input_embeddings().weight.shape == model.get_input_embeddings().weight.shape


# -- LoRA (llava-hf): the GETok rows beside the adapter ----------------------------------------------------------

def test_lora_trains_only_the_getok_rows_and_saves_no_full_matrix(hf_lora_run, tiny_llava_hf_dir):
    from safetensors import safe_open

    trainer, out = hf_lora_run
    assert losses(out)[-1]["loss"] < losses(out)[0]["loss"]
    base_emb, base_head = base_matrices(tiny_llava_hf_dir)
    llava = trainer.model.get_base_model()
    emb, head = llava.get_input_embeddings().weight, llava.get_output_embeddings().weight  # rows written in
    n, ids = base_emb.shape[0], trainer.getok.ids
    assert min(ids) == n and torch.equal(emb[:n], base_emb) and torch.equal(head[:n], base_head)  # bit-identical
    assert not torch.equal(rows_file(out / "checkpoint-3")["output_rows"], rows_file(out)["output_rows"])
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    rows = {k: s for k, s in shapes.items() if "trainable_tokens_delta" in k}
    assert all("lora_" in k or k in rows for k in shapes) and len(rows) == 2  # embedding and LM head
    assert all(s == [len(ids), emb.shape[1]] for s in rows.values()), rows
    assert max(s[0] for s in shapes.values()) < n  # no (vocabulary x dim) matrix anywhere
    assert json.loads((out / "getok_config.json").read_text())["kind"] == "lora"


def test_lora_checkpoint_round_trip_same_ids_and_logits(hf_lora_run, hf_grounding):
    from llava_getok.hf.checkpoint import load_checkpoint

    trainer, out = hf_lora_run
    processor, merged, _ = load_checkpoint(out)  # the base model from the sidecar, LoRA and rows merged
    assert processor.tokenizer.convert_tokens_to_ids(list(CFG.tokens())) == trainer.getok.ids
    inputs = probe(processor, hf_grounding["pad"])
    before = logits_of(trainer.model, inputs)  # the adapter and trainable rows as trained, unmerged
    assert (before - logits_of(merged, inputs)).abs().max() <= LOGIT_TOL
    _, unmerged, _ = load_checkpoint(out / "checkpoint-6", merge=False)
    assert (before - logits_of(unmerged, inputs)).abs().max() <= LOGIT_TOL


def test_seed_reproduces_a_run(hf_lora_run, tiny_llava_hf_dir, hf_grounding, tmp_path):
    """--seed seeds the set-up too (LoRA's initialisation): the same command trains the same rows and losses (its
    first 3 steps, against the 6-step run's checkpoint at step 3)."""
    _, out = hf_lora_run
    train_here(train_argv(tiny_llava_hf_dir, hf_grounding["pad"], tmp_path / "again", "--lora_enable", "True",
                          "--lora_r", "8", "--lora_alpha", "16", steps=3))
    assert [h["loss"] for h in losses(out)][:3] == [h["loss"] for h in losses(tmp_path / "again")]
    first, again = rows_file(out / "checkpoint-3"), rows_file(tmp_path / "again")
    assert all(torch.equal(first[k], again[k]) for k in first)


# -- tied embeddings (Qwen2.5-VL-3B's layout) ----------------------------------------------------------------------

def test_tied_model_trains_one_set_of_rows_and_round_trips(tiny_qwen_tied_dir, hf_grounding, tmp_path):
    from llava_getok.hf.checkpoint import load_checkpoint

    out = tmp_path / "tied"
    trainer = train_here(train_argv(tiny_qwen_tied_dir, hf_grounding["orig"], out, "--lora_enable", "True",
                                    "--lora_r", "8", "--save_strategy", "no", steps=3))
    rows = rows_file(out)
    assert torch.equal(rows["input_rows"], rows["output_rows"])  # one matrix, one set of rows
    base_emb, _ = base_matrices(tiny_qwen_tied_dir)
    assert not torch.allclose(rows["input_rows"], rows["input_rows"].mean(0), atol=1e-3)  # sincos2d, then trained
    processor, model, _ = load_checkpoint(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight[: base_emb.shape[0]], base_emb)
    inputs = probe(processor, hf_grounding["orig"])
    assert (logits_of(trainer.model, inputs) - logits_of(model, inputs)).abs().max() <= LOGIT_TOL


def test_qlora_of_the_tied_model_trains_its_rows_and_loads_back(tiny_qwen_tied_dir, hf_grounding, tmp_path):
    """4-bit QLoRA (bitsandbytes) of the tied model: the GETok rows train in float32 beside the 4-bit base, the saved
    checkpoint holds no full matrix and loads back with its ids."""
    from llava_getok.hf.checkpoint import load_checkpoint

    out = tmp_path / "qlora"
    train_here(train_argv(tiny_qwen_tied_dir, hf_grounding["orig"], out, "--lora_enable", "True", "--lora_r", "8",
                          "--bits", "4", "--save_strategy", "no", steps=2))
    rows = rows_file(out)
    assert torch.equal(rows["input_rows"], rows["output_rows"]) and rows["input_rows"].dtype == torch.float32
    assert not any("embed_tokens.weight" in k or "lm_head.weight" in k for f in out.glob("adapter_model.safetensors")
                   for k in __import__("safetensors.torch").torch.load_file(f))
    processor, model, sidecar = load_checkpoint(out)
    assert processor.tokenizer.convert_tokens_to_ids(sidecar.tokens) == sidecar.token_ids
    assert torch.isfinite(logits_of(model, probe(processor, hf_grounding["orig"]))).all()


# -- refusals, in one line ---------------------------------------------------------------------------------------

def test_records_in_another_frame_and_unsupported_combinations_are_refused(tiny_qwen_dir, hf_grounding, tmp_path):
    from llava_getok.hf.family import QWEN25_VL
    from llava_getok.hf.prepare import GETokState, LoraSettings, lora_model

    with pytest.raises(SystemExit) as e:
        train_here(train_argv(tiny_qwen_dir, hf_grounding["pad"], tmp_path / "x"))
    assert "records are in frame(s) ['pad'], but the model sees frame 'orig'" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="--getok_train_vision_tower goes with full fine-tuning"):
        train_here(train_argv(tiny_qwen_dir, hf_grounding["orig"], tmp_path / "y", "--lora_enable", "True",
                              "--getok_train_vision_tower", "True"))
    with pytest.raises(ValueError, match="under DeepSpeed ZeRO-3 is not supported"):
        lora_model(torch.nn.Linear(2, 2), QWEN25_VL, GETokState(CFG, [1], None, 1, 3), LoraSettings(), quantized=False,
                   zero3=True)


def test_an_empty_parameter_group_never_reaches_deepspeed(hf_lora_run):
    """LoRA with the GETok rows trains nothing without weight decay: the Trainer's empty no-decay group is dropped
    before the scheduler is built (DeepSpeed drops it after, and ZeRO-2 then failed at its first step)."""
    trainer, _ = hf_lora_run
    assert trainer.optimizer.param_groups and all(g["params"] for g in trainer.optimizer.param_groups)


# -- several processes on the CPU, as users launch them ----------------------------------------------------------

def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch(cmd, timeout=500):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def bin_(name):
    return str(Path(sys.executable).parent / name)


def two_ranks_trained(out, proc, model_dir, data, kind):
    """Both ranks saved the same rows, the losses are finite, the checkpoint loads with its ids and, under LoRA, the
    matrices' other rows are the base model's."""
    from llava_getok.hf.checkpoint import load_checkpoint

    assert SAME_ROWS in proc.stdout, proc.stdout[-2000:]
    history = losses(out)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history) and "loss_box" in history[0]
    processor, model, sidecar = load_checkpoint(out)
    assert sidecar.kind == kind and processor.tokenizer.convert_tokens_to_ids(sidecar.tokens) == sidecar.token_ids
    assert torch.isfinite(logits_of(model, probe(processor, data))).all()
    if kind == "lora":
        base_emb, _ = base_matrices(model_dir)
        assert torch.equal(model.get_input_embeddings().weight[: base_emb.shape[0]], base_emb)


def test_data_parallel_lora_bf16_on_two_cpu_ranks(tiny_llava_hf_dir, hf_grounding, tmp_path):
    out = tmp_path / "ddp"
    argv = train_argv(tiny_llava_hf_dir, hf_grounding["pad"], out, "--lora_enable", "True", "--lora_r", "8",
                      "--per_device_train_batch_size", "1", "--save_steps", "4", "--bf16", "True",
                      "--gradient_checkpointing", "True", "--use_cpu", "True", "--ddp_backend", "gloo", steps=4)
    proc = launch([bin_("torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), "-m",
                   "llava_getok.hf.train", *argv])
    two_ranks_trained(out, proc, tiny_llava_hf_dir, hf_grounding["pad"], "lora")


def test_deepspeed_zero3_full_fine_tuning_on_two_cpu_ranks(tiny_qwen_dir, hf_grounding, tmp_path):
    """ZeRO-3: full fine-tuning of Qwen2.5-VL (LoRA with GETok rows under ZeRO-3 is refused: see the refusals above).
    ZeRO-2 on two CPU ranks is the Qwen recipe's (scripts/finetune_getok_qwen.sh in tests/test_recipes.py)."""
    out = tmp_path / "zero3"
    argv = train_argv(tiny_qwen_dir, hf_grounding["orig"], out, "--deepspeed", str(REPO / "scripts" / "zero3.json"),
                      "--per_device_train_batch_size", "1", "--save_steps", "4", "--bf16", "True",
                      "--gradient_checkpointing", "True", "--use_cpu", "True", steps=4)
    proc = launch([bin_("deepspeed"), "--num_gpus", "2", "--master_port", free_port(), "--module",
                   "llava_getok.hf.train", *argv])
    two_ranks_trained(out, proc, tiny_qwen_dir, hf_grounding["orig"], "full")

"""What the tests of llava_getok.hf share: the GETok config of their data, the training command and an in-process
run of it, and the inputs and logits of a probe record."""
import json
from pathlib import Path

import torch

import llava_getok as gt

GRID = 8
CFG = gt.GETokConfig(grid=GRID)
LOGIT_TOL = 1e-5  # float32 on CPU; the same weights through another load path


def train_argv(model_dir, data, out, *extra, steps=6):
    """``python -m llava_getok.hf.train`` arguments for a short run on ``data`` (a converted file beside images/)."""
    return ["--model_name_or_path", str(model_dir), "--data_path", str(data),
            "--image_folder", str(Path(data).parent / "images"), "--output_dir", str(out), "--max_steps", str(steps),
            "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3", "--report_to", "none",
            "--getok_grid", str(GRID), "--seed", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "True", *extra]


def train_here(argv):
    """The entry point's run in this process (build, train, final save) on the CPU in float32; the trainer."""
    from llava_getok.hf.train import build

    trainer = build(list(argv) + ["--use_cpu", "True", "--bf16", "False"])
    trainer.train()
    trainer.save_final()
    return trainer


def losses(out):
    """The logged losses, from the last checkpoint's trainer state."""
    last = max(Path(out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return [h for h in json.loads((last / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def rows_file(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "getok_rows.safetensors"))


def probe(processor, data):
    """Model inputs of the first record of ``data``, as ``processor`` (with the GETok tokens) makes them."""
    from llava_getok.hf.data import encode

    item = encode(processor, json.loads(Path(data).read_text())[0], Path(data).parent / "images")
    item.pop("labels")
    return {k: v[None] if k in ("input_ids", "attention_mask") else v for k, v in item.items()}


def logits_of(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def base_matrices(model_dir):
    """The input embedding and LM head matrices of a saved model (the same one when tied)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(model_dir) / "model.safetensors"))
    emb = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    head = next((v for k, v in state.items() if k.endswith("lm_head.weight")), emb)
    return emb, head

"""GETok checkpoint files: one writer for fine-tuning (the GETok trainer) and GRPO (llava_getok.rl.checkpoint).

Every checkpoint folder, intermediate ones included, loads on its own through the builder hook (docs/pitfalls.md,
"Loading checkpoints"): next to what the Trainer saved it holds the sidecar (``getok_config.json``), the effective
GETok rows (``getok_rows.safetensors``) and the tokenizer; a LoRA checkpoint also LLaVA's config and
``non_lora_trainables.bin`` (LLaVA's builder reads both before the adapter); a trained CLIP tower its weights.
"""
from __future__ import annotations

import os

import torch

from ..atomic import atomic_path
from ..training.rows import ROWS_ATTR
from ..training.sidecar import ROWS_FILE, TOWER_FILE, Sidecar, read_rows, save_tensors_atomic, write_sidecar
from ..training.tokens import _gathered

NON_LORA_FILE = "non_lora_trainables.bin"


def tower_weights(llava) -> dict[str, torch.Tensor]:
    """The CLIP tower's weights on CPU, float32 (collective under ZeRO-3: every rank calls it)."""
    tower = llava.get_vision_tower().vision_tower
    with _gathered(list(tower.parameters())):
        return {k: v.detach().float().cpu().clone() for k, v in tower.state_dict().items()}


def write_getok_files(folder, tokenizer, sidecar: Sidecar, rows: dict[str, torch.Tensor], llava_config=None,
                      non_lora: dict | None = None, tower: dict | None = None) -> None:
    """Write the GETok files of one checkpoint into ``folder`` (one process: gather first, on every rank).

    rows: :func:`llava_getok.training.rows.getok_rows_values`; non_lora: for a LoRA checkpoint, the weights that train
    besides the adapter (LLaVA's projector; may be empty), written with ``llava_config``; tower: a trained tower's
    weights (:func:`tower_weights`)."""
    os.makedirs(folder, exist_ok=True)
    save_tensors_atomic(os.path.join(folder, ROWS_FILE), rows)
    if tower is not None:
        save_tensors_atomic(os.path.join(folder, TOWER_FILE), tower)
    tokenizer.save_pretrained(folder)
    if non_lora is not None:
        llava_config.save_pretrained(folder)
        with atomic_path(os.path.join(folder, NON_LORA_FILE)) as tmp:
            torch.save(non_lora, tmp)
    write_sidecar(folder, sidecar)


def load_getok_files(llava, peft_model, folder) -> None:
    """Resume what the Trainer does not reload for a PeftModel (LLaVA#1200): the GETok row deltas (the saved
    effective rows minus the frozen matrices' rows), LLaVA's non-LoRA weights and a trained tower."""
    from safetensors.torch import load_file

    from .builder import copy_into_parameters
    from ..training.sidecar import read_sidecar

    rows = getattr(llava, ROWS_ATTR, None)
    sidecar = read_sidecar(folder)
    if rows is not None and sidecar is not None:
        saved = read_rows(folder, sidecar)
        index = saved["token_ids"].to(rows.ids.device)
        emb, head = llava.get_input_embeddings().weight, llava.get_output_embeddings().weight
        with _gathered([emb, head, *rows.parameters()]), torch.no_grad():
            for part, matrix, key in ((rows.input, emb, "input_rows"), (rows.output, head, "output_rows")):
                base = matrix[index].float()
                part.assign(saved[key].to(base.device) - base)
    non_lora = os.path.join(folder, NON_LORA_FILE)
    if os.path.exists(non_lora) and peft_model is not None:
        state = {k: v for k, v in torch.load(non_lora, map_location="cpu").items() if f"{ROWS_ATTR}." not in k}
        copy_into_parameters(peft_model, state, non_lora)
    tower_file = os.path.join(folder, TOWER_FILE)
    if os.path.exists(tower_file):
        llava.get_vision_tower().vision_tower.load_state_dict(load_file(tower_file))

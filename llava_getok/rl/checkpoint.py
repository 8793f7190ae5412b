"""GRPO checkpoints that the builder hook (llava_getok.llava.builder) loads back exactly.

Every save, intermediate ones included (docs/pitfalls.md, "Loading checkpoints"), writes the GETok sidecar
(``getok_config.json``) and the effective GETok rows (``getok_rows.safetensors``) next to what trl's Trainer
saved:

- LoRA, intermediate or quantised: trl saved the adapter; add ``non_lora_trainables.bin`` (empty: the only
  non-LoRA trainables are the GETok-row deltas, which live in the rows file) and a sidecar of kind ``lora``
  whose base is the checkpoint training started from;
- LoRA, final, unquantised: merge the adapter and write a full checkpoint (kind ``full``), the start of the
  next stage;
- full fine-tuning: trl saved the whole model; add the sidecar (kind ``full``) and the rows.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from transformers import TrainerCallback

from ..llava.checkpoint import write_getok_files
from ..training.rows import fold_rows_into_state, getok_rows_values
from ..training.sidecar import Sidecar


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_getok_checkpoint(model, tokenizer, folder: Path, sidecar: Sidecar, base_model: str, quantized: bool,
                          final: bool) -> Path:
    """Complete ``folder`` into a loadable GETok checkpoint (see the module docstring); returns it."""
    folder = Path(folder)
    ids = list(sidecar.token_ids)
    peft = _is_peft(model)
    if peft and (quantized or not final):
        llava = model.get_base_model()
        if final:
            folder.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(folder)
        # the only non-LoRA trainables are the GETok-row deltas, which live in the rows file
        write_getok_files(folder, tokenizer, replace(sidecar, kind="lora", base_model=str(base_model)),
                          getok_rows_values(llava, ids), llava.config, non_lora={})
    else:
        llava = model.merge_and_unload() if peft else model
        if final or peft:
            state = fold_rows_into_state(llava.state_dict(), getok_rows_values(llava, ids))
            llava.save_pretrained(folder, state_dict=state, safe_serialization=True)
        write_getok_files(folder, tokenizer, replace(sidecar, kind="full", base_model=None),
                          getok_rows_values(llava, ids))
    return folder


class GETokCheckpointCallback(TrainerCallback):
    """Completes each ``checkpoint-N`` folder trl's Trainer writes (sidecar + rows, see module docstring)."""

    def __init__(self, tokenizer, sidecar: Sidecar, base_model: str, quantized: bool):
        self.tokenizer, self.sidecar, self.base_model, self.quantized = tokenizer, sidecar, base_model, quantized

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_getok_checkpoint(model, self.tokenizer, folder, self.sidecar, self.base_model, self.quantized,
                                  final=False)
        return control

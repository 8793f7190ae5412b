"""The checkpoints of this backend's trainers (trl's ``SFTTrainer`` and ``GRPOTrainer`` alike): in ``checkpoint-N``
and the final folder, the model as the Trainer saves it (LoRA: the adapter, with the GETok rows as trainable-token
values and never the full embedding matrices; full: the whole model), the processor with the GETok tokens (under its
family's own class name), ``getok_rows.safetensors`` (the effective rows, compared across ranks) and the sidecar.

:class:`GETokSaving` is a mixin for a ``transformers.Trainer`` subclass that has ``getok`` (its ``ids``) and a
``sidecar()`` method (what the checkpoint records: the trainer's own run).
"""
from __future__ import annotations

import os

from ..training.rows import check_same_on_all_ranks, getok_rows_values, saving_adapter_only
from ..training.sidecar import ROWS_FILE, save_tensors_atomic, write_sidecar
from .family import save_processor


def unwrap(model):
    """The transformers model inside DDP / DeepSpeed / peft wrappers (the same parameters)."""
    import torch

    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class GETokSaving:
    """Trainer mixin: every save (intermediate ones included) is a loadable GETok checkpoint (module docstring)."""

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        if hasattr(self.model, "peft_config"):
            with saving_adapter_only(self.model):
                super()._save(output_dir, state_dict=state_dict)
        else:
            super()._save(output_dir, state_dict=state_dict)
        save_processor(self.processing_class, output_dir)  # under the family's own processor class name

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        super()._save_checkpoint(model, trial, *args, **kwargs)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.save_getok_files(folder)

    def save_final(self, folder=None) -> None:
        """The final checkpoint: the model and processor (``save_model``), then the GETok files. Every rank calls it."""
        folder = folder or self.args.output_dir
        self.save_model(folder)
        ranks = self.save_getok_files(folder)
        if self.args.should_save:
            same = f", identical on all {ranks} ranks" if ranks > 1 else ""
            print(f"GETok: rows of {len(self.getok.ids)} tokens saved in {folder}/{ROWS_FILE}{same}", flush=True)

    def checkpoint_kind(self) -> str:
        return "lora" if hasattr(self.model, "peft_config") else "full"

    def save_getok_files(self, folder) -> int:
        """``getok_rows.safetensors`` and the sidecar of checkpoint ``folder``; every rank calls it (the rows are
        gathered and compared across ranks first). Returns the number of ranks."""
        rows = getok_rows_values(unwrap(self.model), self.getok.ids)
        ranks = check_same_on_all_ranks(rows, folder)
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            save_tensors_atomic(os.path.join(folder, ROWS_FILE), rows)
            write_sidecar(folder, self.sidecar())
        return ranks

"""trl's ``SFTTrainer`` with GETok: the box-token loss added to trl's LM loss, and GETok checkpoints.

The loss of a step reads, top to bottom (:meth:`GETokSFTTrainer.compute_loss`)::

    with capture_hidden(model) as capture:   # a hook for this forward, through DDP / DeepSpeed / peft
        model(**batch, logits_to_keep=1)      # the last position's logits only
    total, parts = step_loss(Captured(labels, hidden=capture.take()), head, table, settings)

``step_loss`` (the training core's, as the LLaVA backend uses it) applies the LM head module to the labelled
positions only, for the LM loss and the box-token (or bins) loss alike: trl's fused LM head scores every position on a
CPU (it keeps only the labelled ones on devices with Triton), which was nearly half of a demo step. Outside training
(evaluation, ``return_outputs``) the LM loss is trl's own, through its fused head, and step_loss adds the location
loss to it. trl's fused head reads ``lm_head.weight`` directly (no call of the head's module), so what trains the
GETok rows lives in that weight: with LoRA, peft's trainable tokens (``llava_getok.hf.prepare``), which trl's
GRPOTrainer sees too. The labels are the batch's own: the processor expands each image into its tokens, so they line
up with the hidden states.

Checkpoints (``checkpoint-N`` and the final folder; ``hf/saving.py``, which GRPO's trainer shares): the model as the
Trainer saves it (LoRA: the adapter, with the GETok rows as trainable-token values and never the full embedding
matrices; full: the whole model), the processor with the GETok tokens, ``getok_rows.safetensors`` (the effective rows,
compared across ranks) and the sidecar (backend ``hf``, model family, frame, processor settings).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict

import torch
from trl import SFTTrainer

from ..frames import processor_frame
from ..patching import Patches
from ..training.settings import GETokSettings
from ..training.sidecar import Sidecar
from ..training.step import Captured, step_loss
from .family import Family, processor_settings
from .prepare import GETokState, float32_rows
from .saving import GETokSaving, unwrap

class HiddenCapture:
    """The hidden states the LM head would read (the language model's output, ``get_decoder()``) of the forward run
    inside :func:`capture_hidden`; the first forward of the block is kept (trl runs a second one, without gradients,
    only when asked for logits)."""

    hidden = None

    def take(self):
        hidden, self.hidden = self.hidden, None
        return hidden


@contextlib.contextmanager
def capture_hidden(model):
    """Record the language model's output of one forward of ``model`` (unwrapped): a forward hook installed for the
    block and taken off after it."""
    capture = HiddenCapture()

    def record(module, args, output):
        if capture.hidden is None:
            capture.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    decoder = model.get_decoder()
    with Patches().applied() as patches:
        patches.hook(decoder.register_forward_hook(record), f"{type(decoder).__name__}: forward hook",
                     why="record the LM head's input (the hidden states), for this forward")
        yield capture


class GETokSFTTrainer(GETokSaving, SFTTrainer):
    """SFTTrainer + GETok, configured by ``settings`` and the ``getok`` state that
    :func:`llava_getok.hf.prepare.add_location_tokens` set up; ``family``: the model family; ``base_model``: where the
    model was loaded from (recorded in the sidecar, where a LoRA checkpoint finds its base)."""

    def __init__(self, *args, getok: GETokState, settings: GETokSettings, family: Family,
                 base_model: str | None = None, **kwargs):
        self.getok, self.settings, self.family, self.base_model_path = getok, settings, family, base_model
        super().__init__(*args, **kwargs)
        if getattr(unwrap(self.model), "is_loaded_in_4bit", False) or getattr(unwrap(self.model), "is_loaded_in_8bit",
                                                                              False):
            float32_rows(self.model)

    @property
    def loss_on(self) -> bool:
        """The box-token loss (or the bins' 1D loss) is on: weights > 0 and a format that adds tokens."""
        return self.settings.loss_on and self.getok.table is not None

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        # LoRA with the GETok rows leaves the Trainer's no-decay group empty; DeepSpeed drops empty groups after the
        # learning-rate scheduler was built over both (ZeRO-2: "zip() argument 2 is longer than argument 1" at the
        # first step). Dropped here, before the scheduler sees them.
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer

    def _get_train_sampler(self, *args, **kwargs):
        if self.settings.data_order == "file" and self.train_dataset is not None:
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    # -- the loss of one step ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.loss_on:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # The Trainer divides the returned loss over the accumulated micro-batches unless the model takes the token
        # count (then trl's LM loss is divided over the whole accumulated batch already): a per-micro-batch mean takes
        # its share of the accumulation here (``steps``).
        steps = (self.current_gradient_accumulation_steps
                 if num_items_in_batch is not None and self.model_accepts_loss_kwargs and self.compute_loss_func is None
                 else 1)
        lean = model.training and not return_outputs and self.label_smoother is None and self.compute_loss_func is None
        with capture_hidden(unwrap(model)) as capture:
            if lean:  # training: the forward computes the last position's logits only; step_loss scores the rest
                batch = {key: value for key, value in inputs.items() if key != "labels"}
                outputs, lm = model(**batch, use_cache=False, logits_to_keep=1), None
            else:  # trl's own loss through its fused head (and its metrics)
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
                lm, outputs = result if return_outputs else (result, None)
        head = unwrap(model).get_output_embeddings()
        captured = Captured(inputs["labels"], hidden=capture.take(), lm=None if lm is None else lm * steps)
        total, parts = step_loss(captured, head, self.getok.table, self.settings)
        self._log_parts({"loss_lm": parts["loss_lm"] if lm is None else lm, "loss_grid": parts["loss_grid"],
                         "loss_box": parts["loss_box"]})
        return (total / steps, outputs) if return_outputs else total / steps

    def _log_parts(self, parts: dict) -> None:
        mode = "train" if self.model.training else "eval"
        for name, value in parts.items():
            value = torch.as_tensor(value).detach().float().to(self.accelerator.device)
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())

    # -- checkpoints (llava_getok.hf.saving: the same files for every trainer of this backend) ----------------------
    def sidecar(self) -> Sidecar:
        g = self.getok
        return Sidecar.of(g.format, g.ids, vocab_size=g.vocab_size, tokenizer_legacy=None, kind=self.checkpoint_kind(),
                          frame=processor_frame(self.processing_class), backend="hf", base_model=self.base_model_path,
                          processor=processor_settings(self.processing_class), settings=asdict(self.settings),
                          vision_tower_trained=self.settings.train_vision_tower, model_family=self.family.name)

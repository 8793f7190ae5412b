"""A training step's loss with GETok, from LLaVA's forward to the number the optimiser sees (spec section 7).

The GETok trainer's ``compute_loss`` reads, top to bottom::

    with capture.recording(lean):       # the forward as LLaVA runs it, through DDP / DeepSpeed / peft
        outputs = model(**batch)
    labels, hidden = capture.take()     # the labels LLaVA built inside it, the hidden states its LM head got
    total, parts = getok_loss(head, labels, hidden, outputs.loss, outputs.logits, table, settings)

Why two hooks instead of calling LLaVA's pieces one by one: the forward must run through whatever wraps the model
(DDP's gradient reducer, DeepSpeed ZeRO-3's parameter gathering, gradient checkpointing, peft), and the labels
that line up with the logits exist only inside it (LLaVA inserts the image positions and re-pads in
``prepare_inputs_labels_for_multimodal``). :class:`LossCapture` records those two things and nothing else. In
the ``lean`` mode (training, nobody reads the logits) it also withholds the labels from LLaMA and hands its LM
head the last position only, so the forward computes neither the full (B, T, V) logits nor its loss;
:func:`labelled_lm_loss` scores the labelled positions instead. Outside it, LLaVA's forward runs unchanged.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from .bins_loss import BinsTable
from .box_loss import IGNORE_INDEX, TokenTable, shifted_targets
from .settings import GETokSettings

LEAN = "lean"
CAPTURE_ATTR = "_getok_loss_capture"


class LossCapture:
    """The two recording hooks on one LLaVA model (its ``prepare_inputs_labels_for_multimodal``, wrapped on the
    instance, and a forward pre-hook on its LM head). One per model: attaching another removes this one;
    :meth:`remove` restores the model as it was."""

    def __init__(self, llava):
        previous = getattr(llava, CAPTURE_ATTR, None)
        if previous is not None:
            previous.remove()
        self.mode: str | None = None  # None: not recording; "full" or LEAN
        self.labels = self.hidden = None
        self._llava = llava
        self._had_own_prepare = "prepare_inputs_labels_for_multimodal" in vars(llava)
        self._prepare = llava.prepare_inputs_labels_for_multimodal
        llava.prepare_inputs_labels_for_multimodal = self._prepare_and_record
        self._head_hook = llava.get_output_embeddings().register_forward_pre_hook(self._record_head_input)
        setattr(llava, CAPTURE_ATTR, self)

    def _prepare_and_record(self, *args, **kwargs):
        out = self._prepare(*args, **kwargs)
        if self.mode and out[-1] is not None:
            self.labels = out[-1]
            if self.mode == LEAN:  # no loss in LLaMA's forward: getok_loss computes it
                out = (*out[:-1], None)
        return out

    def _record_head_input(self, module, args):
        if self.mode:
            self.hidden = args[0]
            if self.mode == LEAN and self.labels is not None:
                return (args[0][:, -1:],)  # the logits of the last position only; the loss scores the rest

    @contextlib.contextmanager
    def recording(self, lean: bool):
        self.mode, self.labels, self.hidden = (LEAN if lean else "full"), None, None
        try:
            yield self
        finally:
            self.mode = None

    def take(self):
        """(labels, hidden) of the last recorded forward; None where it did not run through LLaVA's preparation."""
        out, self.labels, self.hidden = (self.labels, self.hidden), None, None
        return out

    def remove(self) -> None:
        self._head_hook.remove()
        if self._had_own_prepare:
            self._llava.prepare_inputs_labels_for_multimodal = self._prepare
        else:
            del self._llava.prepare_inputs_labels_for_multimodal
        if getattr(self._llava, CAPTURE_ATTR, None) is self:
            delattr(self._llava, CAPTURE_ATTR)


def getok_loss(head, labels: torch.Tensor, hidden: torch.Tensor | None, lm: torch.Tensor | None, logits,
               table: TokenTable | BinsTable, settings: GETokSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, parts) of one step: LLaVA's LM loss plus the weighted box-token loss (GETok's, or its 1D analogue for
    the bins format: ``table.loss``), and the parts to log.

    labels: (B, T) as LLaVA built them inside the forward; hidden: the LM head's input there (None: score the
    forward's own ``logits``); lm: the forward's LM loss, or None in the lean mode, where it is computed here on the
    labelled positions only."""
    host = labels.detach().cpu().numpy()
    if lm is None:
        lm, scores = labelled_lm_loss(head, hidden, host)
    elif hidden is not None:
        # the LM head again, on the scored positions only (its hooks, e.g. the GETok row deltas, included): the loss
        # then adds no second full-size gradient to the logits
        flat = hidden.reshape(-1, hidden.shape[-1])
        scores = lambda rows: head(flat[rows.to(flat.device)])  # noqa: E731
    else:
        scores = logits
    s = settings
    parts = table.loss(scores, host, sigma=s.sigma, with_box=s.box_weight > 0, offset_sigma=s.offset_sigma)
    total = lm
    if s.grid_weight > 0:
        total = total + s.grid_weight * parts["grid"]
    if s.box_weight > 0:
        total = total + s.box_weight * parts["box"]
    return total, {"loss_lm": lm, "loss_grid": parts["grid"], "loss_box": parts["box"]}


def labelled_lm_loss(head, hidden: torch.Tensor, labels):
    """LLaVA's LM loss (transformers' ``ForCausalLMLoss``: ``hidden[:, t]`` predicts ``labels[:, t + 1]``, mean
    cross-entropy over the targets that are not -100) with the LM ``head`` applied to the positions that have a
    target only, and a function ``rows -> logits`` over those positions for the table's loss.

    Most positions of a LLaVA sequence (image, prompt, padding) have no target: the full (B, T, V) logits, their
    log-softmax and their gradient were most of the head's cost and, for a 7B vocabulary, gigabytes of memory
    (bench/train_overhead.py, bench/real_shapes.py). Same value up to float rounding (summation order)."""
    shifted = shifted_targets(labels)
    rows = np.flatnonzero(shifted != IGNORE_INDEX)
    flat = hidden.reshape(len(shifted), -1)
    logits = head(flat[torch.from_numpy(rows).to(flat.device)])
    lm = F.cross_entropy(logits.float(), torch.from_numpy(shifted[rows]).to(logits.device))
    return lm, lambda at: logits[torch.from_numpy(np.searchsorted(rows, at.numpy())).to(logits.device)]

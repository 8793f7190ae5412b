"""One training step's loss with GETok, the same for every backend (spec section 7), from what the forward
captured to the number the optimiser sees. A backend's trainer reads::

    with capture(model) as forward:          # the backend's hooks, installed for this one forward
        outputs = model(**batch)
    total, parts = step_loss(forward.captured(), head, table, settings)

and this file reads top to bottom:

1. ``Targets.of(labels)``: what each position predicts, ``labels[:, t + 1]``: the one causal shift of the step.
2. The LM loss, mean cross-entropy over the positions that have a target: the forward's own (``Captured.lm``), or
   computed here from the LM head applied to those positions only (``Captured.hidden``), which spares the (B, T, V)
   logits most positions (image, prompt, padding) never need.
3. The location loss of the format's table (:class:`box_loss.TokenTable` for GETok, :class:`bins_loss.BinsTable` for
   bins): the grid part and the box part at the positions whose target is a location token.
4. ``total = lm + grid_weight * grid + box_weight * box``.

``head`` maps hidden states (N, D) to logits (N, V): the model's own LM head module, called as the forward calls it,
so ZeRO-3 gathers its weight and the GETok row deltas (llava_getok.training.rows) apply. With both loss weights 0,
or a format that adds no tokens (text), a backend does not come here: it runs its model's own loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .bins_loss import BinsTable
from .box_loss import TokenTable
from .loss_parts import Targets, gather_rows
from .settings import GETokSettings


@dataclass
class Captured:
    """What one forward hands the step: the labels aligned with its positions and either the LM head's input or the
    logits.

    labels: (B, T) unshifted, -100 where nothing is scored (as the model built them inside its forward: LLaVA
        inserts the image positions there); hidden: (B, T, D) the LM head's input, None to score ``logits``;
    logits: (B, T, V), used when ``hidden`` is None; lm: the forward's own LM loss, None to compute it here."""

    labels: torch.Tensor
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm: torch.Tensor | None = None

    def __post_init__(self):
        scored = self.hidden if self.hidden is not None else self.logits
        if scored is None or self.labels is None or self.labels.shape[:2] != scored.shape[:2]:
            raise ValueError("GETok loss: the forward gave no labels aligned with its hidden states or logits")


def step_loss(captured: Captured, head, table: TokenTable | BinsTable,
              settings: GETokSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, parts to log) of one step: the LM loss plus the weighted location loss (module docstring)."""
    targets = Targets.of(captured.labels)
    if captured.hidden is not None:
        flat = captured.hidden.reshape(len(targets.flat), -1)
        logits_at = lambda rows: head(flat[rows.to(flat.device)])  # noqa: E731
    else:
        logits_at = lambda rows: gather_rows(captured.logits, rows.numpy())  # noqa: E731
    lm = captured.lm
    scores = logits_at
    if lm is None:  # the LM head once, on the positions that have a target; the location loss reuses those rows
        rows = targets.scored
        logits = logits_at(torch.from_numpy(rows))
        lm = F.cross_entropy(logits.float(), torch.from_numpy(targets.flat[rows]).to(logits.device))
        scores = lambda at: logits[torch.from_numpy(np.searchsorted(rows, at.numpy())).to(logits.device)]  # noqa: E731
    s = settings
    parts = table.loss(scores, targets, sigma=s.sigma, with_box=s.box_weight > 0, offset_sigma=s.offset_sigma)
    total = lm
    if s.grid_weight > 0:
        total = total + s.grid_weight * parts["grid"]
    if s.box_weight > 0:
        total = total + s.box_weight * parts["box"]
    return total, {"loss_lm": lm, "loss_grid": parts["grid"], "loss_box": parts["box"]}

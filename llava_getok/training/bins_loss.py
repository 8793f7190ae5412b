"""The 1D analogue of the box-token loss for the bins format (``<loc_k>``, formats.BinsFormat): the distance between
bins, which plain cross-entropy ignores, added back to the LM loss.

Computed at the label positions whose target is a location token (after the causal shift, as the box-token loss):

- ``grid`` (the bins part): cross-entropy between the model's distribution renormalised over the K location tokens and
  a 1D Gaussian over bins centred on the target bin (``sigma`` in bins; 0 gives the one-hot target). Mean over those
  positions.
- ``box``: for each box in the labels (a run of exactly 4 adjacent location targets, x1 y1 x2 y2, as the format
  writes it), each coordinate's expected value under its distribution (a soft-argmax over the bin centres) against
  the target bin centres: L1 (mean of 4 coordinates) + (1 - generalised IoU), :func:`loss_parts.box_value_and_grad`.
  Mean over boxes.

In float32 (float64 for float64 logits) whatever autocast is on, with the gradient written by hand, as the
box-token loss; the trainer adds ``grid_weight * grid + box_weight * box`` and adds nothing when both are 0.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..formats import BinsFormat
from .loss_parts import (Targets, TokenLookup, box_value_and_grad, expectation_grad, float_dtype, gather_rows,
                         gaussian_targets, soft_cross_entropy_grad)


@dataclass(frozen=True, eq=False)
class BinsTable:
    """Token ids of one bins format in one tokenizer, as the loss indexes them."""

    cfg: BinsFormat
    ids: torch.Tensor  # (K,), index k is bin k

    @classmethod
    def from_ids(cls, cfg: BinsFormat, ids: list[int]) -> "BinsTable":
        """``ids``: the tokenizer ids of ``cfg.tokens()``, in that order."""
        return cls(cfg, torch.tensor(list(ids), dtype=torch.long))

    @functools.cached_property
    def lookup(self) -> TokenLookup:
        """The K location ids as the classes (bins) the loss reads."""
        return TokenLookup(self.ids)

    def loss(self, scores, targets: Targets, sigma: float = 1.0, with_box: bool = True, offset_sigma: float = 0.0):
        """:func:`bins_token_loss` (``offset_sigma``: GETok's, unused here), so that the step asks the table."""
        return bins_token_loss(scores, targets, self, sigma=sigma, with_box=with_box)


def find_bin_boxes(cls: np.ndarray) -> np.ndarray:
    """(M, 4) the positions (into the flat targets) of every box: a run of exactly 4 adjacent location
    targets. A row's last position is never a target (the causal shift), so no run crosses rows.

    >>> find_bin_boxes(np.array([-1, 3, 4, 5, 6, -1, 1, 2, -1, 1, 2, 3, 4, 5])).tolist()
    [[1, 2, 3, 4]]
    """
    is_loc = np.concatenate([[False], cls >= 0, [False]])
    edges = np.flatnonzero(is_loc[1:] != is_loc[:-1])
    starts, ends = edges[::2], edges[1::2]
    starts = starts[ends - starts == 4]
    return starts[:, None] + np.arange(4)[None]


def bins_token_loss(scores, targets: Targets, table: BinsTable, sigma: float = 1.0, with_box: bool = True) -> dict:
    """The two parts {"grid", "box"} (0-dim tensors, 0 when there is nothing to score) and the counts {"n_grid",
    "n_box"} of one batch's ``targets``; ``scores`` a function ``rows -> logits`` at flat positions or the (B, T, V)
    logits (as :func:`box_loss.box_token_loss`)."""
    parts = {"grid": torch.zeros(()), "box": torch.zeros(()), "n_grid": 0, "n_box": 0}
    cls = table.lookup.classes(targets.flat)
    rows = np.flatnonzero(cls >= 0)
    if not len(rows):
        return parts
    sub = gather_rows(scores, rows)
    dtype = float_dtype(sub)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    target = cls[rows]
    q = torch.from_numpy(gaussian_targets(target, table.cfg.bins, sigma, axes=1, dtype=np_dtype)).to(sub.device)
    boxes = find_bin_boxes(cls) if with_box else np.zeros((0, 4), dtype=np.int64)
    slots = torch.from_numpy(np.searchsorted(rows, boxes.reshape(-1))).to(sub.device) if len(boxes) else None
    true = table.cfg.centres(target[np.searchsorted(rows, boxes.reshape(-1))]).reshape(-1, 4) if len(boxes) else None
    centres = torch.from_numpy(table.cfg.centres(np.arange(table.cfg.bins))).to(sub.device, dtype)
    both = _BinsLoss.apply(table.lookup.columns(sub).to(dtype), q, slots, true, centres)
    parts["grid"], parts["n_grid"] = both[0], len(rows)
    if len(boxes):
        parts["box"], parts["n_box"] = both[1], len(boxes)
    return parts


class _BinsLoss(torch.autograd.Function):
    """(bins part, box part) of the scored rows' location logits ``sub`` (P, K), value and gradient at once."""

    @staticmethod
    def forward(ctx, sub, q, slots, true, centres):
        # in float32 whatever autocast is on, as the box-token loss (a bf16 soft-argmax loses the coordinates)
        with torch.autocast(sub.device.type, enabled=False):
            logp = F.log_softmax(sub, -1)
            p = logp.exp()
            value = -(q * logp).sum() / len(sub)
            g_box, box = None, 0.0
            if slots is not None:
                ps = p[slots]  # (4M, K): the coordinates of the boxes, x1 y1 x2 y2 after one another
                expect = ps @ centres  # (4M,)
                box, g_x = box_value_and_grad(expect.detach().cpu().double().numpy().reshape(-1, 4), true)
                g = torch.from_numpy(g_x.reshape(-1)).to(sub.device, sub.dtype)[:, None]
                g_box = torch.zeros_like(sub).index_add_(0, slots, expectation_grad(ps, centres[:, None], g))
        ctx.save_for_backward(p, q, g_box)
        return torch.stack([value, value.new_tensor(box)])

    @staticmethod
    def backward(ctx, grad):
        p, q, g_box = ctx.saved_tensors
        out = grad[0] * soft_cross_entropy_grad(p, q, len(p))
        if g_box is not None:
            out = out + grad[1] * g_box
        return out, None, None, None, None

"""The 1D analogue of the box-token loss for the bins format (``<loc_k>``, formats.BinsFormat): the distance between
bins, which plain cross-entropy ignores, added back to the LM loss.

Computed at the label positions whose target is a location token (after the causal shift, as the box-token loss):

- ``grid`` (the bins part): cross-entropy between the model's distribution renormalised over the K location tokens and
  a 1D Gaussian over bins centred on the target bin (``sigma`` in bins; 0 gives the one-hot target). Mean over those
  positions.
- ``box``: for each box in the labels (a run of exactly 4 adjacent location targets, x1 y1 x2 y2, as the format
  writes it), each coordinate's expected value under its distribution (a soft-argmax over the bin centres) against
  the target bin centres: L1 (mean of 4 coordinates) + (1 - generalised IoU), :func:`box_loss.box_value_and_grad`.
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
from .box_loss import box_value_and_grad, shifted_targets


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
    def klass(self) -> np.ndarray:
        """id -> bin index (-1 for other ids); its last entry, -1, stands for every id past the table and every
        negative label."""
        k = np.full(int(self.ids.max()) + 2, -1, dtype=np.int64)
        k[self.ids.numpy()] = np.arange(len(self.ids))
        return k

    @functools.cached_property
    def _col_slice(self) -> slice | None:
        c = self.ids.numpy()
        return slice(int(c[0]), int(c[-1]) + 1) if (np.diff(c) == 1).all() else None

    def columns(self, logits: torch.Tensor) -> torch.Tensor:
        """(P, V) logits -> (P, K), a view when the ids are one run (as the tokens are added)."""
        s = self._col_slice
        return logits[:, s] if s is not None else logits[:, self.ids.to(logits.device)]

    def classes(self, flat: np.ndarray) -> np.ndarray:
        """Bin index of each label (-1 for labels that are no location token)."""
        k = self.klass
        return k[np.minimum(flat.astype(np.uint64), len(k) - 1)]  # negative labels wrap to huge values

    def loss(self, logits, labels, sigma: float = 1.0, with_box: bool = True, offset_sigma: float = 0.0):
        """:func:`bins_token_loss` (``offset_sigma``: GETok's, unused here), so that the trainer asks the table."""
        return bins_token_loss(logits, labels, self, sigma=sigma, with_box=with_box)


def bin_targets(target, bins: int, sigma: float, dtype=np.float64) -> np.ndarray:
    """(P, K) normalised 1D Gaussians over the K bins centred on the bins ``target`` (P,), ``sigma`` in bins; 0
    gives one-hot. Made per target row (no (K, K) table: K may be large).

    >>> q = bin_targets([2], 5, 1.0)
    >>> int(q.argmax()), round(float(q.sum()), 6), bool(q[0, 1] == q[0, 3])
    (2, 1.0, True)
    """
    target = np.asarray(target, dtype=np.int64)
    if sigma <= 0:
        q = np.zeros((len(target), bins), dtype)
        q[np.arange(len(target)), target] = 1
        return q
    k = np.arange(bins)
    q = np.exp(-((k[None] - target[:, None]) ** 2) / (2 * float(sigma) ** 2))
    return (q / q.sum(1, keepdims=True)).astype(dtype, copy=False)


def find_bin_boxes(cls: np.ndarray) -> np.ndarray:
    """(M, 4) the positions (into the flat shifted targets) of every box: a run of exactly 4 adjacent location
    targets. A row's last position is never a target (the causal shift), so no run crosses rows.

    >>> find_bin_boxes(np.array([-1, 3, 4, 5, 6, -1, 1, 2, -1, 1, 2, 3, 4, 5])).tolist()
    [[1, 2, 3, 4]]
    """
    is_loc = np.concatenate([[False], cls >= 0, [False]])
    edges = np.flatnonzero(is_loc[1:] != is_loc[:-1])
    starts, ends = edges[::2], edges[1::2]
    starts = starts[ends - starts == 4]
    return starts[:, None] + np.arange(4)[None]


def bins_token_loss(logits, labels, table: BinsTable, sigma: float = 1.0, with_box: bool = True) -> dict:
    """The two parts {"grid", "box"} (0-dim tensors, 0 when there is nothing to score) and the counts {"n_grid",
    "n_box"} for the model's unshifted ``labels`` (B, T), a tensor or its host copy; ``logits`` the (B, T, V) logits
    or a function ``rows -> logits`` at flat positions (as :func:`box_loss.box_token_loss`)."""
    parts = {"grid": torch.zeros(()), "box": torch.zeros(()), "n_grid": 0, "n_box": 0}
    B, T = labels.shape
    flat = shifted_targets(labels if isinstance(labels, np.ndarray) else labels.detach().cpu().numpy())
    cls = table.classes(flat)
    rows = np.flatnonzero(cls >= 0)
    if not len(rows):
        return parts
    at = torch.from_numpy(rows)
    sub = logits(at) if callable(logits) else logits.reshape(B * T, -1)[at.to(logits.device)]
    dtype = torch.float64 if sub.dtype == torch.float64 else torch.float32  # half is upcast, as transformers does
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    target = cls[rows]
    q = torch.from_numpy(bin_targets(target, table.cfg.bins, sigma, np_dtype)).to(sub.device)
    boxes = find_bin_boxes(cls) if with_box else np.zeros((0, 4), dtype=np.int64)
    slots = torch.from_numpy(np.searchsorted(rows, boxes.reshape(-1))).to(sub.device) if len(boxes) else None
    true = table.cfg.centres(target[np.searchsorted(rows, boxes.reshape(-1))]).reshape(-1, 4) if len(boxes) else None
    centres = torch.from_numpy(table.cfg.centres(np.arange(table.cfg.bins))).to(sub.device, dtype)
    both = _BinsLoss.apply(table.columns(sub).to(dtype), q, slots, true, centres)
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
                # through the soft-argmax: d(sum_k p_k c_k)/d z_k = p_k (c_k - sum_j p_j c_j)
                g_box = torch.zeros_like(sub).index_add_(0, slots, g * ps * (centres[None] - expect[:, None]))
        ctx.save_for_backward(p, q, g_box)
        return torch.stack([value, value.new_tensor(box)])

    @staticmethod
    def backward(ctx, grad):
        p, q, g_box = ctx.saved_tensors
        out = grad[0] * (p - q) / len(p)  # d(soft cross-entropy)/d(logit) = p - q, averaged over the rows
        if g_box is not None:
            out = out + grad[1] * g_box
        return out, None, None, None, None

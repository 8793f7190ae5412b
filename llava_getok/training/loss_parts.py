"""The pieces the box-token loss (GETok, ``box_loss``) and its 1D analogue (bins, ``bins_loss``) are both made of.

- :class:`Targets`: what each position of a (B, T) label batch predicts, ``labels[:, t + 1]`` (the causal shift of
  transformers' ``ForCausalLMLoss``), taken once per step by :func:`llava_getok.training.step.step_loss`.
- :class:`TokenLookup`: token id -> class (the column of the location token in the loss), for any ids.
- :func:`gaussian_targets`: soft targets over a lattice of one or two axes (a normalised Gaussian per axis).
- :func:`soft_cross_entropy_grad`, :func:`expectation_grad`: the hand-written gradients of a soft cross-entropy
  and of a soft-argmax (expected value under a softmax), which both losses apply in their backward.
- :func:`box_value_and_grad`: L1 + (1 - generalised IoU) of expected box corners, and its gradient.

Everything here takes numpy arrays or tensors, never a model: a backend hands the step its labels and a head.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Targets:
    """The targets of a (B, T) label batch after the causal shift, flattened: ``flat[b * T + t]`` is
    ``labels[b, t + 1]``, IGNORE_INDEX at the last position of each row; ``row_len`` is T.

    >>> t = Targets.of(np.array([[-100, 5, 6], [7, 8, -100]]))
    >>> t.flat.tolist(), t.row_len
    ([5, 6, -100, 8, -100, -100], 3)
    """

    flat: np.ndarray
    row_len: int

    @classmethod
    def of(cls, labels) -> "Targets":
        """From unshifted ``labels`` (B, T): a tensor (copied to the host) or a numpy array."""
        labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        pad = np.full((len(labels), 1), IGNORE_INDEX, labels.dtype)
        return cls(np.concatenate([labels[:, 1:], pad], 1).reshape(-1), labels.shape[1])

    @property
    def scored(self) -> np.ndarray:
        """Flat positions that have a target (LLaVA's LM loss averages over these)."""
        return np.flatnonzero(self.flat != IGNORE_INDEX)


@dataclass(frozen=True, eq=False)
class TokenLookup:
    """Token ids (K,) as the classes 0..K-1 of a loss: :meth:`classes` maps any labels to them (-1 for others);
    :meth:`columns` takes those K columns of (P, V) logits, as a view when the ids are one run (as the tokens are
    added), which spares a copy forward and a scatter backward."""

    ids: torch.Tensor

    @functools.cached_property
    def _table(self) -> np.ndarray:
        # id -> class; the last entry, -1, stands for every id past the table and every negative label
        k = np.full(int(self.ids.max()) + 2, -1, dtype=np.int64)
        k[self.ids.numpy()] = np.arange(len(self.ids))
        return k

    def classes(self, flat: np.ndarray) -> np.ndarray:
        k = self._table
        return k[np.minimum(flat.astype(np.uint64), len(k) - 1)]  # negative labels wrap to huge values

    @functools.cached_property
    def _run(self) -> slice | None:
        c = self.ids.numpy()
        return slice(int(c[0]), int(c[-1]) + 1) if (np.diff(c) == 1).all() else None

    def columns(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self._run] if self._run is not None else logits[:, self.ids.to(logits.device)]


def gaussian_targets(target, side: int, sigma: float, axes: int = 2, dtype=np.float64) -> np.ndarray:
    """(P, side**axes) soft targets over a lattice of ``side`` steps per axis (row-major: the last axis inner, as grid
    tokens are j * n + i and bins are k), centred on the classes ``target`` (P,): the product of a normalised 1D
    Gaussian per axis, ``sigma`` in lattice steps; 0 gives one-hot.

    >>> q = gaussian_targets([4], 3, 1.0)
    >>> int(q.argmax()), round(float(q.sum()), 6)
    (4, 1.0)
    >>> q = gaussian_targets([2], 5, 1.0, axes=1)
    >>> int(q.argmax()), bool(q[0, 1] == q[0, 3])
    (2, True)
    """
    target = np.asarray(target, dtype=np.int64)
    if sigma <= 0:
        q = np.zeros((len(target), side**axes), dtype)
        q[np.arange(len(target)), target] = 1
        return q
    if axes == 1:  # one row per target (no (side, side) table: K bins may be many)
        k = np.arange(side)
        q = np.exp(-((k[None] - target[:, None]) ** 2) / (2 * float(sigma) ** 2))
        return (q / q.sum(1, keepdims=True)).astype(dtype, copy=False)
    g = _gaussian_rows(side, float(sigma)).astype(dtype, copy=False)
    return (g[target // side][:, :, None] * g[target % side][:, None, :]).reshape(len(target), side * side)


@functools.lru_cache(maxsize=16)
def _gaussian_rows(side: int, sigma: float) -> np.ndarray:
    """(side, side): row c is the normalised 1D Gaussian over 0..side-1 centred on c."""
    k = np.arange(side)
    g = np.exp(-((k[None] - k[:, None]) ** 2) / (2 * sigma**2))
    return g / g.sum(1, keepdims=True)


def soft_cross_entropy_grad(p: torch.Tensor, q: torch.Tensor, rows: int) -> torch.Tensor:
    """d/d(logits) of ``-(q * log_softmax(logits)).sum() / rows`` where ``p`` is the softmax: (p - q) / rows."""
    return (p - q) / rows


def expectation_grad(p: torch.Tensor, values: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/d(logits) of ``g . (p @ values)`` (the soft-argmax: expected value under the softmax ``p`` (R, C) of points
    ``values`` (C, D), with upstream gradient ``g`` (R, D)): ``p_k (g . v_k - sum_j p_j g . v_j)``."""
    proj = g @ values.t()  # (R, C)
    return p * (proj - (p * proj).sum(1, keepdim=True))


def box_value_and_grad(x: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    """Box part for predicted corners ``x`` (K, 4) against targets ``t`` (K, 4), both x1 y1 x2 y2 in any corner order:
    mean over boxes of L1 (mean of 4 coordinates) + 1 - generalised IoU, and its gradient with respect to ``x``.
    Plain numpy: K is the number of boxes in a batch."""
    K = len(x)
    first_lo = x[:, :2] <= x[:, 2:]  # corners put in order for the IoU: lo = min, hi = max per axis
    lo, hi = np.minimum(x[:, :2], x[:, 2:]), np.maximum(x[:, :2], x[:, 2:])
    t_lo, t_hi = np.minimum(t[:, :2], t[:, 2:]), np.maximum(t[:, :2], t[:, 2:])
    side = hi - lo
    overlap = np.minimum(hi, t_hi) - np.maximum(lo, t_lo)
    o = np.maximum(overlap, 0)
    hull = np.maximum(hi, t_hi) - np.minimum(lo, t_lo)
    inter, c = o.prod(1), hull.prod(1)
    eps = 1e-9
    union = side.prod(1) + (t_hi - t_lo).prod(1) - inter
    giou = inter / (union + eps) - (c - union) / (c + eps)
    value = float(np.mean(np.abs(x - t).mean(1) + 1 - giou))
    # d giou / d (inter, area, hull), with union = area + target area - inter
    d_inter = (1 / (union + eps) + inter / (union + eps) ** 2 - 1 / (c + eps))[:, None]
    d_area = (-inter / (union + eps) ** 2 + 1 / (c + eps))[:, None]
    d_hull = (-(union + eps) / (c + eps) ** 2)[:, None]
    o_other, side_other, hull_other = o[:, ::-1], side[:, ::-1], hull[:, ::-1]  # the other axis' factor
    live = overlap > 0
    d_hi = d_inter * o_other * (live & (hi < t_hi)) + d_area * side_other + d_hull * hull_other * (hi > t_hi)
    d_lo = -(d_inter * o_other * (live & (lo > t_lo)) + d_area * side_other + d_hull * hull_other * (lo < t_lo))
    d_giou = np.concatenate([np.where(first_lo, d_lo, d_hi), np.where(first_lo, d_hi, d_lo)], 1)
    return value, (np.sign(x - t) / 4 - d_giou) / K


def float_dtype(t: torch.Tensor) -> torch.dtype:
    """The loss's compute dtype for logits ``t``: float64 stays, everything else (half included) is float32, as
    transformers upcasts its LM loss."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gather_rows(scores, rows: np.ndarray) -> torch.Tensor:
    """(len(rows), V) logits at flat positions ``rows``: ``scores`` is a function ``rows -> logits`` (the step's head
    callable) or the (B, T, V) logits."""
    at = torch.from_numpy(rows)
    return scores(at) if callable(scores) else scores.reshape(-1, scores.shape[-1])[at.to(scores.device)]

"""Box-token loss (spec section 7): the 2D structure of grid tokens, added to the LM loss.

Computed at the label positions whose target is a GETok grid or offset token (after the causal shift:
``logits[:, t]`` predicts ``labels[:, t + 1]``):

- ``grid``: cross-entropy between the model's distribution renormalised over the n² grid tokens and a 2D
  Gaussian over cells centred on the target cell (``sigma`` in cells; 0 gives the one-hot target). Offset
  targets get the same over the m x m offset tokens with ``offset_sigma`` (default 0: one-hot) **(ours)**.
  Mean over those positions.
- ``box``: for each ``<box> P P </box>`` in the labels, the expected corners under the grid (and offset)
  distributions (a soft-argmax over anchors, plus the expected offset steps) against the target corners:
  L1 (mean of 4 coordinates) + (1 - generalised IoU). Mean over boxes.

total = L_lm + grid_weight * grid + box_weight * box; with both weights 0 nothing is added (the trainer
then runs LLaVA's own loss path: plain LLaVA training, bit for bit).

Cost: where the targets and boxes are is integer bookkeeping on the labels, done in numpy on a host copy of
them (no gradient flows there); torch then runs a fixed, small number of operations on one gather of the
scored logits, whatever the batch holds (bench/train_overhead.py measures it against plain LLaVA).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..vocab import GETokConfig

IGNORE_INDEX = -100


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Token ids of one GETok config in one tokenizer, as arrays the loss indexes with."""

    cfg: GETokConfig
    grid_ids: torch.Tensor  # (n*n,), index j * n + i is cell (i, j)
    offset_ids: torch.Tensor  # (m*m,), in cfg.offset_values order
    box_open: int
    box_close: int

    @classmethod
    def from_ids(cls, cfg: GETokConfig, ids: list[int]) -> "TokenTable":
        """``ids``: the tokenizer ids of ``cfg.tokens()``, in that order."""
        of = dict(zip(cfg.tokens(), ids))
        grid, off = torch.tensor([of[t] for t in cfg.grid_tokens]), torch.tensor([of[t] for t in cfg.offset_tokens])
        return cls(cfg, grid, off, of["<box>"], of["</box>"])

    @functools.cached_property
    def cols(self) -> torch.Tensor:
        """Grid then offset ids: the columns of the logits the loss reads."""
        return torch.cat([self.grid_ids, self.offset_ids])

    @functools.cached_property
    def klass(self) -> np.ndarray:
        """id -> column index in :attr:`cols` (-1 for other ids), a lookup table."""
        k = np.full(int(self.cols.max()) + 1, -1, dtype=np.int64)
        k[self.cols.numpy()] = np.arange(len(self.cols))
        return k

    @functools.cached_property
    def anchors(self) -> np.ndarray:
        """(n*n, 2) cell centres (x, y), normalised, in grid_ids order."""
        n = self.cfg.grid
        k = np.arange(n * n)
        return (np.stack([k % n, k // n], 1) + 0.5) / n

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """(m*m, 2) (dx, dy) of every offset class."""
        return np.asarray(self.cfg.offset_values, dtype=np.float64)

    @functools.lru_cache(maxsize=16)
    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cols, anchors, offsets) on ``device`` in ``dtype``, made once: a copy per step costs more than the loss."""
        return (self.cols.to(device), torch.as_tensor(self.anchors).to(device, dtype),
                torch.as_tensor(self.offsets).to(device, dtype))


def soft_targets(target, side: int, sigma: float) -> np.ndarray:
    """(P, side²) Gaussian targets over a side x side lattice in row-major order (y outer, as grid and offset
    tokens are), centred on the classes ``target`` (P,), ``sigma`` in lattice steps; 0 gives one-hot. The
    Gaussian is separable: the product of two normalised 1D Gaussians, so no (side², side²) table is needed.

    >>> q = soft_targets([4], 3, 1.0)
    >>> int(q.argmax()), round(float(q.sum()), 6)
    (4, 1.0)
    """
    target = np.asarray(target, dtype=np.int64)
    if sigma <= 0:
        return np.eye(side * side)[target]
    k = np.arange(side)
    gx = np.exp(-((k[None] - (target % side)[:, None]) ** 2) / (2 * sigma**2))
    gy = np.exp(-((k[None] - (target // side)[:, None]) ** 2) / (2 * sigma**2))
    gx, gy = gx / gx.sum(1, keepdims=True), gy / gy.sum(1, keepdims=True)
    return (gy[:, :, None] * gx[:, None, :]).reshape(len(target), side * side)


class BoxSlots(NamedTuple):
    """Where the boxes of a label batch are, as indices into the flattened (B * T) labels (numpy arrays).

    corners: (2K,) the grid position of each corner, box after box; offsets: (Q,) the offset positions
    inside those boxes, with the corner (index into ``corners``) and the round (1-based) of each."""

    corners: np.ndarray
    offsets: np.ndarray
    offset_corner: np.ndarray
    offset_round: np.ndarray


def find_boxes(labels, table: TokenTable) -> BoxSlots:
    """The boxes in (shifted) ``labels`` (B, T): every ``<box>`` followed by exactly two grid targets, each
    followed only by offset targets, then ``</box>``, within one row. Anything else between ``<box>`` and the
    next ``</box>`` (text, a third corner, a second ``<box>``) drops that box."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    flat = labels.reshape(-1)
    return _find_boxes(flat, _classes(flat, table), labels.shape[1], table)


def _classes(flat: np.ndarray, table: TokenTable) -> np.ndarray:
    """Column in ``table.cols`` of each label (-1 for labels that are no grid or offset token)."""
    k = table.klass
    inside = (flat >= 0) & (flat < len(k))
    return np.where(inside, k[np.where(inside, flat, 0)], -1)


def _find_boxes(flat: np.ndarray, cls: np.ndarray, row_len: int, table: TokenTable) -> BoxSlots:
    n2 = len(table.grid_ids)
    none = BoxSlots(*(np.zeros(0, dtype=np.int64),) * 4)
    opens, closes = np.flatnonzero(flat == table.box_open), np.flatnonzero(flat == table.box_close)
    k = np.searchsorted(closes, opens)  # the first </box> after each <box>
    opens, ends = opens[k < len(closes)], closes[k[k < len(closes)]]
    if not len(opens):
        return none
    is_grid, is_off = (cls >= 0) & (cls < n2), cls >= n2
    n_grid = np.cumsum(is_grid)  # grid targets at or before each position
    n_other = np.cumsum(~(is_grid | is_off))
    ok = ((ends // row_len == opens // row_len) & (n_other[ends - 1] == n_other[opens])
          & (n_grid[ends - 1] - n_grid[opens] == 2) & is_grid[np.minimum(opens + 1, len(flat) - 1)])
    opens, ends = opens[ok], ends[ok]
    if not len(opens):
        return none
    grid_pos = np.flatnonzero(is_grid)
    first = n_grid[opens]  # index in grid_pos of each kept box's first corner
    corner_grid = np.stack([first, first + 1], 1).reshape(-1)
    span = np.zeros(len(flat) + 1, dtype=np.int64)  # +1 from a box's first inner position to its </box>
    np.add.at(span, opens + 1, 1)
    np.add.at(span, ends, -1)
    offsets = np.flatnonzero(is_off & (np.cumsum(span[:-1]) > 0))
    owner = n_grid[offsets] - 1  # index in grid_pos of the grid target each offset refines
    corner_of_grid = np.full(len(grid_pos), -1, dtype=np.int64)
    corner_of_grid[corner_grid] = np.arange(len(corner_grid))
    return BoxSlots(grid_pos[corner_grid], offsets, corner_of_grid[owner], offsets - grid_pos[owner])


def box_token_loss(logits, labels: torch.Tensor, table: TokenTable, sigma: float = 1.0,
                   with_box: bool = True, offset_sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """The two parts {"grid", "box"} (0-dim tensors, 0 when there is nothing to score) and the counts
    {"n_grid", "n_box"} for the model's unshifted ``labels`` (B, T).

    ``logits``: the (B, T, V) logits, or a function ``rows -> (len(rows), V)`` logits at flat positions
    ``rows`` (indices into B * T). The trainer passes the second, the LM head applied to the hidden states of
    the scored positions only: a loss on a few rows of the full logits would give them a second full-size
    gradient in the backward (B x T x V floats, gigabytes for a 7B model's batch)."""
    dtype = torch.float32
    parts = {"grid": torch.zeros(()), "box": torch.zeros(()), "n_grid": 0, "n_box": 0}
    B, T = labels.shape
    lab = labels.detach().cpu().numpy()
    flat = np.concatenate([lab[:, 1:], np.full((B, 1), IGNORE_INDEX, lab.dtype)], 1).reshape(-1)  # shifted
    cls = _classes(flat, table)
    n2 = len(table.grid_ids)
    grid_at, off_at = np.flatnonzero((cls >= 0) & (cls < n2)), np.flatnonzero(cls >= n2)
    if not len(grid_at) and not len(off_at):
        return parts
    G = len(grid_at)
    rows = torch.from_numpy(np.concatenate([grid_at, off_at]))  # grid targets first
    if callable(logits):
        sub = logits(rows)
    else:
        sub = logits.reshape(B * T, -1)[rows.to(logits.device)]
    dev = sub.device
    if sub.dtype == torch.float64:
        dtype = torch.float64
    cols, anchors, offsets = table.on(dev, dtype)
    sub = sub[:, cols].to(dtype)  # (P, n*n + m*m); half precision is upcast, as transformers does for the LM loss
    logp_grid = F.log_softmax(sub[:G, :n2], -1)  # row k: the k-th grid target in flat order
    logp_off = F.log_softmax(sub[G:, n2:], -1)
    total = torch.zeros((), device=dev, dtype=dtype)
    for logp, target, side, width in ((logp_grid, cls[grid_at], table.cfg.grid, sigma),
                                      (logp_off, cls[off_at] - n2, table.cfg.offset_levels, offset_sigma)):
        if not len(target):
            continue
        if width > 0:
            total = total + (torch.from_numpy(soft_targets(target, side, width)).to(dev, dtype) * logp).sum()
        else:  # one-hot: the target's log-probability
            total = total + logp.gather(1, torch.from_numpy(target).to(dev)[:, None]).sum()
    parts["grid"], parts["n_grid"] = -total / (G + len(off_at)), G + len(off_at)
    if with_box:
        slots = _find_boxes(flat, cls, T, table)
        if len(slots.corners):
            parts["box"] = _box_part(logp_grid, logp_off, cls, grid_at, off_at, slots, table, anchors, offsets)
            parts["n_box"] = len(slots.corners) // 2
    return parts


def _box_part(logp_grid, logp_off, cls, grid_at, off_at, slots: BoxSlots, table: TokenTable, anchors, offsets):
    """Expected anchor under the grid distribution plus the expected offset step of each round, against the
    decoded target corner; L1 + (1 - GIoU) per box, mean over boxes."""
    dev, dtype, cfg = logp_grid.device, logp_grid.dtype, table.cfg
    n2 = len(table.grid_ids)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    point = logp_grid[as_t(np.searchsorted(grid_at, slots.corners))].exp() @ anchors  # (2K, 2)
    true = table.anchors[cls[slots.corners]]
    if len(slots.offsets):
        steps = np.array([cfg.step(r) for r in range(1, int(slots.offset_round.max()) + 1)])[slots.offset_round - 1]
        probs = logp_off[as_t(np.searchsorted(off_at, slots.offsets))].exp()
        point = point.index_add(0, as_t(slots.offset_corner), as_t(steps[:, None]).to(dtype) * (probs @ offsets))
        np.add.at(true, slots.offset_corner, steps[:, None] * table.offsets[cls[slots.offsets] - n2])
    pred = point.reshape(-1, 4)
    true = np.clip(true, 0, 1).reshape(-1, 4)
    t_lo, t_hi = np.minimum(true[:, :2], true[:, 2:]), np.maximum(true[:, :2], true[:, 2:])
    t_area = (t_hi - t_lo).prod(1)
    true, t_lo, t_hi, t_area = (as_t(a).to(dtype) for a in (true, t_lo, t_hi, t_area))
    l1 = (pred - true).abs().mean(1)
    # generalised IoU, the predicted corners put in order first
    lo, hi = torch.minimum(pred[:, :2], pred[:, 2:]), torch.maximum(pred[:, :2], pred[:, 2:])
    inter = (torch.minimum(hi, t_hi) - torch.maximum(lo, t_lo)).clamp_min(0).prod(1)
    union = (hi - lo).prod(1) + t_area - inter
    hull = (torch.maximum(hi, t_hi) - torch.minimum(lo, t_lo)).prod(1)
    eps = 1e-9
    giou = inter / (union + eps) - (hull - union) / (hull + eps)
    return (l1 + 1 - giou).mean()

"""Box-token loss (spec section 7): the 2D structure of grid tokens, added to the LM loss.

Computed at the positions whose target (:class:`loss_parts.Targets`, after the causal shift) is a GETok grid or
offset token:

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

from ..vocab import TAGS, GETokConfig
from .loss_parts import (Targets, TokenLookup, box_value_and_grad, expectation_grad, float_dtype, gather_rows,
                         gaussian_targets, soft_cross_entropy_grad)


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
        open_, close = TAGS["box"]
        return cls(cfg, grid, off, of[open_], of[close])

    @functools.cached_property
    def lookup(self) -> TokenLookup:
        """Grid then offset ids: the classes (columns of the logits) the loss reads."""
        return TokenLookup(torch.cat([self.grid_ids, self.offset_ids]))

    @functools.cached_property
    def anchors(self) -> np.ndarray:
        """(n*n, 2) cell centres (x, y), normalised, in grid_ids order."""
        return self.cfg.grid_anchors

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """(m*m, 2) (dx, dy) of every offset class."""
        return np.asarray(self.cfg.offset_values, dtype=np.float64)

    def loss(self, scores, targets: Targets, sigma: float = 1.0, with_box: bool = True, offset_sigma: float = 0.0):
        """:func:`box_token_loss` with this table (the bins format's table has the same method: the step asks the
        table, whatever the format)."""
        return box_token_loss(scores, targets, self, sigma=sigma, with_box=with_box, offset_sigma=offset_sigma)

    @functools.lru_cache(maxsize=16)
    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchors, offsets) on ``device`` in ``dtype``, made once: a copy per step costs more than the loss."""
        return (torch.as_tensor(self.anchors).to(device, dtype), torch.as_tensor(self.offsets).to(device, dtype))


class BoxSlots(NamedTuple):
    """Where the boxes of a target batch are, as flat positions (numpy arrays).

    corners: (2K,) the grid position of each corner, box after box; offsets: (Q,) the offset positions
    inside those boxes, with the corner (index into ``corners``) and the round (1-based) of each."""

    corners: np.ndarray
    offsets: np.ndarray
    offset_corner: np.ndarray
    offset_round: np.ndarray


def find_boxes(targets: Targets, table: TokenTable) -> BoxSlots:
    """The boxes in ``targets``: every ``<box>`` followed by exactly two grid targets, each followed only by offset
    targets, then ``</box>``, within one row. Anything else between ``<box>`` and the next ``</box>`` (text, a third
    corner, a second ``<box>``) drops that box."""
    return _find_boxes(targets.flat, table.lookup.classes(targets.flat), targets.row_len, table)


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
    span[opens + 1] += 1  # kept boxes do not nest, so neither index repeats
    span[ends] -= 1
    offsets = np.flatnonzero(is_off & (np.cumsum(span[:-1]) > 0))
    owner = n_grid[offsets] - 1  # index in grid_pos of the grid target each offset refines
    corner_of_grid = np.full(len(grid_pos), -1, dtype=np.int64)
    corner_of_grid[corner_grid] = np.arange(len(corner_grid))
    return BoxSlots(grid_pos[corner_grid], offsets, corner_of_grid[owner], offsets - grid_pos[owner])


def box_token_loss(scores, targets: Targets, table: TokenTable, sigma: float = 1.0,
                   with_box: bool = True, offset_sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """The two parts {"grid", "box"} (0-dim tensors, 0 when there is nothing to score) and the counts
    {"n_grid", "n_box"} of one batch's ``targets``.

    ``scores``: a function ``rows -> (len(rows), V)`` logits at flat positions ``rows`` (the step's head callable,
    the LM head applied to those positions' hidden states only: a loss on a few rows of the full logits would give
    them a second full-size gradient in the backward, B x T x V floats, gigabytes for a 7B model's batch), or the
    (B, T, V) logits."""
    parts = {"grid": torch.zeros(()), "box": torch.zeros(()), "n_grid": 0, "n_box": 0}
    flat = targets.flat
    cls = table.lookup.classes(flat)
    n2 = len(table.grid_ids)
    grid_at, off_at = np.flatnonzero((cls >= 0) & (cls < n2)), np.flatnonzero(cls >= n2)
    if not len(grid_at) and not len(off_at):
        return parts
    sub = gather_rows(scores, np.concatenate([grid_at, off_at]))  # grid targets first
    dtype = float_dtype(sub)
    slots = _find_boxes(flat, cls, targets.row_len, table) if with_box else None
    plan = _plan(table, cls, grid_at, off_at, slots, sigma, offset_sigma, sub.device, dtype)
    both = _BoxTokenLoss.apply(table.lookup.columns(sub).to(dtype), plan)
    parts["grid"], parts["n_grid"] = both[0], len(sub)
    if plan.true is not None:
        parts["box"], parts["n_box"] = both[1], len(plan.true)
    return parts


class _Plan(NamedTuple):
    """Everything but the logits that the loss needs, made on the host and moved in two copies."""

    n2: int
    q_grid: torch.Tensor  # (G, n*n) soft targets of the grid rows (the first G rows) ...
    q_off: torch.Tensor  # (P - G, m*m) ... and of the offset rows
    true: np.ndarray | None  # (K, 4) decoded target corners; None: no box part
    corners: torch.Tensor | None  # (2K,) grid row of each box corner
    offset_rows: torch.Tensor | None  # (Q,) offset row of each offset inside a box, its corner and its step
    offset_corner: torch.Tensor | None
    offset_step: torch.Tensor | None  # (Q, 1)
    anchors: torch.Tensor
    offsets: torch.Tensor


def _plan(table, cls, grid_at, off_at, slots, sigma, offset_sigma, dev, dtype) -> _Plan:
    cfg, n2 = table.cfg, len(table.grid_ids)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    q = [gaussian_targets(cls[grid_at], cfg.grid, sigma, dtype=np_dtype),
         gaussian_targets(cls[off_at] - n2, cfg.offset_levels, offset_sigma, dtype=np_dtype)]
    anchors, offsets = table.on(dev, dtype)
    has_box = slots is not None and len(slots.corners)
    if has_box:
        # the target corners as codec.dequantize decodes them: anchor + sum of d_r * s_r (clipped below)
        steps = cfg.steps(int(slots.offset_round.max(initial=0)))[slots.offset_round - 1]
        true = table.anchors[cls[slots.corners]]
        np.add.at(true, slots.offset_corner, steps[:, None] * table.offsets[cls[slots.offsets] - n2])
        q.append(steps.astype(np_dtype))
    floats = torch.from_numpy(np.concatenate([a.reshape(-1) for a in q])).to(dev)
    ends = np.cumsum([a.size for a in q])
    q_grid, q_off = floats[:ends[0]].view(q[0].shape), floats[ends[0]:ends[1]].view(q[1].shape)
    if not has_box:
        return _Plan(n2, q_grid, q_off, None, None, None, None, None, anchors, offsets)
    K2, Q = len(slots.corners), len(slots.offsets)
    ints = torch.from_numpy(np.concatenate([np.searchsorted(grid_at, slots.corners), np.searchsorted(off_at, slots.offsets),
                                            slots.offset_corner])).to(dev)
    return _Plan(n2, q_grid, q_off, np.clip(true, 0, 1).reshape(-1, 4), ints[:K2], ints[K2:K2 + Q], ints[K2 + Q:],
                 floats[ends[1]:, None], anchors, offsets)


class _BoxTokenLoss(torch.autograd.Function):
    """(grid, box) of the scored rows' GETok logits ``sub`` (P, n*n + m*m), with the gradient written by hand.

    The loss is a few dozen operations on small tensors; as a chain of autograd nodes its backward cost more
    than the loss itself (bench/train_overhead.py). Here the forward computes the value and the gradient of
    both parts at once, the per-box arithmetic (K x 4 numbers) on the host in numpy, and the backward only
    scales them. tests/test_llava_box_loss.py checks value and gradient against a hand computation,
    numerical derivatives and torch.autograd.gradcheck."""

    @staticmethod
    def forward(ctx, sub, plan: _Plan):
        # in float32 (or float64) whatever autocast is on: under bf16 autocast the matmuls below would return
        # bf16 and mix with the float32 plan (index_add_ refuses that), and a bf16 soft-argmax loses the corners
        with torch.autocast(sub.device.type, enabled=False):
            return _BoxTokenLoss._forward(ctx, sub, plan)

    @staticmethod
    def _forward(ctx, sub, plan: _Plan):
        G, n2 = len(plan.q_grid), plan.n2
        logp_grid, logp_off = F.log_softmax(sub[:G, :n2], -1), F.log_softmax(sub[G:, n2:], -1)
        p_grid, p_off = logp_grid.exp(), logp_off.exp()
        grid = -((plan.q_grid * logp_grid).sum() + (plan.q_off * logp_off).sum()) / len(sub)
        g_box = None
        box = 0.0
        if plan.true is not None:
            pc = p_grid[plan.corners]
            point = pc @ plan.anchors  # expected anchor of each corner (2K, 2) ...
            if len(plan.offset_rows):  # ... plus the expected step of each offset round
                po = p_off[plan.offset_rows]
                point = point.index_add(0, plan.offset_corner, plan.offset_step * (po @ plan.offsets))
            box, g_x = box_value_and_grad(point.detach().cpu().double().numpy().reshape(-1, 4), plan.true)
            g_point = torch.from_numpy(g_x.reshape(-1, 2)).to(sub.device, sub.dtype)
            # through the soft-argmax of the anchors and of each offset round's steps
            g_box = torch.zeros_like(sub)
            g_box[:G, :n2].index_add_(0, plan.corners, expectation_grad(pc, plan.anchors, g_point))
            if len(plan.offset_rows):
                g_off = expectation_grad(po, plan.offsets, g_point[plan.offset_corner])
                g_box[G:, n2:].index_add_(0, plan.offset_rows, plan.offset_step * g_off)
        ctx.save_for_backward(p_grid, p_off, g_box)
        ctx.plan = plan
        return torch.stack([grid, grid.new_tensor(box)])

    @staticmethod
    def backward(ctx, grad):
        p_grid, p_off, g_box = ctx.saved_tensors
        plan, G, n2 = ctx.plan, len(p_grid), ctx.plan.n2
        rows = len(p_grid) + len(p_off)  # the soft cross-entropy is a mean over all P rows
        out = grad[1] * g_box if g_box is not None else p_grid.new_zeros(rows, n2 + p_off.shape[1])
        out[:G, :n2] += grad[0] * soft_cross_entropy_grad(p_grid, plan.q_grid, rows)
        out[G:, n2:] += grad[0] * soft_cross_entropy_grad(p_off, plan.q_off, rows)
        return out, None

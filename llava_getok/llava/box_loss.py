"""Box-token loss (spec section 7): the 2D structure of grid tokens, added to the LM loss. Torch only.

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
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..vocab import GETokConfig

IGNORE_INDEX = -100


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Token ids of one GETok config in one tokenizer, as tensors the loss indexes with."""

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
        for name, t in (("grid", grid), ("offset", off)):
            if len(t) > 1 and not bool((t[1:] > t[:-1]).all()):  # the loss maps ids to classes by searchsorted
                raise ValueError(f"GETok {name} token ids must increase in cfg.tokens() order, got {t[:5].tolist()}...")
        return cls(cfg, grid, off, of["<box>"], of["</box>"])

    @functools.cached_property
    def cols(self) -> torch.Tensor:
        """Grid then offset ids: the columns of the logits the loss reads."""
        return torch.cat([self.grid_ids, self.offset_ids])

    @functools.cached_property
    def klass(self) -> torch.Tensor:
        """id -> column index in :attr:`cols` (-1 for other ids), a lookup table."""
        k = torch.full((int(self.cols.max()) + 1,), -1, dtype=torch.long)
        k[self.cols] = torch.arange(len(self.cols))
        return k

    @functools.lru_cache(maxsize=8)
    def target_table(self, kind: str, sigma: float) -> torch.Tensor:
        """(K, K) soft targets of every class of ``kind`` ("grid" or "offset"), row c centred on class c."""
        coords = self.cell_xy() if kind == "grid" else self.offset_xy()
        return soft_targets(torch.arange(len(coords)), coords, sigma)

    def cell_xy(self) -> torch.Tensor:
        """(n*n, 2) cell indices (i, j) in grid_ids order."""
        n = self.cfg.grid
        k = torch.arange(n * n)
        return torch.stack([k % n, k // n], 1)

    def offset_xy(self) -> torch.Tensor:
        return torch.tensor(self.cfg.offset_values)


def soft_targets(target: torch.Tensor, coords: torch.Tensor, sigma: float) -> torch.Tensor:
    """(P, K) Gaussian targets over K classes at integer 2D ``coords`` (K, 2), centred on class ``target`` (P,).

    >>> q = soft_targets(torch.tensor([4]), torch.tensor([[i, j] for j in range(3) for i in range(3)]), 1.0)
    >>> int(q.argmax()), round(float(q.sum()), 6)
    (4, 1.0)
    """
    if sigma <= 0:
        return F.one_hot(target, len(coords)).double()
    d2 = (coords[None, :, :] - coords[target][:, None, :]).double().pow(2).sum(-1)
    q = torch.exp(-d2 / (2 * sigma**2))
    return q / q.sum(-1, keepdim=True)


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision logits are upcast, as transformers does for the LM loss)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _soft_ce(logits_sub: torch.Tensor, target: torch.Tensor, coords: torch.Tensor, sigma: float) -> torch.Tensor:
    logp = F.log_softmax(_up(logits_sub), dim=-1)
    q = soft_targets(target, coords.to(target.device), sigma).to(logp)
    return -(q * logp).sum(-1)


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of boxes (B, 4) x1 y1 x2 y2 (corners put in order first)."""
    a = torch.cat([torch.minimum(a[:, :2], a[:, 2:]), torch.maximum(a[:, :2], a[:, 2:])], 1)
    b = torch.cat([torch.minimum(b[:, :2], b[:, 2:]), torch.maximum(b[:, :2], b[:, 2:])], 1)
    area = lambda x: (x[:, 2] - x[:, 0]).clamp_min(0) * (x[:, 3] - x[:, 1]).clamp_min(0)
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(1)
    union = area(a) + area(b) - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp_min(0).prod(1)
    eps = 1e-9
    iou = inter / (union + eps)
    return iou - (hull - union) / (hull + eps)


def find_boxes(labels: torch.Tensor, table: TokenTable) -> list[tuple[int, list[list[int]]]]:
    """Boxes in (shifted) labels: (row, [[grid position, offset positions...], [corner 2]]) for every
    ``<box>`` ... ``</box>`` holding exactly two grid targets, each followed only by offset targets."""
    grid, off = set(table.grid_ids.tolist()), set(table.offset_ids.tolist())
    out = []
    for b in torch.nonzero((labels == table.box_open).any(1)).flatten().tolist():
        row = labels[b].tolist()
        t = 0
        while t < len(row):
            if row[t] != table.box_open:
                t += 1
                continue
            corners, ok, t = [], True, t + 1
            while t < len(row) and row[t] != table.box_close:
                if row[t] in grid:
                    corners.append([t])
                elif row[t] in off and corners:
                    corners[-1].append(t)
                else:
                    ok = False
                t += 1
            if ok and t < len(row) and len(corners) == 2:
                out.append((b, corners))
    return out


def box_token_loss(logits: torch.Tensor, labels: torch.Tensor, table: TokenTable, sigma: float = 1.0,
                   with_box: bool = True, offset_sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """The two parts {"grid", "box"} (0-dim tensors, 0 when there is nothing to score) and the counts
    {"n_grid", "n_box"} for ``logits`` (B, T, V) and the model's unshifted ``labels`` (B, T)."""
    # labels shifted onto the logits that predict them (no slice of the logits: its backward would allocate
    # another full-size gradient)
    labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
    zero = _up(logits.new_zeros(()))
    parts = {"grid": zero, "box": zero, "n_grid": 0, "n_box": 0}
    klass = table.klass.to(labels.device)
    safe = labels.clamp(0, len(klass) - 1)
    cls_all = torch.where((labels >= 0) & (labels < len(klass)), klass[safe], -1)
    where = cls_all >= 0
    if not bool(where.any()):
        return parts
    # One gather of the scored positions, then of the GETok columns: indexing the (B, T, V) logits once per
    # position or box made the backward scatter into a full-size zero tensor each time.
    sub = _up(logits[where][:, table.cols.to(logits.device)])  # (P, n*n + m*m)
    cls = cls_all[where]
    n2 = len(table.grid_ids)
    is_grid = cls < n2

    losses = []
    for mask, lo, hi, kind, width in ((is_grid, 0, n2, "grid", sigma), (~is_grid, n2, sub.shape[1], "offset", offset_sigma)):
        if bool(mask.any()):
            logp = F.log_softmax(sub[mask][:, lo:hi], dim=-1)
            q = table.target_table(kind, float(width)).to(logp.device, logp.dtype)[cls[mask] - lo]
            losses.append(-(q * logp).sum(-1))
    per_pos = torch.cat(losses)
    parts["grid"], parts["n_grid"] = per_pos.mean(), len(per_pos)

    if with_box:
        boxes = find_boxes(labels, table)
        if boxes:
            row_of = {bt: k for k, bt in enumerate(map(tuple, where.nonzero().tolist()))}
            parts["box"] = _box_part(sub, cls, boxes, row_of, table)
            parts["n_box"] = len(boxes)
    return parts


def _box_part(sub, cls, boxes, row_of, table: TokenTable) -> torch.Tensor:
    """Vectorised over corners: expected anchor under the grid distribution, plus the expected offset step
    of each round, against the decoded target point. ``sub``: (P, n*n + m*m) GETok logits of the scored
    positions, ``cls``: their target column."""
    cfg = table.cfg
    n2 = len(table.grid_ids)
    anchors = (table.cell_xy().to(sub.device, sub.dtype) + 0.5) / cfg.grid  # (n*n, 2)
    offs = table.offset_xy().to(sub.device, sub.dtype)  # (m*m, 2)
    corners = [[row_of[(b, t)] for t in positions] for b, pair in boxes for positions in pair]  # 2 per box
    g = torch.tensor([c[0] for c in corners], device=sub.device)
    point = F.softmax(sub[g][:, :n2], -1) @ anchors
    true = anchors[cls[g]]
    for r in range(1, max(len(c) for c in corners)):
        which = torch.tensor([k for k, c in enumerate(corners) if len(c) > r], device=sub.device)
        o = torch.tensor([c[r] for c in corners if len(c) > r], device=sub.device)
        step = cfg.step(r)
        point = point.index_add(0, which, step * (F.softmax(sub[o][:, n2:], -1) @ offs))
        true = true.index_add(0, which, step * offs[cls[o] - n2])
    pred = point.reshape(-1, 4)
    true = true.clamp(0, 1).reshape(-1, 4)
    l1 = (pred - true).abs().mean(1)
    return (l1 + 1 - _giou(pred, true)).mean()

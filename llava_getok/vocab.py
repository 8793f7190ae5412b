"""GETok vocabulary: the config object, the token tables and the lattice's numbers (spec sections 2-5).

Every other module takes a :class:`GETokConfig` and asks it for token names, cell anchors, offset steps,
how many offsets follow a grid token and the grid-only variant of a config; shape kinds map to their tags
through :data:`KIND_TAGS`. So the writer (codec) and the readers (parse, loss, constrained decoding,
converters) cannot disagree about the convention: nothing else recomputes it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from .options import option

GRID_FORMAT = "<grid_{i}_{j}>"
OFFSET_FORMAT = "<off_{dx}_{dy}>"
DELETE = "<delete>"
TAGS = {"box": ("<box>", "</box>"), "seg": ("<seg>", "</seg>"), "pl": ("<pl>", "</pl>"), "offset": ("<offset>", "</offset>")}
TAG_TOKENS = tuple(t for pair in TAGS.values() for t in pair)
SHAPE_KINDS = ("point", "box", "polyline", "mask")
KIND_TAGS = {"box": "box", "polyline": "pl", "mask": "seg"}  # shape kind -> its tag in TAGS; a point has none
TAG_KINDS = {tag: kind for kind, tag in KIND_TAGS.items()}
# One regex, built from the same formats that write the tokens, recognises every GETok token in text.
TOKEN_RE = re.compile(
    r"<grid_(?P<i>\d+)_(?P<j>\d+)>|<off_(?P<dx>-?\d+)_(?P<dy>-?\d+)>|(?P<delete><delete>)|(?P<tag></?(?:box|seg|pl|offset)>)"
)

MODES = ("grid", "inline", "refine")
SCHEDULES = ("halving", "fixed")


@dataclass(frozen=True)
class GETokConfig:
    """How locations become tokens.

    grid: n, the lattice is n x n cells over the normalised frame [0, 1]^2.
    rounds: R, offset rounds per point. Defaults to 0 for mode "grid" and 1 otherwise.
    offset_levels: m, offset values per axis (odd, >= 3); dx, dy in {-(m-1)/2, ..., (m-1)/2}.
    schedule: "halving" (step of round r is 1 / (n (m-1)^r)) or "fixed" (1 / (n (m-1)) every round).
    mode: "grid" (grid tokens only), "inline" (each grid token followed by its R offsets) or
        "refine" (grid-only first answer, then one offset per point in a second turn).

    >>> cfg = GETokConfig(grid=4, rounds=1)
    >>> len(cfg.tokens()), cfg.tokens()[:2], cfg.grid_token(1, 2)
    (34, ('<grid_0_0>', '<grid_1_0>'), '<grid_1_2>')
    """

    grid: int = option(32, "n: grid tokens anchor an n x n lattice of cells over the image's frame")
    rounds: int | None = option(None, "R: offset rounds per point (default: 0 for mode grid, else 1)")
    offset_levels: int = option(3, "m: offset values per axis, odd, >= 3 (m = 3: dx, dy in {-1, 0, 1})")
    schedule: str = option("halving", "offset step of round r: halving, 1 / (n (m-1)^r); fixed, 1 / (n (m-1))",
                           choices=SCHEDULES)
    mode: str = option("inline", "grid: grid tokens only; inline: each followed by its offsets; refine: offsets in a "
                       "second turn", choices=MODES)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"GETokConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"GETokConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.grid, int) or not 1 <= self.grid <= 1000:
            raise ValueError(f"GETokConfig.grid must be an integer in [1, 1000], got {self.grid!r}")
        m = self.offset_levels
        if not isinstance(m, int) or m < 3 or m % 2 == 0:
            raise ValueError(f"GETokConfig.offset_levels must be an odd integer >= 3, got {m!r}")
        if self.rounds is None:  # frozen dataclass: resolve the mode-dependent default once, here
            object.__setattr__(self, "rounds", 0 if self.mode == "grid" else 1)
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"GETokConfig.rounds must be a non-negative integer, got {self.rounds!r}")
        if self.mode == "grid" and self.rounds != 0:
            raise ValueError(f"mode 'grid' writes no offsets: rounds must be 0, got {self.rounds}")
        if self.mode == "refine" and self.rounds != 1:
            raise ValueError(f"mode 'refine' adds exactly one offset per point: rounds must be 1, got {self.rounds}")

    # -- numbers -------------------------------------------------------------------------------------
    @property
    def half(self) -> int:
        """h = (m - 1) / 2, the largest offset magnitude."""
        return (self.offset_levels - 1) // 2

    @property
    def inline_rounds(self) -> int:
        """Offset tokens that follow each grid token in an answer: R in inline mode; 0 in grid mode and in
        refine mode, whose answers write grid tokens alone (its offsets stand in a second answer)."""
        return self.rounds if self.mode == "inline" else 0

    def with_mode(self, mode: str) -> "GETokConfig":
        """The same lattice (grid, offset levels, schedule) in ``mode``, with that mode's rounds (grid: 0,
        refine: 1); ``with_mode("grid")`` is the config of refine mode's first answer.

        >>> GETokConfig(grid=4, mode="refine").with_mode("grid")
        GETokConfig(grid=4, rounds=0, offset_levels=3, schedule='halving', mode='grid')
        """
        return dataclasses.replace(self, mode=mode, rounds=None)

    def cells(self, points) -> np.ndarray:
        """Normalised points (..., 2), or one axis's coordinates (...) -> the cell holding each: i =
        min(floor(x n), n - 1) after clipping x to [0, 1], likewise j. The inverse of :meth:`anchors`.

        >>> GETokConfig(grid=4).cells([[0.3, 0.99], [1.0, 0.0]]).tolist()
        [[1, 3], [3, 0]]
        """
        p = np.clip(np.asarray(points, dtype=np.float64), 0.0, 1.0)
        return np.minimum(np.floor(p * self.grid), self.grid - 1).astype(np.int64)

    def anchors(self, cells) -> np.ndarray:
        """Cell indices (..., 2) as (i, j), or one axis's indices (...) -> anchors (cells + 0.5) / n,
        normalised: the centre of each cell. The inverse of :meth:`cells`.

        >>> GETokConfig(grid=4).anchors([[0, 3], [1, 2]]).tolist()
        [[0.125, 0.875], [0.375, 0.625]]
        """
        return (np.asarray(cells, dtype=np.float64) + 0.5) / self.grid

    @property
    def grid_anchors(self) -> np.ndarray:
        """(n * n, 2) anchors of every cell in the order of :attr:`grid_tokens` (row-major: j, then i); a new
        array on every access.

        >>> GETokConfig(grid=2).grid_anchors.tolist()
        [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
        """
        j, i = np.divmod(np.arange(self.grid * self.grid), self.grid)
        return self.anchors(np.stack([i, j], 1))

    def step(self, r: int) -> float:
        """Offset step of round r (1-based) in normalised units."""
        if self.schedule == "halving":
            return 1.0 / (self.grid * (self.offset_levels - 1) ** r)
        return 1.0 / (self.grid * (self.offset_levels - 1))

    def steps(self, rounds: int) -> np.ndarray:
        """(rounds,) the steps s_1 .. s_rounds of :meth:`step`: what offset d of round r moves, d * s_r.

        >>> GETokConfig(grid=4, rounds=2).steps(2).tolist()
        [0.125, 0.0625]
        """
        return np.array([self.step(r) for r in range(1, rounds + 1)], dtype=np.float64)

    @property
    def max_error(self) -> float:
        """Largest per-axis decoding error for a point inside [0, 1] (spec section 3)."""
        r = self.rounds if self.schedule == "halving" else min(self.rounds, 1)
        return 1.0 / (2 * self.grid * (self.offset_levels - 1) ** r)

    # -- token names ---------------------------------------------------------------------------------
    def grid_token(self, i: int, j: int) -> str:
        return GRID_FORMAT.format(i=i, j=j)

    def offset_token(self, dx: int, dy: int) -> str:
        return OFFSET_FORMAT.format(dx=dx, dy=dy)

    @cached_property
    def grid_tokens(self) -> tuple[str, ...]:
        """Grid tokens in row-major order: index j * n + i is cell (i, j)."""
        n = self.grid
        return tuple(self.grid_token(i, j) for j in range(n) for i in range(n))

    @cached_property
    def offset_values(self) -> tuple[tuple[int, int], ...]:
        """(dx, dy) of every offset token, in the order of :attr:`offset_tokens` (dy outer, dx inner)."""
        h = self.half
        return tuple((dx, dy) for dy in range(-h, h + 1) for dx in range(-h, h + 1))

    @cached_property
    def offset_tokens(self) -> tuple[str, ...]:
        return tuple(self.offset_token(dx, dy) for dx, dy in self.offset_values)

    def tokens(self) -> tuple[str, ...]:
        """Every GETok token, in a fixed order (grid, offsets, delete, tags) so token ids are reproducible."""
        return self.grid_tokens + self.offset_tokens + (DELETE,) + TAG_TOKENS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GETokConfig":
        return cls(**{k: d[k] for k in ("grid", "rounds", "offset_levels", "schedule", "mode") if k in d})

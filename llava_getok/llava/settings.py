"""The GETok options of a training run (``python -m llava_getok.train --getok_* ...``): one frozen dataclass, handed
to the trainer that uses it (``register(settings)``), never a global."""
from __future__ import annotations

from dataclasses import dataclass

from ..vocab import GETokConfig
from .tokens import INITS

ROW_MODES = ("auto", "full", "delta", "factored")
DATA_ORDERS = ("shuffle", "file")


@dataclass(frozen=True)
class GETokSettings:
    """GETok options of a training run (``python -m llava_getok.train --getok_* ...``).

    grid, rounds, offset_levels, schedule, mode: the GETok config (spec sections 2-5).
    init: initialisation of the new rows, "sincos2d" (default) or "mean".
    grid_weight, box_weight: lambda_grid, lambda_box of the box-token loss; both 0 = plain LLaVA loss.
    sigma: width of the soft grid target in cells; offset_sigma: the same over offset tokens (0 = one-hot).
    rows: "auto" trains only the GETok rows (delta) under LoRA / QLoRA / frozen backbone / projector-only
        tuning and everything under full fine-tuning; "full" or "delta" force one; "factored" trains the GETok
        rows as deltas whose grid part is a column part + a row part + a per-cell residual (all starting at
        zero), the rest of the matrices as under "auto" (spec section 10).
    train_vision_tower: also train the CLIP tower (LLaVA freezes it and runs it under no_grad).
    check_data: distinct records to run through LLaVA's preprocessing check before training, spread over the
        file (-1: all, 0: none); repeated records are checked once.
    data_order: "shuffle" (the Trainer's random order) or "file": the records in the data file's order, for a
        curriculum written into the file (each process of a multi-GPU run takes its share of every batch).
    """

    grid: int = 32
    rounds: int | None = None
    offset_levels: int = 3
    schedule: str = "halving"
    mode: str = "inline"
    init: str = "sincos2d"
    grid_weight: float = 0.5
    box_weight: float = 0.5
    sigma: float = 1.0
    offset_sigma: float = 0.0
    rows: str = "auto"
    train_vision_tower: bool = False
    check_data: int = -1
    data_order: str = "shuffle"

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"--getok_init must be one of {INITS}, got {self.init!r}")
        if self.data_order not in DATA_ORDERS:
            raise ValueError(f"--getok_data_order must be one of {DATA_ORDERS}, got {self.data_order!r}")
        if self.rows not in ROW_MODES:
            raise ValueError(f"--getok_rows must be one of {ROW_MODES}, got {self.rows!r}")
        for name in ("grid_weight", "box_weight", "sigma", "offset_sigma"):
            if getattr(self, name) < 0:
                raise ValueError(f"--getok_{name} must be >= 0, got {getattr(self, name)}")
        self.config()  # validates grid/rounds/mode

    def config(self) -> GETokConfig:
        return GETokConfig(grid=self.grid, rounds=self.rounds, offset_levels=self.offset_levels,
                           schedule=self.schedule, mode=self.mode)

    @property
    def loss_on(self) -> bool:
        return self.grid_weight > 0 or self.box_weight > 0

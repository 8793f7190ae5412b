"""The GETok options of a training run (``python -m llava_getok.train --getok_* ...``): one frozen dataclass, handed
to the trainer that uses it (``register(settings)``), never a global."""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..formats import FORMAT_NAMES, BinsFormat, LocationFormat, TextFormat, describe, format_name, format_to_dict, same_tokens
from ..vocab import GETokConfig
from .tokens import INITS

ROW_MODES = ("auto", "full", "delta", "factored")


class FormatError(ValueError):
    """The location format asked for and the training data's disagree (or the data mixes formats, or a checkpoint to
    resume is of another format); ``python -m llava_getok.train`` prints it as one line."""

DATA_ORDERS = ("shuffle", "file")


@dataclass(frozen=True)
class GETokSettings:
    """GETok options of a training run (``python -m llava_getok.train --getok_* ...``).

    format: the location format, "getok", "text" or "bins"; None (default): the training data's (``getok.format`` /
        ``getok.config`` of its records), getok when the data says nothing (:meth:`location_format`).
    bins: K of the bins format; None: the data's, else 1000.
    grid, rounds, offset_levels, schedule, mode: the GETok config (spec sections 2-5).
    init: initialisation of the new rows, "sincos2d" (default: the mean plus a sinusoidal code of the token's
        position, 2D for GETok's cells and offsets, 1D of the bin centre for bins) or "mean".
    grid_weight, box_weight: lambda_grid, lambda_box of the box-token loss (bins: the soft cross-entropy over the K
        bins and the L1 + GIoU of the expected coordinates); both 0 = plain LLaVA loss. Text trains with LLaVA's
        plain loss whatever they are.
    sigma: width of the soft grid target in cells (bins: in bins); offset_sigma: the same over offset tokens
        (0 = one-hot).
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

    format: str | None = None
    bins: int | None = None
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
        if self.format is not None and self.format not in FORMAT_NAMES:
            raise ValueError(f"--getok_format must be one of {FORMAT_NAMES}, got {self.format!r}")
        if self.bins is not None:
            BinsFormat(bins=self.bins)  # validates K
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

    def location_format(self, data_formats=()) -> LocationFormat:
        """The format a run trains on, from these settings and ``data_formats`` (the formats of the training records,
        :func:`llava_getok.formats.record_format`): the data's unless ``format`` / ``bins`` say otherwise, in which
        case they must agree with it (else FormatError naming both); GETok's lattice comes from these settings and
        must agree with GETok data. Data that mixes formats (or GETok lattices, or K) is a FormatError."""
        kinds = {json.dumps(format_to_dict(f), sort_keys=True): f for f in data_formats}
        data = list(kinds.values())
        for f in data[1:]:
            if not same_tokens(data[0], f):
                raise FormatError(f"the training data mixes location formats: {describe(data[0])} and {describe(f)}")
        have = data[0] if data else None
        name = self.format or (format_name(have) if have is not None else "getok")
        if have is not None and format_name(have) != name:
            raise FormatError(f"--getok_format {name}, but the training data is in {describe(have)}")
        if name not in FORMAT_NAMES:  # qwen25: pixels of Qwen2.5-VL's smart_resized image, which LLaVA never sees
            raise FormatError(f"the training data is in {describe(have)}, which LLaVA does not train on")
        if name == "text":
            return have if have is not None else TextFormat()
        if name == "bins":
            k = self.bins or (have.bins if have is not None else BinsFormat().bins)
            if have is not None and have.bins != k:
                raise FormatError(f"--getok_bins {k}, but the training data is in {describe(have)}")
            return BinsFormat(bins=k)
        cfg = self.config()
        if have is not None and not same_tokens(cfg, have):
            raise FormatError(f"the GETok tokens of these settings ({describe(cfg)}, schedule {cfg.schedule}) are not the "
                             f"training data's ({describe(have)}, schedule {have.schedule}): pass --getok_grid, "
                             f"--getok_offset_levels and --getok_schedule as the data was converted")
        return cfg

    @property
    def loss_on(self) -> bool:
        return self.grid_weight > 0 or self.box_weight > 0

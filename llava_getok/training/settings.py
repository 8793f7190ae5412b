"""The GETok options of a training run (``python -m llava_getok.train --getok_* ...``): one frozen dataclass, handed
to the trainer that uses it (``register(settings)``), never a global, and recorded whole in every checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..formats import (BinsFormat, LocationFormat, LocationOptions, Qwen25Format, TextFormat, describe, format_name,
                       format_to_dict, same_tokens)
from ..options import check_choices, option, same_option
from ..vocab import GETokConfig
from .tokens import INITS

ROW_MODES = ("auto", "full", "delta", "factored")
DATA_ORDERS = ("shuffle", "file")
FLAG_PREFIX = "getok_"  # python -m llava_getok.train --getok_grid 8 ...


class FormatError(ValueError):
    """The location format asked for and the training data's disagree (or the data mixes formats, or a checkpoint to
    resume is of another format); ``python -m llava_getok.train`` prints it as one line."""


class TrainingDataError(ValueError):
    """The training data cannot be trained on (e.g. it holds no records); printed as one line naming the file."""


@dataclass(frozen=True)
class GETokSettings:
    """The GETok options of a training run, each declared once here (help, type, default, choices): the flags of
    ``python -m llava_getok.train`` (``--getok_<name>``, :func:`llava_getok.options.add_flags`), their help text and
    the ``settings`` a checkpoint's sidecar records are made from these fields."""

    format: str | None = same_option(LocationOptions, "format", default=None, help=(
        "the location format: getok, text or bins (default: the training data's, which convert-datasets --format "
        "wrote; getok if it says none)"))
    bins: int | None = same_option(LocationOptions, "bins", default=None, help=(
        "bins format: K bins per axis (default: the data's, else 1000)"))
    grid: int = same_option(LocationOptions, "grid")
    rounds: int | None = same_option(LocationOptions, "rounds")
    offset_levels: int = same_option(LocationOptions, "offset_levels")
    schedule: str = same_option(LocationOptions, "schedule")
    mode: str = same_option(LocationOptions, "mode")
    init: str = option("sincos2d", "initial rows of the new tokens, input and output: the mean of the old rows plus "
                       "(sincos2d) a sinusoidal code of the token's position, 2D for GETok, 1D of the bin centre for "
                       "bins", choices=INITS)
    grid_weight: float = option(0.5, "lambda_grid of the box-token loss (bins: of the soft cross-entropy over the K "
                                "bins); with box_weight 0 as well: plain LLaVA loss, exactly (text always is)")
    box_weight: float = option(0.5, "lambda_box of the box-token loss: L1 + GIoU of the expected box corners")
    sigma: float = option(1.0, "width of the soft grid target in cells (bins: in bins); 0: one-hot")
    offset_sigma: float = option(0.0, "width of the soft target over offset tokens; 0: one-hot")
    rows: str = option("auto", "what trains of the new rows: auto (only the GETok rows, as deltas, under LoRA / QLoRA "
                       "/ frozen backbone / projector-only tuning; everything under full fine-tuning), full, delta, or "
                       "factored (grid deltas = a column part + a row part + a per-cell residual)", choices=ROW_MODES)
    train_vision_tower: bool = option(False, "also train the CLIP tower (LLaVA freezes it); saved in every "
                                      "checkpoint and loaded by the builder", flag="unfreeze_mm_vision_tower")
    check_data: int = option(-1, "records run through LLaVA's preprocessing check before training, spread over the "
                             "file (-1: all, 0: none)")
    data_order: str = option("shuffle", "shuffle: the Trainer's random order; file: the records in file order, for a "
                             "curriculum written into the data file", choices=DATA_ORDERS)

    def __post_init__(self):
        check_choices(self, prefix=FLAG_PREFIX)
        if self.bins is not None:
            BinsFormat(bins=self.bins)  # validates K
        for name in ("grid_weight", "box_weight", "sigma", "offset_sigma"):
            if getattr(self, name) < 0:
                raise ValueError(f"--getok_{name} must be >= 0, got {getattr(self, name)}")
        self.config()  # validates grid/rounds/mode

    def config(self) -> GETokConfig:
        return GETokConfig.from_dict(self.__dict__)

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
        if name == "text":
            return have if have is not None else TextFormat()
        if name == "qwen25":  # its numbers are pixels of the image each record was bound to: the data's own
            return have if have is not None else Qwen25Format()
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

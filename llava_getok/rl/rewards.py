"""GRPO rewards for grounding as trl callables: ``reward(completions, completion_ids=..., getok=..., **kwargs) ->
list[float | None]``, built by :func:`get_reward` from a name in :data:`REWARDS`.

Each parses the completion strictly by token ids (``parse_ids``; text that merely looks like a GETok token does not
count), reads the ground truth from the ``getok`` column (docs/data-format.md: shapes in original pixels + frame +
size), scores it with :mod:`llava_getok.rl.scores`, and returns ``None`` (abstain) for records of a task the reward
does not judge. Anything unparseable scores 0 and is counted: each callable keeps ``counts`` and reports
``<name>/unparseable`` through trl's ``log_metric``.
"""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from ..codec import Shape, apply_refinement
from ..geometry import boxes_to_frame, frame_region
from ..parse import parse
from .scores import (BOX_TASKS, GRID_TASKS, RewardConfig, Target, box_score, format_score, inside_target, mask_score,
                     parse_completion, points_score, refine_score, repetition_score, target_of)

def _text(completion) -> str:
    """trl passes strings for plain prompts and [{"role": "assistant", "content": ...}] for chat prompts."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


class GroundingReward:
    """Base of the trl callables: strict parsing, ground truth, abstention and counting.

    Subclasses set ``name`` and ``tasks`` and implement ``score(text, result, target, record)``.
    ``id_to_token`` maps GETok token ids to their strings (``{tok.convert_tokens_to_ids(t): t for t in
    cfg.tokens()}``); None parses the text (tests, offline scoring).
    """

    name = "grounding"
    tasks: tuple[str, ...] = GRID_TASKS

    def __init__(self, config: RewardConfig = RewardConfig(), id_to_token: dict[int, str] | None = None):
        self.config = config
        self.id_to_token = dict(id_to_token) if id_to_token is not None else None
        self.__name__ = self.name  # trl names the logged mean/std after it
        self.counts = {"scored": 0, "unparseable": 0, "abstained": 0}

    def __call__(self, completions, completion_ids=None, getok=None, log_metric=None, **kwargs):
        if getok is None:
            raise ValueError(f"reward {self.name!r} needs the 'getok' column of the converted data")
        if completion_ids is None:
            completion_ids = [None] * len(completions)
        extra = [{k: v[i] for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(completions)}
                 for i in range(len(completions))]
        out, bad, judged = [], 0, 0
        for text, ids, g, rec in zip(map(_text, completions), completion_ids, getok, extra):
            target = target_of(g)
            if target.task not in self.tasks:
                out.append(None)
                self.counts["abstained"] += 1
                continue
            judged += 1
            cfg = target.config.with_mode("refine") if target.task == "refine" else target.config
            # strict (by id) when trl passes the ids; by text only for offline scoring of plain strings
            id_map = self.id_to_token if ids is not None else None
            res, _ = parse_completion(text, ids or [], id_map, cfg, self.config.think)
            value = self.score(text, res, target, rec) if res is not None or self.scores_unparseable else None
            if res is None or value is None:  # unparseable for this reward: 0, counted
                bad += 1
                self.counts["unparseable"] += 1
            else:
                self.counts["scored"] += 1
            out.append(0.0 if value is None else float(value))
        if log_metric is not None and judged:
            log_metric(f"{self.name}/unparseable", bad / judged)
        return out

    scores_unparseable = False  # True: score() is called with result None (format, repetition)

    def score(self, text, result, target, record):  # pragma: no cover - abstract
        raise NotImplementedError


class FormatReward(GroundingReward):
    name = "format"
    tasks = GRID_TASKS + ("refine",)
    scores_unparseable = True

    def score(self, text, result, target, record):
        if result is None:
            return 0.0
        if target.task == "refine":
            first = _first_answer(record, target)
            if len(result.refinements) != len(first) or result.shapes:
                return 0.0
            try:
                apply_refinement(first, result.refinements, target.config)
            except ValueError:
                return 0.0
            return 1.0
        if result.refinements:
            return 0.0
        expect = len(target.boxes) + len(target.points) > 0 or target.mask is not None
        return format_score(text, result, expect, self.config.think)


class RepetitionReward(GroundingReward):
    name = "repetition"
    tasks = GRID_TASKS + ("refine",)
    scores_unparseable = True

    def score(self, text, result, target, record):
        return self.config.repetition_penalty * repetition_score(text)


class BoxReward(GroundingReward):
    name = "box"
    tasks = BOX_TASKS

    def score(self, text, result, target, record):
        if any(s.kind != "box" for s in result.shapes):
            return None  # a non-box shape where boxes were asked for: unparseable for this task
        image_box = boxes_to_frame(frame_region(target.size, target.frame), target.size, target.frame)  # what it sees
        return box_score([s.box for s in result.shapes], target.boxes, self.config, image_box)


class PointsReward(GroundingReward):
    name = "points"
    tasks = ("point",)

    def score(self, text, result, target, record):
        if any(s.kind != "point" for s in result.shapes):
            return None
        pts = [s.points[0] for s in result.shapes]
        inside = inside_target(pts, target) if pts else []
        n_targets = max(len(target.points), len(target.boxes), 1)
        return points_score(inside, n_targets, self.config)


class MaskReward(GroundingReward):
    """IoU of the mask the proposal generator builds at the predicted anchors (llava_getok.masks) with the
    ground-truth mask. Needs the record's image: column ``image_path`` (absolute path)."""

    name = "mask"
    tasks = ("res",)

    def __init__(self, config: RewardConfig = RewardConfig(), id_to_token=None, generator=None):
        super().__init__(config, id_to_token)
        self.generator = generator  # None: the generator each record's ``getok.proposals`` names
        self._generators = {}  # kept for the reward's lifetime: a group's G completions share a segmentation

    def generator_for(self, target: Target):
        """The proposal generator that made the record's anchors (the weight-free superpixels by default)."""
        if self.generator is not None:
            return self.generator
        from ..masks import SuperpixelGenerator

        p = dict(target.proposals or {"generator": "superpixel"})
        if p.pop("generator", "superpixel") != "superpixel":
            raise ValueError(f"record proposals {target.proposals}: pass that generator to the mask reward "
                             "(get_reward('mask', generator=...)); only superpixels need no weights")
        key = json.dumps(p, sort_keys=True)
        if key not in self._generators:
            self._generators[key] = SuperpixelGenerator(**p)
        return self._generators[key]

    def score(self, text, result, target, record):
        if any(s.kind != "mask" for s in result.shapes) or target.mask is None:
            return None
        if not result.shapes:
            return 0.0
        from ..masks import mask_from_anchors

        if "image_path" not in record:
            raise ValueError("reward 'mask' needs the 'image_path' column (the record's image on disk)")
        image = _load_image(record["image_path"])
        anchors = np.concatenate([np.asarray(s.points) for s in result.shapes])
        pred = mask_from_anchors(anchors, image, target.frame, generator=self.generator_for(target))
        return mask_score(pred, target.mask)


class RefineReward(GroundingReward):
    """Second-turn reward: the first answer comes from the ``first_answer`` column (the text of the first
    assistant turn in the prompt), the refinement from the completion."""

    name = "refine"
    tasks = ("refine",)

    def score(self, text, result, target, record):
        first = _first_answer(record, target)
        if result.shapes or not result.refinements:
            return None
        try:
            return refine_score(first, result.refinements, target, self.config)
        except ValueError:
            return None


def _first_answer(record, target: Target) -> list[Shape]:
    if "first_answer" not in record:
        raise ValueError("refine rewards need the 'first_answer' column (text of the first assistant turn)")
    res = parse(record["first_answer"], target.config.with_mode("grid"))
    if res.errors:
        raise ValueError(f"first_answer {record['first_answer']!r} does not parse: {res.errors[0].message}")
    return res.shapes


@lru_cache(maxsize=8)
def _load_image(path: str) -> np.ndarray:
    from ..images import load_image

    return np.asarray(load_image(path))  # upright, as the policy saw it


class GroundingByTask(GroundingReward):
    """The grid-stage grounding reward: box for rec/det, mask for res, points for point."""

    name = "grounding"
    tasks = GRID_TASKS

    def __init__(self, config: RewardConfig = RewardConfig(), id_to_token=None, generator=None):
        super().__init__(config, id_to_token)
        self.parts = {"rec": BoxReward(config, id_to_token), "det": BoxReward(config, id_to_token),
                      "res": MaskReward(config, id_to_token, generator), "point": PointsReward(config, id_to_token)}

    def score(self, text, result, target, record):
        return self.parts[target.task].score(text, result, target, record)


REWARDS = {
    "format": FormatReward,
    "repetition": RepetitionReward,
    "box": BoxReward,
    "mask": MaskReward,
    "points": PointsReward,
    "refine": RefineReward,
    "grounding": GroundingByTask,
}
STAGE_REWARDS = {"grid": ("format", "repetition", "grounding"), "refine": ("format", "repetition", "refine")}


def get_reward(name: str, config: RewardConfig = RewardConfig(), id_to_token=None, **kwargs) -> GroundingReward:
    """A reward callable by name (see :data:`REWARDS`).

    >>> get_reward("box").__name__
    'box'
    >>> get_reward("iou")
    Traceback (most recent call last):
    ...
    ValueError: unknown reward 'iou'; valid: box, format, grounding, mask, points, refine, repetition
    """
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](config, id_to_token, **kwargs)

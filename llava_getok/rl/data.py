"""Converted records (docs/data-format.md) -> GRPO prompt rows.

A row is what trl's GRPOTrainer hands to the rollout and to every reward as keyword columns:
``prompt`` (the conversation up to the answer being trained, rendered by the backend's template: LLaVA's
``conv_mode``, or the model's chat template for llava_getok.hf), ``image_path``
(absolute; deliberately not named ``image``, which would send trl down its processor-based VLM path),
``getok`` (the record's ground truth as JSON text: one Arrow type for every record) and ``first_answer``
(the first assistant turn of a refine record, "" otherwise).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

STAGE_TASKS = {"grid": ("rec", "det", "res", "point"), "refine": ("refine",)}


def build_rows(records, stage: str, image_folder, conv_mode: str, source="<records>", frame=None, config=None,
               render=None):
    """Records -> (rows, skipped) for one stage; ``skipped`` counts records left out, by reason.

    render: ``turns -> prompt`` (default: LLaVA's template ``conv_mode``).

    frame / config: the model's frame and GETok config (its sidecar). A record made for another frame or
    grid is an error: its ground truth would be compared with coordinates the model does not mean.
    """
    from ..images import ImageError, load_image
    from .scores import record_task

    if render is None:
        from ..llava.inputs import render_prompt

        def render(turns):
            return render_prompt(turns, conv_mode)

    if stage not in STAGE_TASKS:
        raise ValueError(f"stage must be one of {sorted(STAGE_TASKS)}, got {stage!r}")
    tasks = STAGE_TASKS[stage]
    rows, skipped = [], Counter()
    for k, rec in enumerate(records):
        where = f"{source}, record {k} (id {rec.get('id', '?')!r})"
        g = rec.get("getok")
        if not isinstance(g, dict) or "task" not in g:
            raise ValueError(f"{where}: field 'getok' with a 'task' is missing; convert the data with convert-datasets")
        if isinstance(g.get("format"), dict) and g["format"].get("name", "getok") != "getok":
            raise ValueError(f"{where}: field 'getok.format' is {g['format'].get('name')!r}: GRPO's rewards read GETok "
                             f"answers (convert the data with --format getok)")
        if frame is not None and g.get("frame") != frame:
            raise ValueError(f"{where}: field 'getok.frame' is {g.get('frame')!r}, the model's frame is {frame!r}")
        if config is not None:
            rc = g.get("config", {})
            for key in ("grid", "offset_levels", "schedule"):
                if rc.get(key) != getattr(config, key):
                    raise ValueError(f"{where}: field 'getok.config.{key}' is {rc.get(key)!r}, the model was "
                                     f"trained with {getattr(config, key)!r}")
        task = record_task(g)
        if task not in tasks:
            skipped[f"task {task} (not a {stage}-stage task)"] += 1
            continue
        if not rec.get("image"):
            skipped["no image"] += 1
            continue
        image = Path(image_folder) / rec["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: field 'image' {rec['image']!r} is not a file under {image_folder}")
        try:  # decoded once here, so that a bad image stops the run before the model loads, not at its step
            load_image(image)
        except ImageError as e:
            raise ValueError(f"{where}: field 'image': {e}") from None
        turns = rec.get("conversations") or []
        if len(turns) < 2 or turns[-1].get("from") != "gpt" or turns[-2].get("from") != "human":
            raise ValueError(f"{where}: field 'conversations' must end with a human turn and the gpt answer")
        first_answer = ""
        if task == "refine":
            gpt = [t for t in turns[:-1] if t.get("from") == "gpt"]
            if not gpt:
                raise ValueError(f"{where}: a refine record needs the first answer as an earlier gpt turn")
            first_answer = gpt[-1]["value"]
        rows.append({
            "id": str(rec.get("id", k)),
            "prompt": render(turns[:-1]),
            "image_path": str(image.resolve()),
            "getok": json.dumps(g, sort_keys=True),
            "first_answer": first_answer,
            "conversation": json.dumps(turns[:-1]),  # for re-asking with the policy's own first answer
        })
    if not rows:
        raise ValueError(f"{source}: no record of a {stage}-stage task {tasks}; skipped: {dict(skipped)}")
    return rows, skipped

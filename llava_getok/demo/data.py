"""The demo's data: the procedural ``shapes`` dataset drawn, each split converted by ``convert-datasets shapes``, and a
curriculum written into one training file in the order it is trained."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic

# the stages before the full mix, in training order: the split their images are drawn into -> what they hold
FIRST_STAGES = {"single": "on one-shape images", "colour": "of colour-only expressions", "kind": "of kind-only ones"}


def first_stages(a) -> dict[str, int]:
    """Steps of each of the :data:`FIRST_STAGES`, in training order."""
    return {"single": a.single_steps, "colour": a.colour_steps, "kind": a.kind_steps}


def curriculum_file(out: Path, stages: list[tuple[int, dict[Path, float]]], seed: int) -> Path:
    """One training file in the order it is trained (``--getok_data_order file``): for each stage
    ``(n, {source: share})``, ``n`` records drawn from its sources by share, shuffled together. Each source is
    read in shuffled passes that go on from stage to stage, so every record comes once a pass (a file read in
    order needs its epochs written out); a first stage must not need a record twice. Deterministic in
    ``seed``; written atomically."""
    rng = np.random.default_rng(seed)
    records = {path: json.loads(Path(path).read_text()) for _, shares in stages for path in shares}
    queues: dict[Path, list] = {path: [] for path in records}
    order: list = []
    for k, (n, shares) in enumerate(stages):
        if min(shares.values()) < 0 or not np.isclose(sum(shares.values()), 1):
            raise ValueError(f"curriculum: the shares of stage {k + 1} must be >= 0 and sum to 1, got "
                             + ", ".join(f"{Path(p).name} {v}" for p, v in shares.items()))
        counts = [round(n * v) for v in shares.values()]
        counts[-1] = n - sum(counts[:-1])
        stage: list = []
        for path, c in zip(shares, counts):
            have = len(records[path])
            if not have or (k == 0 and c > have):
                raise ValueError(f"curriculum: {path} has {have} records (needs {c})")
            q = queues[path]
            while len(q) < c:
                q += [records[path][i] for i in rng.permutation(have)]
            stage += q[:c]
            del q[:c]
        order += stage if len(shares) == 1 else [stage[i] for i in rng.permutation(len(stage))]
    write_text_atomic(out, json.dumps(order))
    return out


def split_annotations(data: Path, records: dict[str, list[dict]]) -> dict[str, Path]:
    """The shapes dataset's annotation lines (``records``, :func:`shapes_records`), one file per split beside its own
    (``annotations.{split}.jsonl``, byte for byte as ``shapes.generate`` writes its lines), so that each split's
    conversion reads that split's records and nothing else; returns {split: path}."""
    paths = {split: data / f"annotations.{split}.jsonl" for split in records}
    for split, path in paths.items():
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records[split]))
    return paths


def shapes_records(data: Path) -> dict[str, list[dict]]:
    """The shapes dataset's annotation lines, by split."""
    from data_converters.shapes import ANNOTATIONS

    by_split: dict[str, list[dict]] = {}
    with open(data / ANNOTATIONS) as f:
        for line in f:
            r = json.loads(line)
            by_split.setdefault(r["split"], []).append(r)
    return by_split

"""Run one conversion: read -> parse + validate + build (in worker processes) -> write, with counts.

Guarantees:
- Every raw record read is either written or skipped with a reason: ``read = written + skipped``.
- Output order follows input order whatever the number of workers; the same input, options and seed give
  byte-identical files (no timestamps; per-record random draws come from the seed and the record id).
- Streaming: records are read, converted and written a batch at a time. JSONL input is never loaded
  whole (a ``.json`` list is: that is the format); ``.jsonl`` output is written line by line, ``.json``
  output is assembled from the same stream at the end.
- Atomic: everything goes to ``OUTPUT.partial`` first; only a finished run replaces OUTPUT (os.replace),
  together with ``STEM.rejects.jsonl`` (one line per skipped record) and ``STEM.summary.json``.
- Re-running: a finished OUTPUT is simply rebuilt (identical) and replaced at the end. An interrupted run
  (Ctrl-C, crash, --on-error fail) leaves ``OUTPUT.partial`` and ``OUTPUT.partial.state.json``; the next
  run with the same arguments on the same, unchanged input resumes after the last record written (say
  ``--no-resume`` to start over). Different arguments or a changed input start over.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llava_getok.vocab import GETokConfig

from . import registry
from .base import ConvertError, Filtered, Options, image_exists, image_size
from .conversations import BatchEncoder, build_record, group_turns

BATCH = 512
PASS_THROUGH = object()  # convert()'s answer for a record that is written as it was read


@dataclass(frozen=True)
class Job:
    source: str
    opts: Options
    output: Path
    cfg: GETokConfig
    frame: str = "pad"
    seed: int = 0
    workers: int = 1
    limit: int | None = None
    on_error: str = "fail"
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_h"
    superpixels: int = 512
    tau: float = 0.8
    max_points: int = 64
    resume: bool = True
    group_turns: int = 1  # up to this many consecutive records of one image become one conversation
    progress: bool | None = None  # None: a bar when stderr is a terminal
    label: dict = field(default_factory=dict)  # what identifies the run for resuming (the CLI's arguments)


class Stop(Exception):
    """--on-error fail met bad input: the message names file, record and field."""


# -- per-worker conversion -----------------------------------------------------------------------------

class Converter:
    """Turns (where, raw) into ("W", json line) or ("R", reject json line); one per worker process."""

    def __init__(self, job: Job):
        self.job = job
        self.source = registry.load(job.source)
        self._generator = None
        self._image = (None, None)
        self.image_root = str(job.opts.image_root) if job.opts.image_root is not None else None

    def generator(self):
        if self._generator is None:
            from llava_getok.masks import SamGenerator, SuperpixelGenerator

            self._generator = SamGenerator(self.job.sam_checkpoint, self.job.sam_model_type) if self.job.sam_checkpoint else SuperpixelGenerator(self.job.superpixels)
        return self._generator

    def load_image(self, path):
        if self._image[0] != path:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self._image = (path, np.asarray(im.convert("RGB")))
        return self._image[1]

    def __call__(self, item, box_encoder=None):
        where, raw = item
        try:
            rec = self.convert(raw, where, box_encoder)
            if rec is PASS_THROUGH:
                return "W", raw.strip()
            return "W", json.dumps(rec, ensure_ascii=False)
        except Filtered as e:
            return "R", json.dumps({"where": where, "reason": e.reason, "field": None, "message": e.reason}, ensure_ascii=False)
        except ConvertError as e:
            return "R", json.dumps({"where": e.where, "reason": e.reason, "field": e.field, "message": e.message, "error": True}, ensure_ascii=False)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a shape no check foresaw
            reason = f"unexpected {type(e).__name__}"
            return "R", json.dumps({"where": where, "reason": reason, "field": None, "message": f"{reason}: {e}", "error": True}, ensure_ascii=False)

    def convert(self, raw, where, box_encoder=None) -> dict:
        job, opts = self.job, self.job.opts
        sample = self.source.parse(raw, where, opts)
        path = None
        if self.image_root is not None and sample.image:
            path = os.path.join(self.image_root, sample.image)
            if not image_exists(path):
                raise ConvertError(where, "image", f"image file {path} does not exist", "image not found")
        if sample.turns is not None and not sample.boxes:  # nothing to rewrite: passes through
            if getattr(self.source, "PASS_THROUGH_RAW", False) and isinstance(raw, str):
                return PASS_THROUGH  # the input line itself, byte for byte
            return build_record(sample, opts.task, job.cfg, job.frame, job.seed, job.source)
        size = sample.size
        if size is None and path is not None:
            try:
                size = image_size(path)
            except ValueError as e:
                raise ConvertError(where, "image", str(e), "unreadable image") from None
        if size is None:
            if sample.boxes or sample.points or sample.polygons or sample.rle:
                raise ConvertError(where, "size", "the record gives no image size; pass --image-root to read it from the image header", "image size unknown")
        else:
            sample = sample.validated(size)
        if hasattr(self.source, "load_image"):  # a source that makes its images (shapes) may hand them over
            loader = lambda: self.source.load_image(sample, opts)  # noqa: E731
        else:
            loader = (lambda: self.load_image(path)) if path else None
        return build_record(sample, opts.task, job.cfg, job.frame, job.seed, job.source, loader,
                            self.generator() if opts.task == "res" else None, box_encoder, (job.tau, job.max_points))

    def batch(self, items):
        """Convert a batch; boxes are encoded in one codec call for the whole batch (BatchEncoder)."""
        enc = BatchEncoder(self.job.cfg)
        out = [self(item, enc) for item in items]
        try:
            lines = enc.resolve([line if kind == "W" else "" for kind, line in out])
        except ValueError:  # cannot happen after validation; if it does, find the record one by one
            return [self(item) for item in items]
        return [(kind, lines[k] if kind == "W" else line) for k, (kind, line) in enumerate(out)]


_WORKER: Converter | None = None


def _init_worker(job):
    global _WORKER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = Converter(job)


def _work(items):
    return _WORKER.batch(items)


# -- driver ---------------------------------------------------------------------------------------------

def side_paths(output: Path) -> dict[str, Path]:
    stem = output.with_suffix("") if output.suffix in (".json", ".jsonl") else output
    return {
        "partial": output.with_name(output.name + ".partial"),
        "state": output.with_name(output.name + ".partial.state.json"),
        "rejects": stem.with_name(stem.name + ".rejects.jsonl"),
        "summary": stem.with_name(stem.name + ".summary.json"),
    }


def _batches(items, size, skip, limit):
    batch, n = [], 0
    for item in items:
        n += 1
        if limit is not None and n > limit:
            break
        if n <= skip:
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _state(job: Job) -> dict:
    st = os.stat(job.opts.input) if Path(job.opts.input).exists() else None
    return {"label": job.label, "input": str(job.opts.input), "input_stat": [st.st_size, st.st_mtime_ns] if st else None}


def _resume_point(job: Job, paths) -> int:
    """Records already processed by an interrupted run with the same arguments (0: start over)."""
    partial, state = paths["partial"], paths["state"]
    if not (job.resume and partial.exists() and state.exists()):
        return 0
    try:
        same = json.loads(state.read_text()) == json.loads(json.dumps(_state(job)))
    except (OSError, ValueError):
        same = False
    if not same:
        print(f"note: {partial} is from a different run (arguments or input changed); starting over", file=sys.stderr)
        return 0
    with open(partial, "rb+") as f:  # drop a line cut short by the interruption
        data = f.read()
        end = data.rfind(b"\n") + 1
        f.truncate(end)
    return data[:end].count(b"\n")


def run(job: Job) -> dict:
    """Convert; return the summary {"read", "written", "skipped", "skipped_by_reason", ...}."""
    output = Path(job.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = side_paths(output)
    source = registry.load(job.source)
    if job.opts.task not in source.TASKS:
        raise ValueError(f"source {job.source!r} supports tasks {', '.join(source.TASKS)}, not {job.opts.task!r}")
    skip = _resume_point(job, paths)
    if skip:
        print(f"resuming {paths['partial']} after {skip} records", file=sys.stderr)
    paths["state"].write_text(json.dumps(_state(job)))
    items = source.read(job.opts)
    from tqdm import tqdm

    bar = tqdm(desc=f"convert {job.source}", unit=" rec", initial=skip, disable=not sys.stderr.isatty() if job.progress is None else not job.progress, mininterval=1.0)
    pool = None
    try:
        with open(paths["partial"], "a" if skip else "w", encoding="utf-8") as out:
            if job.workers > 1:
                ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                pool = ctx.Pool(job.workers, initializer=_init_worker, initargs=(job,))
                results = pool.imap(_work, _batches(items, BATCH, skip, job.limit))
            else:
                conv = Converter(job)
                results = (conv.batch(b) for b in _batches(items, BATCH, skip, job.limit))
            for batch in results:
                for kind, line in batch:
                    if kind == "R" and job.on_error == "fail" and json.loads(line).get("error"):
                        out.flush()
                        r = json.loads(line)
                        raise Stop(f"{r['where']}: field {r['field']!r}: {r['message']}  (use --on-error skip to skip such records)")
                    out.write(kind + line + "\n")
                bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return _finish(job, paths, output)


def _finish(job, paths, output) -> dict:
    """Split the partial stream into OUTPUT and the rejects file, write the summary, replace atomically."""
    tmp_out = output.with_name(output.name + ".tmp")
    tmp_rej = paths["rejects"].with_name(paths["rejects"].name + ".tmp")
    reasons, written, records, as_list = Counter(), 0, 0, output.suffix == ".json"
    with open(paths["partial"], encoding="utf-8") as src, open(tmp_out, "w", encoding="utf-8") as out, open(tmp_rej, "w", encoding="utf-8") as rej:
        if as_list:
            out.write("[")

        def emit(text):
            nonlocal records
            if as_list:
                out.write(",\n" if records else "\n")
            out.write(text if as_list else text + "\n")
            records += 1

        group: list[dict] = []
        for line in src:
            if line[0] != "W":
                rej.write(line[1:])
                reasons[json.loads(line[1:])["reason"]] += 1
                continue
            written += 1
            if job.group_turns <= 1:
                emit(line[1:-1])
                continue
            rec = json.loads(line[1:])
            if group and (rec.get("image") != group[0].get("image") or len(group) == job.group_turns
                          or "getok" not in rec or "getok" not in group[0]):
                emit(json.dumps(group_turns(group), ensure_ascii=False))
                group = []
            group.append(rec)
        if group:
            emit(json.dumps(group_turns(group), ensure_ascii=False))
        if as_list:
            out.write("\n]\n")
    skipped = sum(reasons.values())
    summary = {
        "source": job.source, "task": job.opts.task, "output": str(output), "read": written + skipped,
        "written": written, "skipped": skipped, "skipped_by_reason": dict(sorted(reasons.items())),
        "output_records": records,
    }
    tmp_sum = paths["summary"].with_name(paths["summary"].name + ".tmp")
    tmp_sum.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp_rej, paths["rejects"])
    os.replace(tmp_sum, paths["summary"])
    os.replace(tmp_out, output)
    paths["partial"].unlink()
    paths["state"].unlink()
    return summary

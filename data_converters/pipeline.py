"""Run one conversion: read -> parse + validate + build (in worker processes) -> write, with counts.

Guarantees:
- Every raw record read is either written or skipped with a reason: ``read = written + skipped``.
- Output order follows input order whatever the number of workers; the same input, options and seed give
  byte-identical files (no timestamps; per-record random draws come from the seed and the record id).
- Streaming: records are read, converted and written a batch at a time. JSONL input is never loaded
  whole (a ``.json`` list is: that is the format); ``.jsonl`` output is written line by line, ``.json``
  output is assembled from the same stream at the end.
- Atomic: everything goes to ``OUTPUT.partial`` first; only a finished run replaces OUTPUT, then
  ``STEM.rejects.jsonl`` (one line per skipped record), then ``STEM.summary.json`` last: a summary exists only
  for an output that does (``llava_getok.atomic``).
- Ids: a record whose id repeats an earlier one is bad input (the input holds the same record twice), counted
  or failed like any other; sources that keep ids of their own that their format lets repeat (``UNIQUE_IDS =
  False``: LLaVA's mix665k repeats image ids) count the repeats in the summary (``repeated_ids``) instead.
- Text: a record whose output would hold a NUL character (never in real text; the batch encoder's
  placeholders are made of them) or a string that is not UTF-8 (undecodable input bytes, lone surrogates) is
  bad input, named by its field.
- Re-running: a finished OUTPUT is simply rebuilt (identical) and replaced at the end. An interrupted run
  (Ctrl-C, crash, --on-error fail) leaves ``OUTPUT.partial`` and ``OUTPUT.partial.state.json``; the next
  run with the same arguments on the same, unchanged input resumes after the last record written (say
  ``--no-resume`` to start over). "Unchanged" covers everything the source reads (its ``inputs(opts)``: the
  input file or folder tree and side files such as vg's ``image_data.json``): names, sizes and modification
  times. Images under ``--image-root`` are not fingerprinted (a run may read a million of them): after
  replacing images, say ``--no-resume``. Different arguments or a changed input start over.
- Ctrl-C: worker processes ignore SIGINT; the main process stops them and the CLI prints one line.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llava_getok.atomic import atomic_path, write_text_atomic
from llava_getok.formats import LocationFormat

from . import registry
from .base import Options, image_exists, image_header, image_size
from .conversations import BatchEncoder, build_record, count_nul, group_turns
from .inputs import ConvertError, Filtered, field_holding, not_utf8

BATCH = 512
PASS_THROUGH = object()  # convert()'s answer for a record that is written as it was read


@dataclass(frozen=True)
class Job:
    source: str
    opts: Options
    output: Path
    cfg: LocationFormat  # the answers' location format: a GETokConfig, formats.TextFormat or formats.BinsFormat
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

    def load_image(self, path, where, field="image"):
        if self._image[0] != path:
            import numpy as np

            from llava_getok.images import ImageError, load_image

            try:  # upright (EXIF orientation applied), as the model sees it
                self._image = (path, np.asarray(load_image(path)))
            except ImageError as e:  # not an image, truncated, too big, too small
                raise ConvertError(where, field, f"cannot read the image {e}", "unreadable image") from None
        return self._image[1]

    def __call__(self, item, box_encoder=None):
        """(where, raw) -> ("W", json line, record id) or ("R", reject json line, None)."""
        where, raw = item
        issued = len(box_encoder.boxes) if box_encoder is not None else 0
        try:
            rec, rid = self.convert(raw, where, box_encoder)
            line = raw.strip() if rec is PASS_THROUGH else json.dumps(rec, ensure_ascii=False)
            placeholders = len(box_encoder.boxes) - issued if box_encoder is not None else 0
            _check_text(line, placeholders, raw, where)
            return "W", line, rid
        except Filtered as e:
            return "R", json.dumps({"where": where, "reason": e.reason, "field": e.field, "message": e.message}), None
        except ConvertError as e:
            return "R", reject_line(e), None
        except Exception as e:  # noqa: BLE001  a shape no check foresaw: one counted line, never a traceback
            return "R", reject_line(ConvertError(where, None, f"unexpected {type(e).__name__}: {e}", f"unexpected {type(e).__name__}")), None

    def convert(self, raw, where, box_encoder=None) -> tuple:
        """(record dict, or PASS_THROUGH for a line written as read; the record's id)."""
        if isinstance(raw, (ConvertError, Filtered)):  # read() could not split this record out: count it
            raise raw
        job, opts = self.job, self.job.opts
        sample = self.source.parse(raw, where, opts)
        path = None
        if self.image_root is not None and sample.image:
            path = os.path.join(self.image_root, sample.image)
            if not image_exists(path):
                raise ConvertError(where, sample.field_name("image"), f"image file {path} does not exist", "image not found")
        if sample.turns is not None and not sample.boxes:  # nothing to rewrite: passes through
            if getattr(self.source, "PASS_THROUGH_RAW", False) and isinstance(raw, str):
                return PASS_THROUGH, sample.id  # the input line itself, byte for byte
            rec = build_record(sample, opts.task, job.cfg, job.frame, job.seed, job.source)
            return rec, str(rec.get("id"))
        size = sample.size
        if size is None and path is not None:
            try:
                size = image_size(path)
            except ValueError as e:
                raise ConvertError(where, sample.field_name("image"), str(e), "unreadable image") from None
        if size is None:
            if sample.boxes or sample.points or sample.polygons or sample.rle:
                raise ConvertError(where, None, "the record gives no image size; pass --image-root to read it from the image header", "image size unknown")
        else:
            if sample.size is not None and path is not None:
                _check_orientation(path, where, sample)
            sample = sample.validated(size).in_view(job.frame)
        if hasattr(self.source, "load_image"):  # a source that makes its images (shapes) may hand them over
            loader = lambda: self.source.load_image(sample, opts)  # noqa: E731
        else:
            loader = (lambda: self.load_image(path, where, sample.field_name("image"))) if path else None
        rec = build_record(sample, opts.task, job.cfg, job.frame, job.seed, job.source, loader,
                           self.generator() if opts.task == "res" else None, box_encoder, (job.tau, job.max_points))
        return rec, str(rec["id"])

    def batch(self, items):
        """Convert a batch -> [(kind, line, record id, where)]; boxes are encoded in one codec call for the
        whole batch (BatchEncoder)."""
        enc = BatchEncoder(self.job.cfg)
        out = [self(item, enc) for item in items]
        try:
            lines = enc.resolve([line if kind == "W" else "" for kind, line, _ in out])
        except ValueError:  # cannot happen after validation; if it does, find the record one by one
            out, lines = [self(item) for item in items], None
        return [(kind, lines[k] if lines is not None and kind == "W" else line, rid, item[0])
                for k, ((kind, line, rid), item) in enumerate(zip(out, items))]


def _check_orientation(path, where, sample) -> None:
    """A dataset that states its images' sizes (COCO, RefCOCO, ...) gives coordinates in the pixels it was annotated
    on. The model sees images upright (EXIF orientation applied: llava_getok.images); for an image stored turned or
    mirrored those are other pixels, and which ones the dataset meant cannot be told in general: the record is
    refused, in one counted line, rather than converted with coordinates that may be rotated."""
    header = image_header(path)
    if header is not None and header[1] != 1:
        raise ConvertError(where, sample.field_name("image"), f"image {path} carries EXIF orientation {header[1]} "
                           f"(stored {header[0][0]} x {header[0][1]}, shown turned or mirrored): the dataset's "
                           f"coordinates may be in either orientation; re-save the image upright (e.g. PIL's "
                           f"ImageOps.exif_transpose) and its coordinates with it", "EXIF-rotated image")


def reject_line(e: ConvertError) -> str:
    """A rejects-file line for a bad record: where, reason (what the summary counts), field, message. ASCII with
    escapes: a message may quote input text that is not UTF-8."""
    return json.dumps({"where": e.where, "reason": e.reason, "field": e.field, "message": e.message, "error": True})


def _check_text(line: str, placeholders: int, raw, where: str) -> None:
    """The output line of one record holds exactly its own box placeholders as NULs, and encodes as UTF-8;
    else the input held a NUL character or text that is not UTF-8: ConvertError naming the field."""
    if placeholders or "\\u0000" in line:
        if count_nul(line) != 2 * placeholders:
            raise ConvertError(where, field_holding(raw, lambda t: "\x00" in t), "NUL character (U+0000) in the text", "NUL character")
    if not_utf8(line):
        raise ConvertError(where, field_holding(raw, not_utf8), "text that is not UTF-8 (undecodable bytes, or a lone surrogate)", "not UTF-8")


_WORKER: Converter | None = None


def _init_worker(job):
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (one line, no traceback)
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


def _fingerprint(job: Job) -> dict:
    """Names, sizes and modification times of everything the source reads (its ``inputs(opts)``; default the
    input itself; a folder is walked), as one digest: what an interrupted run must find unchanged to resume."""
    source = registry.load(job.source)
    paths = source.inputs(job.opts) if hasattr(source, "inputs") else [job.opts.input]
    digest, n = hashlib.blake2b(digest_size=16), 0
    for top in map(Path, paths):
        files = sorted(f for f in top.rglob("*") if f.is_file()) if top.is_dir() else [top]
        for f in files:
            try:
                st = f.stat()
                entry = f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n"
            except OSError:
                entry = f"{f}\0missing\n"
            digest.update(entry.encode("utf-8", "surrogateescape"))
            n += 1
    return {"files": n, "digest": digest.hexdigest()}


def _state(job: Job) -> dict:
    return {"label": job.label, "input": str(job.opts.input), "inputs": _fingerprint(job)}


def _resume_point(job: Job, paths, state: dict) -> tuple[int, set, int]:
    """(records already processed by an interrupted run with the same arguments and inputs, the ids it wrote,
    how many of them repeated an earlier id); (0, empty, 0): start over."""
    partial, saved = paths["partial"], paths["state"]
    if not (job.resume and partial.exists() and saved.exists()):
        return 0, set(), 0
    try:
        same = json.loads(saved.read_text()) == json.loads(json.dumps(state))
    except (OSError, ValueError):
        same = False
    if not same:
        print(f"note: {partial} is from a different run (arguments or input changed); starting over", file=sys.stderr)
        return 0, set(), 0
    with open(partial, "rb+") as f:  # drop a line cut short by the interruption
        data = f.read()
        end = data.rfind(b"\n") + 1
        f.truncate(end)
    seen, repeated = set(), 0
    for line in data[:end].decode("utf-8").splitlines():
        if line.startswith("W"):
            rid = str(json.loads(line[1:]).get("id"))
            repeated += rid in seen
            seen.add(rid)
    return data[:end].count(b"\n"), seen, repeated


def _guarded(items, job: Job):
    """read()'s items; an exception no check foresaw becomes a one-line error naming the input, not a
    traceback (a ConvertError passes as it is)."""
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except ConvertError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConvertError(str(job.opts.input), None, f"unexpected {type(e).__name__} while reading: {e}", "unexpected error") from None
        yield item


def run(job: Job) -> dict:
    """Convert; return the summary {"read", "written", "skipped", "skipped_by_reason", ...}."""
    output = Path(job.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = side_paths(output)
    source = registry.load(job.source)
    if job.opts.task not in source.TASKS:
        raise ValueError(f"source {job.source!r} supports tasks {', '.join(source.TASKS)}, not {job.opts.task!r}")
    state = _state(job)
    skip, seen, repeated = _resume_point(job, paths, state)
    if skip:
        print(f"resuming {paths['partial']} after {skip} records", file=sys.stderr)
    paths["state"].write_text(json.dumps(state))
    unique = getattr(source, "UNIQUE_IDS", True)
    items = _guarded(source.read(job.opts), job)
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
                for kind, line, rid, where in batch:
                    if kind == "W" and rid in seen:
                        if unique:
                            id_field = getattr(source, "ID_FIELD", None)
                            kind, line = "R", reject_line(ConvertError(
                                where, id_field, f"record id {rid!r} repeats an earlier record's (the input holds it twice)", "duplicate id"))
                        else:
                            repeated += 1
                    elif kind == "W":
                        seen.add(rid)
                    if kind == "R" and job.on_error == "fail" and json.loads(line).get("error"):
                        out.flush()
                        r = json.loads(line)
                        raise Stop(f"{ConvertError(r['where'], r['field'], r['message'])}  (use --on-error skip to skip such records)")
                    out.write(kind + line + "\n")
                bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return _finish(job, paths, output, repeated if not unique else None)


def _finish(job, paths, output, repeated=None) -> dict:
    """Split the partial stream into OUTPUT and the rejects file, then replace OUTPUT, the rejects file and
    last the summary, each atomically: a summary never describes an output that is not there."""
    reasons, written, records, as_list = Counter(), 0, 0, output.suffix == ".json"
    with atomic_path(paths["rejects"]) as tmp_rej, atomic_path(output) as tmp_out:  # the inner (OUTPUT) is replaced first
        with open(paths["partial"], encoding="utf-8") as src, open(tmp_out, "w", encoding="utf-8") as out, \
                open(tmp_rej, "w", encoding="utf-8") as rej:
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
    if repeated is not None:
        summary["repeated_ids"] = repeated
    write_text_atomic(paths["summary"], json.dumps(summary, indent=1) + "\n")
    paths["partial"].unlink()
    paths["state"].unlink()
    return summary

"""``convert-datasets``: grounding datasets -> GETok conversations in LLaVA's format.

    convert-datasets SOURCE --input IN --output OUT.json|OUT.jsonl [--image-root DIR] [--task rec]
                     [--frame pad|crop|orig] [--format getok|text|bins] [--grid 32] [--rounds R]
                     [--mode grid|inline|refine] [--decimals 2] [--bins 1000]
                     [--workers N] [--limit N] [--seed S] [--on-error fail|skip]
    convert-datasets --list                      sources, their tasks and input formats
    convert-datasets decode FILE [--output F] [--on-error fail|skip]
                                                 coordinates back in pixels, one JSON line per record
    convert-datasets questions FILE [--output Q.jsonl]
                                                 LLaVA's question file for llava.eval.model_vqa (question_id,
                                                 image, text: the record's question without <image>)

Exit status: 0 done, 1 bad input (one line on stderr naming file, record and field: a bad record under
--on-error fail, a file that cannot be read under either mode) or an output that cannot be written,
2 bad arguments, 130 interrupted (Ctrl-C; the same command resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from llava_getok.atomic import atomic_path
from llava_getok.formats import LocationOptions, Qwen25Format
from llava_getok.geometry import check_frame
from llava_getok.messages import one_line
from llava_getok.options import add_flags, from_flags
from llava_getok.records import RecordsError, decode_record, read_records

from . import registry
from .base import Options
from .inputs import ConvertError, field_holding, json_records, not_utf8, parse_json
from .pipeline import Job, Stop, run


def _parser():
    p = argparse.ArgumentParser(prog="convert-datasets", description=__doc__.split("\n")[0])
    p.add_argument("source", nargs="?", help=f"one of: {', '.join(registry.SOURCES)}")
    p.add_argument("--list", action="store_true", help="list sources, their tasks and input formats")
    p.add_argument("--input", type=Path, help="annotation file or folder (see --list)")
    p.add_argument("--image-root", type=Path, help="folder the records' image paths are relative to (sizes from headers, existence checks, RES proposals)")
    p.add_argument("--output", type=Path, help=".json (LLaVA's list) or .jsonl (one record a line)")
    p.add_argument("--task", default=None, help="rec, reg, point, res, det, refine (= rec in refine mode); llava: rewrite. Default: the source's first")
    p.add_argument("--frame", type=frame_arg, default=None,
                   help="frame of the output coordinates, the one the model's image processor gives (llava_getok.frames): "
                        "pad (LLaVA image_aspect_ratio=pad), crop (LLaVA's default 'square' with CLIP ViT-L/14-336: "
                        "shortest edge 336, centre crop 336; crop:E for another tower's E, crop:E:WxH), or orig (the "
                        "whole image: Qwen2-VL, LLaVA-NeXT). With a crop, a shape across its edge is clipped and a "
                        "record with a shape wholly outside is skipped (counted). Default: pad (qwen25: orig)")
    p.add_argument("--input-frame", type=frame_arg, default="pad", help="llava: the frame the input's normalised boxes are in")
    add_flags(p, LocationOptions, dash=True)  # --format, --decimals, --bins, --min-pixels, --grid, ...
    p.add_argument("--split", help="keep only this split (refcoco: train/val/test/testA/testB; vg, flickr30k)")
    p.add_argument("--dataset", help="refcoco: refcoco | refcoco+ | refcocog (default: the input folder's name)")
    p.add_argument("--split-by", help="refcoco: unc | umd | google (default: unc, refcocog: umd)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="read only the first N records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    p.add_argument("--sam-checkpoint", help="RES: use Segment Anything with this checkpoint instead of superpixels")
    p.add_argument("--sam-model-type", default="vit_h")
    p.add_argument("--superpixels", type=int, default=512, help="RES without SAM: SLIC superpixels per image (fewer: fewer anchors, coarser masks)")
    p.add_argument("--tau", type=float, default=0.8, help="RES: the greedy stops at this IoU (spec section 6)")
    p.add_argument("--max-points", type=int, default=64, help="RES: at most this many anchors per mask")
    p.add_argument("--group-turns", type=int, default=1, metavar="K",
                   help="up to K consecutive records of one image become one multi-turn conversation, as in LLaVA-1.5's "
                        "own REC/REG data (training data; evaluate on a split converted with the default 1)")
    p.add_argument("--no-resume", action="store_true", help="start over even if an interrupted run of the same job left OUTPUT.partial")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: when stderr is a terminal)")
    return p


def frame_arg(value: str) -> str:
    """``--frame``'s value in its one spelling; argparse reports a name that is not a frame."""
    try:
        return check_frame(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def error(prog: str, e) -> None:
    """One line on stderr, whatever the message holds."""
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "decode":
            return decode_main(argv[1:])
        if argv and argv[0] == "questions":
            return questions_main(argv[1:])
        return convert_main(argv)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; the partial output stays for resuming
        print("convert-datasets: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")
        return 0


def convert_main(argv):
    if "--list" in argv:
        rows = registry.describe()
        w = max(len(r[0]) for r in rows)
        print("sources (convert-datasets SOURCE --task TASK ...):")
        for name, tasks, desc in rows:
            print(f"  {name:<{w}}  tasks: {tasks}\n  {'':<{w}}  {desc}")
        return 0
    job = build_job(argv)
    try:
        summary = run(job)
    except (ConvertError, Stop) as e:
        error("convert-datasets", e)
        return 1
    except OSError as e:  # the output cannot be written (a full disk, a folder in its place, ...)
        error("convert-datasets", f"cannot write {job.output}: {e}")
        return 1
    print(format_summary(summary), file=sys.stderr)
    return 0


def build_job(argv):
    """Parse the arguments into a :class:`data_converters.pipeline.Job` (exits with status 2 on bad ones)."""
    p = _parser()
    a = p.parse_args(argv)
    if not a.source or a.input is None or a.output is None:
        p.error("SOURCE, --input and --output are required (or --list, or decode FILE)")
    try:
        source = registry.load(a.source)
    except (ValueError, ImportError) as e:
        p.error(str(e))
    task = a.task or source.TASKS[0]
    mode = a.mode
    if task == "refine":  # shorthand: REC in refine mode (getok.task stays "rec", config.mode says "refine")
        task, mode = "rec", "refine"
    if mode == "refine" and task in ("reg", "rewrite"):
        p.error(f"--mode refine needs a task whose answer holds locations (rec, det, point, res), not {task!r}")
    if task not in source.TASKS:
        p.error(f"source {a.source!r} supports tasks {', '.join(source.TASKS)}, not {task!r}")
    if a.format != "getok" and (mode == "refine" or task == "res"):
        what = "masks (task res)" if task == "res" else "refine mode (two turns of offsets)"
        error("convert-datasets", f"--format {a.format} has no form for {what}: only --format getok writes them")
        raise SystemExit(2)  # one line, without the usage block: the arguments are fine, the combination is not
    if a.format == "qwen25" and (task not in Qwen25Format.PROMPTS or a.frame not in (None, "orig")):
        error("convert-datasets", f"--format qwen25 writes Qwen2.5-VL's answers to {' and '.join(Qwen25Format.PROMPTS)} "
                                  f"questions in the frame it sees, the whole image (--frame orig); got --task {task}"
                                  f"{'' if a.frame is None else ' --frame ' + a.frame}")
        raise SystemExit(2)
    if a.frame is None:
        a.frame = "orig" if a.format == "qwen25" else "pad"
    try:
        cfg = replace(LocationOptions(**from_flags(a, LocationOptions, dash=True)), mode=mode).build()
    except ValueError as e:
        p.error(str(e))
    if a.output.suffix not in (".json", ".jsonl"):
        p.error(f"--output must end in .json or .jsonl, got {a.output}")
    if a.workers < 1:
        p.error("--workers must be >= 1")
    if a.group_turns < 1:
        p.error("--group-turns must be >= 1")
    opts = Options(input=a.input, image_root=a.image_root, task=task, split=a.split, dataset=a.dataset, split_by=a.split_by, input_frame=a.input_frame)
    label = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in ("workers", "progress", "no_resume", "list")}
    return Job(
        source=a.source, opts=opts, output=a.output, cfg=cfg, frame=a.frame, seed=a.seed, workers=a.workers,
        limit=a.limit, on_error=a.on_error, sam_checkpoint=a.sam_checkpoint, sam_model_type=a.sam_model_type,
        superpixels=a.superpixels, tau=a.tau, max_points=a.max_points,
        resume=not a.no_resume, group_turns=a.group_turns, progress=a.progress, label=label,
    )


def format_summary(s: dict) -> str:
    lines = [f"{s['source']} -> {s['output']} ({s['task']}): read {s['read']}, written {s['written']}, skipped {s['skipped']}"]
    if s.get("output_records", s["written"]) != s["written"]:
        lines[0] += f", as {s['output_records']} records (--group-turns)"
    lines += [f"  skipped {n}: {reason}" for reason, n in s["skipped_by_reason"].items()]
    if s.get("repeated_ids"):
        lines.append(f"  {s['repeated_ids']} record(s) repeat an earlier record's id (kept: the source's own ids, which its format lets repeat)")
    if s["skipped"]:
        lines.append(f"  reasons per record: {Path(s['output']).with_suffix('')}.rejects.jsonl")
    return "\n".join(lines)


def decode_main(argv):
    p = argparse.ArgumentParser(prog="convert-datasets decode", description="converted records -> shapes in original pixels (JSON lines: id, text, shapes, errors)")
    p.add_argument("file", type=Path)
    p.add_argument("--output", type=Path, help="write here (atomically) instead of stdout")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="a record that is not a converted record: stop (fail) or leave it out and count it (skip)")
    a = p.parse_args(argv)
    counts = {"read": 0, "skipped": 0}

    def decoded():
        for where, raw in json_records(a.file):
            counts["read"] += 1
            try:
                if isinstance(raw, ConvertError):
                    raise raw
                line = json.dumps(decode_record(parse_json(raw, where, one_line=True) if isinstance(raw, str) else raw), ensure_ascii=False)
                if not_utf8(line):
                    raise ConvertError(where, field_holding(raw, not_utf8), "text that is not UTF-8 (undecodable bytes, or a lone surrogate)")
                yield line
            except (ConvertError, RecordsError) as e:
                bad = e if isinstance(e, ConvertError) else ConvertError(where, None, str(e))
                if a.on_error == "fail":
                    raise Stop(f"{bad}  (use --on-error skip to skip such records)") from None
                counts["skipped"] += 1
                print(f"convert-datasets decode: skipped {one_line(bad)}", file=sys.stderr)

    try:
        if a.output is None:
            for line in decoded():
                print(line)
        else:
            with atomic_path(a.output) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for line in decoded():
                    f.write(line + "\n")
    except (ConvertError, Stop) as e:
        error("convert-datasets decode", e)
        return 1
    except BrokenPipeError:
        raise  # main(): the reader of stdout left
    except OSError as e:
        error("convert-datasets decode", f"cannot write {a.output}: {e}")
        return 1
    if counts["skipped"]:
        print(f"convert-datasets decode: read {counts['read']}, decoded {counts['read'] - counts['skipped']}, "
              f"skipped {counts['skipped']}", file=sys.stderr)
    return 0


def questions_main(argv):
    """A converted file -> LLaVA's question file, so that LLaVA's own ``llava.eval.model_vqa`` asks exactly the converted
    questions: one JSON line per record with an image, ``{"question_id": id, "image", "text"}``, ``text`` the first
    human turn without ``<image>`` (model_vqa puts the image token back in front). Its answers file (``question_id``,
    ``text``) is what ``llava-getok eval --predictions`` reads."""
    p = argparse.ArgumentParser(prog="convert-datasets questions",
                                description="converted records -> a question file for LLaVA's llava.eval.model_vqa")
    p.add_argument("file", type=Path)
    p.add_argument("--output", type=Path, help="write here (atomically) instead of stdout")
    a = p.parse_args(argv)
    try:
        records = read_records(a.file, one_question=True)
    except RecordsError as e:
        error("convert-datasets questions", e)
        return 1
    lines, skipped = [], 0
    for r in records:
        turns = r.get("conversations")
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        if not (isinstance(r.get("image"), str) and r["image"] and first.get("from") == "human"
                and isinstance(first.get("value"), str)):
            skipped += 1  # model_vqa asks about an image, with a human question
            continue
        text = first["value"].replace("<image>", "").strip()
        lines.append(json.dumps({"question_id": r["id"], "image": r["image"], "text": text}, ensure_ascii=False))
    body = "".join(line + "\n" for line in lines)
    try:
        if a.output is None:
            sys.stdout.write(body)
        else:
            with atomic_path(a.output) as tmp:
                Path(tmp).write_text(body, encoding="utf-8")
    except OSError as e:
        error("convert-datasets questions", f"cannot write {a.output}: {e}")
        return 1
    if skipped:
        print(f"convert-datasets questions: {skipped} record(s) without an image or a human question left out",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

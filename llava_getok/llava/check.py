"""``llava-getok check-data``: run LLaVA's own preprocessing over converted data; fail on any mismatch.

LLaVA's ``preprocess_v1`` silently masks a whole sample when its length arithmetic disagrees with the
tokenizer ("WARNING: tokenization mismatch ... (ignored)": loss 0, data lost without an error; LLaVA#661).
This check runs exactly that code (``llava.train.train.preprocess``) on every record and fails when:

- LLaVA reports a tokenization mismatch, or a record ends up with no supervised token at all;
- a GETok token of an answer does not arrive as one supervised label id (split, merged or masked).

Answers cut by ``model_max_length`` are counted and reported, not failed. A record that repeats an earlier one
(same image and conversations: upsampled data, a curriculum's later passes) is counted and checked once.
``python -m llava_getok.train`` runs the same check on its training data before it trains.

Usage: ``llava-getok check-data DATA.json --model-path CKPT_OR_TOKENIZER [--version getok_v1] [--grid 32 ...]``
(a tokenizer without a sidecar gets the tokens of ``--grid``, or of the data's own format when it is text or bins)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..formats import LOCATION_TOKEN_RE, LocationOptions
from ..frames import frames_differ, llava_frame
from ..messages import one_line
from ..options import add_flags, from_flags
from ..vocab import GETokConfig

GETOK_FLAGS = tuple(f.name for f in dataclasses.fields(GETokConfig))  # the GETok config's options

MISMATCH = "tokenization mismatch"


class DataCheckError(ValueError):
    """Converted data that LLaVA's preprocessing would silently drop or damage."""


@dataclass
class CheckReport:
    records: int = 0
    repeats: int = 0
    checked: int = 0
    supervised_tokens: int = 0
    getok_tokens: int = 0
    truncated: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        rows = [("records", self.records), ("repeats (checked once)", self.repeats), ("checked", self.checked),
                ("supervised tokens", self.supervised_tokens), ("location tokens in answers", self.getok_tokens), ("truncated (max length)", self.truncated),
                ("problems", len(self.problems))]
        return "| quantity | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


@dataclass
class _DataArgs:
    """The fields of LLaVA's DataArguments that ``preprocess_multimodal`` reads."""

    is_multimodal: bool = True
    mm_use_im_start_end: bool = False


def _getok_ids(tokenizer) -> set[int]:
    """The ids of every location token the tokenizer has (GETok's and the bins')."""
    vocab = tokenizer.get_vocab()
    return {i for t, i in vocab.items() if LOCATION_TOKEN_RE.fullmatch(t)}


@contextlib.contextmanager
def _template(version: str | None):
    """LLaVA's preprocess reads a module global; set it for the check and put it back."""
    from llava import conversation

    from .templates import resolve_template

    saved = conversation.default_conversation
    if version is not None:
        conversation.default_conversation = resolve_template(version)
    try:
        yield
    finally:
        conversation.default_conversation = saved


def check_records(records, tokenizer, version: str | None = None, mm_use_im_start_end: bool = False,
                  limit: int | None = None, source: str = "data") -> CheckReport:
    """Run LLaVA's preprocessing over ``records`` (LLaVA-format dicts); return a report (``report.ok``).
    ``version``: the conversation template (None: the one LLaVA's train() has set). ``limit`` N >= 0: only N
    distinct records, spread evenly over the list (the first N of a curriculum would be its first stage alone)."""
    from llava.constants import IGNORE_INDEX
    from llava.train import train as llava_train

    getok_ids = _getok_ids(tokenizer)
    data_args = _DataArgs(mm_use_im_start_end=mm_use_im_start_end)
    report = CheckReport(records=len(records))
    seen: dict[str, int] = {}  # record content -> its first index
    for index, record in enumerate(records):
        key = json.dumps([record.get("image"), record.get("conversations")], sort_keys=True, default=str)
        seen.setdefault(key, index)
    report.repeats = len(records) - len(seen)
    todo = sorted(seen.values())
    if limit is not None and 0 <= limit < len(todo):
        todo = [todo[int(k)] for k in np.linspace(0, len(todo) - 1, limit)] if limit else []
    with _template(version):
        for index in todo:
            record = records[index]
            where = f"{source}: record {index} (id {record.get('id', '?')!r})"
            convs = record.get("conversations")
            if not isinstance(convs, list) or not convs:
                report.problems.append(f"{where}: field 'conversations' missing or empty")
                continue
            has_image = "image" in record
            sources = copy.deepcopy([convs])
            if has_image:
                sources = llava_train.preprocess_multimodal(sources, data_args)
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    data = llava_train.preprocess(sources, tokenizer, has_image=has_image)
            except (AssertionError, KeyError) as e:  # LLaVA asserts on role order and unknown speakers
                report.problems.append(f"{where}: LLaVA's preprocess rejected it ({type(e).__name__}: {e})")
                continue
            report.checked += 1
            labels = data["labels"][0]
            input_ids = data["input_ids"][0]
            supervised = labels[labels != IGNORE_INDEX].tolist()
            report.supervised_tokens += len(supervised)
            if MISMATCH in out.getvalue():
                report.problems.append(f"{where}: LLaVA's {out.getvalue().strip()} -- the sample would be "
                                       f"silently masked (tokenizer legacy={getattr(tokenizer, 'legacy', None)})")
                continue
            if not supervised:
                report.problems.append(f"{where}: no supervised token (every label masked)")
                continue
            answers = "".join(m["value"] for m in convs if m.get("from") == "gpt")
            want = sum(1 for m in LOCATION_TOKEN_RE.finditer(answers) if m.group(0).isascii())
            report.getok_tokens += want
            got = sum(1 for t in supervised if t in getok_ids)
            if got != want:
                if len(input_ids) >= tokenizer.model_max_length:
                    report.truncated += 1
                else:
                    report.problems.append(f"{where}: {want} location tokens in the answers but {got} supervised "
                                           f"location token label ids (split, merged or masked)")
    return report


def raise_on_problems(report: CheckReport, source: str, show: int = 5) -> None:
    if report.problems:
        more = f"\n... and {len(report.problems) - show} more" if len(report.problems) > show else ""
        raise DataCheckError(f"{source}: {len(report.problems)} of {report.checked} records fail LLaVA's "
                             f"preprocessing check:\n" + "\n".join(report.problems[:show]) + more)


def model_frame(args, sidecar) -> str | None:
    """The frame the model sees: its sidecar's; else read off ``--image-aspect-ratio`` / ``--vision-tower`` or the
    model folder's ``config.json`` (``image_aspect_ratio``, ``mm_vision_tower``) and the tower's image processor, as
    LLaVA's ``CLIPVisionTower`` loads it; None when neither is known (a bare tokenizer)."""
    if sidecar is not None:
        return sidecar.frame
    config = Path(args.model_path) / "config.json"
    saved = json.loads(config.read_text()) if config.is_file() else {}
    aspect = args.image_aspect_ratio or saved.get("image_aspect_ratio")
    tower = args.vision_tower or saved.get("mm_vision_tower")
    if aspect is None and tower is None:
        return None
    if tower is None:
        raise ValueError("--image-aspect-ratio needs --vision-tower: the tower's image processor decides the frame")
    from transformers import CLIPImageProcessor

    try:
        processor = CLIPImageProcessor.from_pretrained(tower)
    except OSError as e:
        raise ValueError(f"cannot load the image processor of the vision tower {tower!r}, which decides the frame: "
                         f"{e}") from None
    return llava_frame(aspect or "square", processor)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-getok check-data", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="converted data (LLaVA JSON list or JSONL)")
    p.add_argument("--model-path", required=True, help="a checkpoint or tokenizer folder (slow LlamaTokenizer)")
    p.add_argument("--version", default="getok_v1", help="LLaVA conversation template (default getok_v1)")
    add_flags(p, LocationOptions, dash=True, only=GETOK_FLAGS, defaults={"grid": None})  # --grid: add GETok tokens
    p.add_argument("--model-max-length", type=int, default=2048)
    p.add_argument("--mm-use-im-start-end", action="store_true")
    p.add_argument("--limit", type=int, default=-1, help="check only N distinct records, spread evenly over the file (-1: all)")
    p.add_argument("--image-aspect-ratio", help="as training's --image_aspect_ratio: with --vision-tower, the frame the "
                   "records must be in (default: the checkpoint's sidecar, else its config.json)")
    p.add_argument("--vision-tower", help="as training's --vision_tower: its image processor decides the frame")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from .compat import apply_compat_fixes
    from ..training.sidecar import read_sidecar
    from .templates import register_templates
    from ..training.tokens import add_getok_tokens, check_token_ids, location_tokens_as_content, use_non_legacy

    apply_compat_fixes()  # what LLaVA's preprocessing needs on this stack, and the getok_* templates: no trainer
    register_templates()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path, use_fast=False, model_max_length=args.model_max_length,
                                              padding_side="right")
    use_non_legacy(tokenizer, args.model_path)  # as training will use it
    tokenizer.pad_token = tokenizer.unk_token  # what LLaVA's train() does for every template but v0
    from ..formats import data_formats
    from ..records import RecordsError, read_records

    try:
        records = read_records(args.data, require_id=False)
        formats = data_formats(records)
    except (RecordsError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    sidecar = read_sidecar(args.model_path)
    if sidecar is not None:
        sidecar.check_tokenizer(tokenizer, args.model_path)
        location_tokens_as_content(tokenizer, sidecar.location_format)  # as the builder loads it
        check_token_ids(tokenizer, sidecar.location_format)
    elif args.grid:
        cfg = GETokConfig.from_dict(from_flags(args, LocationOptions, dash=True, only=GETOK_FLAGS))
        add_getok_tokens(tokenizer, cfg)
        check_token_ids(tokenizer, cfg)
    elif formats and not isinstance(formats[0], GETokConfig):  # the data's own format: text adds nothing, bins K
        for fmt in formats:
            add_getok_tokens(tokenizer, fmt)
            check_token_ids(tokenizer, fmt)
    elif not _getok_ids(tokenizer):
        print(f"{args.model_path}: no GETok tokens in the tokenizer and no --grid: GETok tokens would be split",
              file=sys.stderr)
        return 2
    try:
        frame = model_frame(args, sidecar)
        problem = frames_differ(records, frame, args.data) if frame is not None else None
    except (OSError, ValueError) as e:
        problem = f"{args.model_path}: {one_line(e)}"
    if problem:
        print(problem, file=sys.stderr)
        return 1
    if frame is None:
        print(f"note: frames not checked ({args.model_path} has no sidecar or image_aspect_ratio; pass "
              f"--image-aspect-ratio and --vision-tower as training will)", file=sys.stderr)
    report = check_records(records, tokenizer, version=args.version, mm_use_im_start_end=args.mm_use_im_start_end,
                           limit=args.limit, source=str(args.data))
    print(report.table())
    for line in report.problems[:20]:
        print(line, file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

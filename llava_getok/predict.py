"""``llava-getok predict``: a LLaVA model answers the questions of a converted file; the answers are parsed in the
file's location format (GETok and bins tokens by token ids, text coordinates from the text) into shapes in pixels
of the original image and written as JSONL. The model is a checkpoint of ``python -m llava_getok.train`` (its
sidecar says its format) or a stock LLaVA without a sidecar, e.g. ``liuhaotian/llava-v1.5-7b`` on data converted
with ``--format text --frame pad`` (docs/zero-shot.md).

    llava-getok predict --model-path CKPT [--model-base BASE] --data converted.json --image-root DIR
                        --output preds.jsonl [--constrained/--no-constrained] [--shape-only]
                        [--batch-size 8] [--max-new-tokens 64] [--limit N] [--conv-mode llava_v1]

One line per record, in the file's order: ``{"id", "text", "shapes": [{"kind", "points"}], "errors"}``
(docs/data-format.md). Generation is batched with LLaVA's own input path (template, ``<image>`` token,
``process_images``), left padding and ``config.tokenizer_padding_side = "left"`` (docs/pitfalls.md), greedy.
GETok and bins answers are grammar-constrained (``--constrained``, the default); text answers are free text.
Refine-mode records get two turns: the grid answer, then LLaVA's refine question about *that* answer, whose
offsets are applied to it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .atomic import atomic_path
from .formats import LocationFormat, describe, for_image, format_to_dict, parse, parse_ids, same_tokens
from .frames import frame_of, frames_differ
from .parse import ParseResult
from .messages import one_line
from .records import REFINE_PROMPT, TASK_SHAPES, RecordsError, check_format, check_getok, prediction_line, read_records



def question_turns(record: dict) -> list[dict]:
    """The conversation up to (not including) the first answer."""
    turns = record.get("conversations") or []
    if not turns or turns[0].get("from") != "human":
        raise ValueError(f"record {record.get('id')}: field 'conversations' must start with a human turn")
    return turns[:1]


class Predictor:
    """Batched generation + parsing for one loaded LLaVA model.

    cfg: the location format of the answers (the data's: a GETokConfig, whose lattice is the model's, or
    formats.TextFormat / BinsFormat). Each record's ``getok.frame`` and ``getok.size`` map the answers back to
    pixels. constrained: apply :class:`GETokLogitsProcessor` (GETok and bins; text answers are never constrained);
    shape_only: make each answer exactly the shape its task asks for (rec: a box, res: a mask, point: a point),
    which also rules out "no such object" answers.
    """

    def __init__(self, tokenizer, model, image_processor, cfg: LocationFormat, conv_mode: str = "llava_v1",
                 constrained: bool = True, shape_only: bool = False, max_new_tokens: int = 64):
        from .generation import getok_token_ids

        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.cfg, self.conv_mode = cfg, conv_mode
        self.constrained, self.shape_only, self.max_new_tokens = constrained, shape_only, max_new_tokens
        self.token_ids = getok_token_ids(tokenizer, cfg)
        self.id_to_token = {v: k for k, v in self.token_ids.items()}
        self.refine = getattr(cfg, "mode", None) == "refine"
        self.first_cfg = cfg.with_mode("grid") if self.refine else cfg
        self._cache = {}

    def _processors(self, cfg, only=None, first_shapes=None):
        """The grammar constraint for one generate call (none when unconstrained)."""
        from .generation import GETokLogitsProcessor, RefinementLogitsProcessor

        if not self.constrained or not cfg.tokens():  # text coordinates are ordinary text: nothing to constrain
            return []
        if first_shapes is not None:  # refine mode's second turn: exactly the first answer's structure
            return [RefinementLogitsProcessor.from_tokenizer(self.tokenizer, cfg, first_shapes)]
        key = (cfg, only)
        if key not in self._cache:  # building the tables costs more than many steps: one per kind, reused
            self._cache[key] = GETokLogitsProcessor.from_tokenizer(self.tokenizer, cfg, only=only,
                                                                   max_new_tokens=self.max_new_tokens)
        self._cache[key].reset()
        return [self._cache[key]]

    def generate(self, conversations: list[list[dict]], images: list, processors=(), max_new_tokens=None) -> list[list[int]]:
        """Greedy answers (token ids up to EOS) for a batch of conversations and their image tensors."""
        import torch
        from transformers import LogitsProcessorList

        from .llava import inputs

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.unk_token_id
        ids = [inputs.prompt_ids(inputs.render_prompt(c, self.conv_mode), self.tokenizer) for c in conversations]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        device = self.model.device
        dtype = next(self.model.parameters()).dtype
        kwargs = {}
        if images[0] is not None:
            kwargs["images"] = torch.stack(images).to(device=device, dtype=dtype)
        with torch.inference_mode(), inputs.padding_side(self.model, "left"):
            out = self.model.generate(
                input_ids.to(device), attention_mask=attention.to(device), do_sample=False, num_beams=1,
                max_new_tokens=max_new_tokens or self.max_new_tokens, logits_processor=LogitsProcessorList(processors),
                pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id, use_cache=True, **kwargs,
            )
        answers = []
        for row in out.tolist():  # LLaVA passes inputs_embeds: generate returns the new tokens only
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            answers.append(row)
        return answers

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False,
                                     spaces_between_special_tokens=False)

    def predict(self, records: list[dict], image_root, images=None) -> list[dict]:
        """Prediction lines for a batch of records that share a task (one shape-only restriction); ``images``: their
        pixel tensors when already read (:meth:`image`)."""
        from .codec import apply_refinement

        tasks = {(r.get("getok") or {}).get("task") for r in records}
        only = TASK_SHAPES.get(tasks.pop()) if self.shape_only and len(tasks) == 1 else None
        images = images if images is not None else [self.image(r, image_root) for r in records]
        first_turns = [question_turns(r) for r in records]
        answers = self.generate(first_turns, images, self._processors(self.first_cfg, only))
        out = []
        if self.refine:  # second turn: refine the model's own first answer
            from .parse import ParseError

            texts = [self.decode(a) for a in answers]
            firsts = [parse_ids(a, self.id_to_token, self.first_cfg) for a in answers]
            second = [t + [{"from": "gpt", "value": a.strip()}, {"from": "human", "value": REFINE_PROMPT.format(answer=a.strip())}]
                      for t, a in zip(first_turns, texts)]
            procs = self._processors(self.cfg, first_shapes=[f.shapes for f in firsts])
            budget = procs[0].max_new_tokens if procs else None
            refinements = self.generate(second, images, procs, budget)
            for r, first, text, b in zip(records, firsts, texts, refinements):
                ref = parse_ids(b, self.id_to_token, self.cfg)
                res = ParseResult(errors=first.errors + ref.errors)
                try:
                    res.shapes = apply_refinement(first.shapes, ref.refinements, self.cfg)
                except ValueError as e:
                    res.errors.append(ParseError(0, f"refinement does not fit the first answer: {e}"))
                out.append(self._line(r, text + "\n" + self.decode(b), res))
            return out
        for r, a in zip(records, answers):
            text = self.decode(a)
            result = (parse_ids(a, self.id_to_token, self.cfg) if self.token_ids
                      else parse(text, for_image(self.cfg, (r.get("getok") or {}).get("size"))))
            out.append(self._line(r, text, result))
        return out

    def _line(self, record, text, result):
        g = check_getok(record.get("getok") or {}, f"record {record.get('id')}: getok", needs=("frame", "size"))
        return prediction_line(record["id"], text, result.shapes, [e.message for e in result.errors], g["size"], g["frame"])

    def image(self, record, image_root):
        """The pixel tensor of a record's image (upright: llava_getok.images), None without one; FileNotFoundError
        or ValueError naming the record, the field and the file."""
        from .images import ImageError
        from .llava import inputs

        if not record.get("image"):
            return None
        path = Path(image_root or ".") / record["image"]
        if not path.is_file():
            raise FileNotFoundError(f"record {record.get('id')}: field 'image': {path} not found (--image-root {image_root})")
        try:
            return inputs.image_tensor(path, self.image_processor, self.model.config)
        except ImageError as e:
            raise ValueError(f"record {record.get('id')}: field 'image': {e}") from None


# --- the transformers-native backend (llava_getok.hf: Qwen2.5-VL, llava-hf): its checkpoints say so in their sidecar;
# a model folder without one is this backend's when its config is one of its model families ---
class HFPredictor(Predictor):
    """:class:`Predictor` for a model of ``llava_getok.hf``: the same grammar, parsing and refine turns, with prompts
    from the model's chat template and inputs from its processor (``llava_getok.hf.generate.Generator``)."""

    def __init__(self, generator, cfg: LocationFormat, constrained: bool = True, shape_only: bool = False,
                 max_new_tokens: int = 64):
        super().__init__(generator.tokenizer, generator.model, generator.processor, cfg, None, constrained, shape_only,
                         max_new_tokens)
        self.generator = generator

    def generate(self, conversations, images, processors=(), max_new_tokens=None):
        return self.generator.generate(conversations, images, processors, max_new_tokens or self.max_new_tokens)

    def image(self, record, image_root):
        from .hf.data import load_image

        return load_image(record, image_root)


def backend_of(model_path: str) -> str:
    """"hf" or "llava": the checkpoint's sidecar says; without one, a transformers-native model of a supported family
    (its config.json) is "hf", anything else LLaVA's."""
    from .training.sidecar import read_sidecar

    sidecar = read_sidecar(model_path)
    if sidecar is not None:
        return sidecar.backend
    try:
        from .hf.family import family_of

        family_of(model_path)
    except ValueError:
        return "llava"
    return "hf"


def load_hf(model_path: str, model_base: str | None, device: str):
    """(generator, processor) of an hf-backend checkpoint or of a stock model of one of its families."""
    from .hf.checkpoint import load_checkpoint
    from .hf.family import family_of, load_processor
    from .hf.generate import Generator
    from .training.sidecar import read_sidecar

    if read_sidecar(model_path) is not None:
        processor, model, _ = load_checkpoint(model_path, model_base, device)
    else:
        import torch

        family = family_of(model_path)
        processor = load_processor(model_path, family)
        model = family.load_class().from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    return Generator(processor, model), processor
# --- end of the transformers-native backend ---


def batches(records: list[dict], size: int):
    """Consecutive records of the same task (and with / without image), at most ``size`` per batch."""
    batch, key = [], None
    for r in records:
        k = ((r.get("getok") or {}).get("task"), bool(r.get("image")))
        if batch and (k != key or len(batch) == size):
            yield batch
            batch = []
        batch.append(r)
        key = k
    if batch:
        yield batch


def load_model(model_path: str, model_base: str | None = None, device: str = "cpu"):
    """Load a checkpoint the way LLaVA's builder does with the GETok hook (tokens and rows from the sidecar,
    compat fixes registered); float32 on CPU, where LLaVA's own float16 default is slow or unsupported."""
    from .llava import register
    from .llava.builder import load_getok_checkpoint

    register()
    tokenizer, model, processor, _ = load_getok_checkpoint(model_path, model_base, device=device)
    model.eval()
    return tokenizer, model, processor


def model_getok_config(model_path: str) -> LocationFormat | None:
    """The location format recorded in the checkpoint's sidecar (GETok's config for sidecars written before formats
    were recorded); None without a sidecar (a stock LLaVA checkpoint)."""
    from .training.sidecar import read_sidecar

    sidecar = read_sidecar(model_path)
    return sidecar.location_format if sidecar is not None else None


def predict_file(predictor: Predictor, records: list[dict], image_root, output: Path, batch_size: int = 8,
                 progress: bool | None = None, skipped: list | None = None) -> int:
    """Write one prediction line per record to ``output`` atomically; return the number of lines.

    A record whose image is missing or cannot be shown to the model stops the run (FileNotFoundError / ValueError
    naming the record and the file), unless ``skipped`` is a list: then its message is appended there and the record
    gets no line."""
    from tqdm import tqdm

    n = 0
    with atomic_path(output) as tmp, open(tmp, "w") as f, \
            tqdm(total=len(records), desc="predict", unit="rec", disable=progress is False) as bar:
        for batch in batches(records, batch_size):
            kept, images = [], []
            for r in batch:
                try:
                    images.append(predictor.image(r, image_root))
                    kept.append(r)
                except (FileNotFoundError, ValueError) as e:
                    if skipped is None:
                        raise
                    skipped.append(str(e))
            for line in predictor.predict(kept, image_root, images) if kept else []:
                f.write(json.dumps(line) + "\n")
                n += 1
            bar.update(len(batch))
    return n


def _parser():
    p = argparse.ArgumentParser(prog="llava-getok predict", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None, help="base model of a LoRA / projector checkpoint")
    p.add_argument("--data", type=Path, required=True, help="converted file (JSON list or JSONL)")
    p.add_argument("--image-root", type=Path, default=None)
    p.add_argument("--output", type=Path, required=True, help="predictions JSONL")
    p.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=True,
                   help="grammar-constrained decoding of GETok and bins answers (default on; text answers are free)")
    p.add_argument("--shape-only", action="store_true",
                   help="the answer is exactly the shape the task asks for (rec: box, res: mask, point: point)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--conv-mode", default="llava_v1", help="LLaVA conversation template (as in training; stock "
                   "LLaVA-1.5: vicuna_v1, as LLaVA's own evaluation scripts)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="a record whose image is missing or unreadable: stop the run (default), or skip it (counted "
                        "and listed, no prediction line)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        records = read_records(args.data, one_question=True)
    except (RecordsError, OSError) as e:
        print(f"llava-getok predict: {e}", file=sys.stderr)
        return 1
    records = records[: args.limit] if args.limit is not None else records
    try:
        formats = {json.dumps(format_to_dict(check_format(r.get("getok") or {}, f"record {r.get('id')}: getok")),
                              sort_keys=True): k for k, r in enumerate(records)}
    except RecordsError as e:
        print(f"llava-getok predict: {args.data}: {e}", file=sys.stderr)
        return 1
    if len(formats) != 1:
        print(f"llava-getok predict: {args.data}: every record needs the same location format (getok.config or "
              f"getok.format), found {len(formats)}", file=sys.stderr)
        return 1
    cfg = check_format(records[0]["getok"], "getok")
    try:
        model_cfg = model_getok_config(args.model_path)
    except ValueError as e:
        print(f"llava-getok predict: {e}", file=sys.stderr)
        return 1
    if model_cfg is not None and not same_tokens(model_cfg, cfg):  # GETok's mode and rounds: the data's
        print(f"llava-getok predict: the model was trained on {describe(model_cfg)}, the data is in {describe(cfg)}: "
              "the format and its tokens (GETok: grid, offset levels, schedule; bins: K) must agree", file=sys.stderr)
        return 1
    import torch

    from . import quiet

    quiet.install()  # what predict prints is its own output, not the libraries' load-time notices
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if backend_of(args.model_path) == "hf":  # --- the transformers-native backend: its processor says the frame ---
        try:
            generator, seen_by = load_hf(args.model_path, args.model_base, device)
        except ValueError as e:
            print(f"llava-getok predict: {one_line(e)}", file=sys.stderr)
            return 1
        make = lambda: HFPredictor(generator, cfg, args.constrained, args.shape_only, args.max_new_tokens)  # noqa: E731
    else:
        tokenizer, model, processor = load_model(args.model_path, args.model_base, device)
        seen_by = model
        make = lambda: Predictor(tokenizer, model, processor, cfg, args.conv_mode, args.constrained,  # noqa: E731
                                 args.shape_only, args.max_new_tokens)
    try:  # the frame the model sees, read off its image_aspect_ratio and its tower's processor (spec section 1)
        problem = frames_differ(records, frame_of(seen_by), args.data)
    except ValueError as e:
        problem = f"{args.model_path}: {e}"
    if problem:
        print(f"llava-getok predict: {problem}", file=sys.stderr)
        return 1
    skipped = [] if args.on_error == "skip" else None
    try:
        predictor = make()
        n = predict_file(predictor, records, args.image_root, args.output, args.batch_size, skipped=skipped)
    except (FileNotFoundError, ValueError) as e:
        print(f"llava-getok predict: {one_line(e)}", file=sys.stderr)
        return 1
    for message in skipped or []:
        print(f"llava-getok predict: skipped {one_line(message)}", file=sys.stderr)
    if skipped:
        print(f"llava-getok predict: skipped {len(skipped)} record(s) whose image could not be read", file=sys.stderr)
    print(f"wrote {n} predictions to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The conversation engine that ``llava-getok chat``, ``llava-getok web`` and the model worker share: a GETok
checkpoint (or a stock model) of either backend loaded once, answers streamed token by token with the location tokens
kept, the shapes closed so far parsed from the token ids and mapped to pixels of the upright image, and the picture
with those shapes drawn.

    engine = Engine.load("runs/demo/llava-getok-demo", device="cpu")
    chat = Conversation(engine, load_image("photo.jpg"))
    for chunk in chat.ask("Where is the red circle?"):
        print(chunk.delta, end="")          # chunk.shapes: [{"kind", "points"}] in pixels, closed groups only
    chat.ground("box", "the red circle")    # a constrained answer: exactly one box
    chat.refine()                           # refine-mode checkpoints: the offset turn for the last answer

The backend is the checkpoint's (``predict.backend_of``: its sidecar, else its config), and what differs between
backends is one small class each (:mod:`llava_getok.session_backends`): loading, the prompt (LLaVA's templates, or the
model's chat template for Qwen2.5-VL and llava-hf), the model inputs for a prompt and a picture (LLaVA's
``process_images``, or the model's processor), the frame read off the image processor. Generation is the model's own
``generate`` in its dtype (float32 on a CPU), greedy at temperature 0, and grammar-constrained for formats with
location tokens (:class:`llava_getok.generation.GETokLogitsProcessor`), so every group the model opens closes and
parses. The raw answer (tokens decoded with ``skip_special_tokens=False``, whatever the tokenizer calls special) is
what the history keeps: the next turn's prompt is what training rendered.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from .formats import LocationFormat, parse, parse_ids
from .options import from_flags, option
from .formats import for_image
from .records import PROMPTS, REFINE_PROMPT, TASK_SHAPES, shapes_to_pixels
from .vocab import GETokConfig

GROUND = {shape: (task, shape) for task, shape in TASK_SHAPES.items()}  # /ground KIND -> (its task's prompt, only)
DEFAULT_MAX_NEW_TOKENS = 256


class Chunk(NamedTuple):
    """One step of a streamed answer. delta: text added since the previous chunk; text: the raw answer so far (GETok
    tokens kept); shapes: the shapes whose groups have closed so far, JSON shapes in pixels of the upright image;
    done: the answer is complete."""

    delta: str
    text: str
    shapes: list
    done: bool = False


class _IdStreamer:
    """A transformers streamer that hands the generated token ids to another thread (the prompt's ``put`` skipped,
    as ``TextIteratorStreamer(skip_prompt=True)`` does)."""

    END = object()

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put([int(v) for v in value.reshape(-1).tolist()])

    def end(self):
        self.queue.put(self.END)


@dataclass
class Answer:
    """The last complete answer of a conversation: raw text, token ids, shapes in the model's frame (normalised) and
    in pixels of the image (JSON shapes)."""

    text: str = ""
    ids: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    pixels: list = field(default_factory=list)
    anchors: list = field(default_factory=list)  # (anchor, point) pairs, normalised: where each offset moved a point


@dataclass(frozen=True)
class ModelOptions:
    """How chat, web and the model worker load their model: LLaVA's ``serve.cli`` flags, declared once
    (:func:`llava_getok.options.add_flags` with dashes)."""

    model_path: str = option(dataclasses.MISSING, "a GETok checkpoint of either backend (or a stock LLaVA, "
                             "Qwen2.5-VL or llava-hf)")
    model_base: str | None = option(None, "base model of a LoRA / projector checkpoint")
    conv_mode: str | None = option(None, "LLaVA conversation template (default: the checkpoint's, from its sidecar; "
                                   "Qwen2.5-VL and llava-hf use their chat template)")
    device: str | None = option(None, "cuda or cpu (default: cuda when available)")
    load_4bit: bool = option(False, "LLaVA: load the language model in 4 bits (bitsandbytes)")
    load_8bit: bool = option(False, "LLaVA: load the language model in 8 bits (bitsandbytes)")
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "most tokens an answer may have")


def load_engine(args, prog: str):
    """The :class:`Engine` for the :class:`ModelOptions` flags in ``args``; None after one line on stderr naming
    ``prog`` when the checkpoint cannot be loaded."""
    import sys

    import torch

    o = ModelOptions(**from_flags(args, ModelOptions, dash=True))
    device = o.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return Engine.load(o.model_path, o.model_base, device, o.load_4bit, o.load_8bit, o.conv_mode, o.max_new_tokens)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None


class Engine:
    """One loaded model. ``stream`` is the one generation path (chat, web and worker); ``picture`` draws.

    part: the backend's piece (:mod:`llava_getok.session_backends`); fmt: the location format of the answers (the
    sidecar's; None: the part's default, for a stock model)."""

    def __init__(self, part, fmt: LocationFormat | None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        from .generation import getok_token_ids

        self.part, self.tokenizer, self.model = part, part.tokenizer, part.model
        self.fmt = fmt if fmt is not None else part.default_format()
        self.template, self.roles, self.frame = part.template, part.roles, part.frame
        self.max_new_tokens = max_new_tokens
        self.token_ids = getok_token_ids(self.tokenizer, self.fmt)
        self.id_to_token = {v: k for k, v in self.token_ids.items()}
        self.refine_mode = isinstance(self.fmt, GETokConfig) and self.fmt.mode == "refine"
        self.answer_fmt = self.fmt.with_mode("grid") if self.refine_mode else self.fmt  # a refine model's first answer
        self._processors: dict = {}
        self._lock = threading.Lock()  # one generation at a time: the processors and the model are shared
        self._generator = None

    @classmethod
    def load(cls, model_path: str, model_base: str | None = None, device: str = "cpu", load_4bit: bool = False,
             load_8bit: bool = False, conv_mode: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        """Load a checkpoint (or a stock model) with the backend it is of: LLaVA's through the builder hook, a
        transformers-native one (Qwen2.5-VL, llava-hf) through ``llava_getok.hf``; GETok tokens and rows from its
        sidecar; float32 on a CPU."""
        from .predict import backend_of
        from .session_backends import HFModel, LlavaModel

        kind = HFModel if backend_of(model_path) == "hf" else LlavaModel
        part, fmt = kind.load(model_path, model_base, device, load_4bit, load_8bit, conv_mode)
        return cls(part, fmt, max_new_tokens)

    # -- generation ---------------------------------------------------------------------------------------------
    def prompt(self, turns) -> str:
        """LLaVA-style conversation turns (ending with a human turn) -> the prompt text as training rendered it."""
        return self.part.prompt(turns)

    def processors(self, only: str | None = None, first_shapes=None) -> list:
        """The grammar constraint for one answer (none for text coordinates)."""
        from .generation import GETokLogitsProcessor, RefinementLogitsProcessor

        if not self.token_ids:
            return []
        if first_shapes is not None:
            return [RefinementLogitsProcessor.from_tokenizer(self.tokenizer, self.fmt, [first_shapes])]
        key = only
        if key not in self._processors:  # the tables cost more than many steps: one per kind, reused
            self._processors[key] = GETokLogitsProcessor.from_tokenizer(self.tokenizer, self.answer_fmt, only=only,
                                                                        max_new_tokens=self.max_new_tokens)
        self._processors[key].reset()
        return [self._processors[key]]

    def decode(self, ids) -> str:
        """Token ids -> the raw answer text, every location token kept, spaced as training wrote it."""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False,
                                     spaces_between_special_tokens=False).strip()

    def parse(self, ids, fmt=None, size=None):
        """The shapes of an answer's token ids (text coordinates: of its text; a format whose numbers depend on the
        image, Qwen2.5-VL's pixels, bound to the image of ``size`` (W, H))."""
        fmt = fmt or self.answer_fmt
        if self.token_ids:
            return parse_ids(ids, self.id_to_token, fmt)
        return parse(self.decode(ids), for_image(fmt, size) if size is not None else fmt)

    def stream(self, prompt: str, picture=None, processors=(), temperature: float = 0.0, top_p: float = 1.0,
               max_new_tokens: int | None = None, shapes_of=None, stop: str | None = None) -> Iterator[Chunk]:
        """Generate the answer to a rendered ``prompt`` (its image marker, ``<image>`` for LLaVA, where ``picture``,
        an upright RGB PIL image, goes) and yield it chunk by chunk. ``shapes_of(ids)`` -> normalised shapes
        (default: the parsed closed groups), mapped to pixels of ``picture``; ``stop``: a string that ends the answer
        besides EOS (LLaVA's worker API). The last chunk has ``done`` set; its ``text`` is the whole answer."""
        import torch

        kwargs = self.part.inputs(prompt, picture)
        if stop:
            from transformers import StopStringCriteria

            kwargs["stopping_criteria"] = [StopStringCriteria(self.tokenizer, [stop])]
        eos = self.part.eos_ids
        streamer, failure = _IdStreamer(), []
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        budget = max_new_tokens or self.max_new_tokens
        for p in processors:  # a refinement's processor knows its own length
            budget = getattr(p, "max_new_tokens", None) or budget

        def run():
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs, max_new_tokens=budget, num_beams=1, logits_processor=list(processors),
                                        streamer=streamer, pad_token_id=self.part.pad_id, eos_token_id=eos,
                                        use_cache=True, **sampling)
            except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
                failure.append(e)
                streamer.end()

        size = picture.size if picture is not None else (1, 1)  # no image: the normalised frame
        bound = picture.size if picture is not None else None  # no image: nothing to bind a pixel format to
        shapes_of = shapes_of or (lambda got: self.parse(got, size=bound).shapes)
        with self._lock:
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            got, sent, n_shapes, shapes = [], "", -1, []
            while True:
                item = streamer.queue.get()
                if item is _IdStreamer.END:
                    break
                end = next((k for k, t in enumerate(item) if t in eos), None)
                if end is not None:  # the end of the answer (the template's end of turn)
                    got += item[:end]
                    continue
                got += item
                text = self.decode(got)
                if text.endswith("\ufffd"):  # a character split over byte tokens: wait for the rest
                    continue
                found = shapes_of(got)
                closed = len(found) != n_shapes
                if closed:  # a group closed (or a refinement applied): map the shapes once per change
                    n_shapes, shapes = len(found), shapes_to_pixels(found, size, self.frame)
                delta, sent = (text[len(sent):], text) if text.startswith(sent) else ("", text)
                if delta or closed:
                    yield Chunk(delta, text, shapes)
            thread.join()
        if failure:
            raise failure[0]
        text = self.decode(got)
        final = shapes_to_pixels(shapes_of(got), size, self.frame)
        yield Chunk(text[len(sent):] if text.startswith(sent) else "", text, final, done=True)

    # -- pictures -----------------------------------------------------------------------------------------------
    def moves(self, ids) -> list:
        """(anchor, point) pairs, normalised, for every complete GETok point of an answer: the grid cell's centre and
        where its offset tokens moved it."""
        from .codec import dequantize
        from .parse import lex_ids

        cfg = self.answer_fmt
        if not isinstance(cfg, GETokConfig):
            return []
        out, cell, offs = [], None, []

        def flush():
            if cell is not None and len(offs) == cfg.inline_rounds:
                anchor = cfg.anchors(np.asarray([cell]))[0]
                out.append((tuple(anchor.tolist()), tuple(dequantize([cell], [offs], cfg)[0].tolist())))

        for _, _, m in lex_ids(ids, self.id_to_token):
            if m is not None and m.group("i") is not None:
                flush()
                i, j = int(m.group("i")), int(m.group("j"))
                cell, offs = ((i, j) if i < cfg.grid and j < cfg.grid else None), []
            elif m is not None and m.group("dx") is not None and cell is not None:
                offs.append((int(m.group("dx")), int(m.group("dy"))))
            else:
                flush()
                cell, offs = None, []
        flush()
        return out

    def picture(self, picture, shapes: list, grid: bool = False, moves=()):
        """``picture`` (upright RGB) with ``shapes`` (JSON, pixels) drawn in red: boxes, points, polylines, masks
        decoded from their anchors (superpixel proposals); ``grid``: the lattice and the anchor cells; ``moves``:
        each point's grid anchor (hollow) joined to where its offsets put it."""
        from PIL import ImageDraw

        from .geometry import points_from_frame
        from .masks import SuperpixelGenerator, mask_from_anchors
        from .records import shapes_from_pixels
        from .viz import render

        mask = None
        masks = [s for s in shapes if s["kind"] == "mask"]
        if masks:
            if self._generator is None:
                self._generator = SuperpixelGenerator()
            anchors = [p for s in shapes_from_pixels(masks, picture.size, self.frame) for p in s.points]
            mask = mask_from_anchors(anchors, np.asarray(picture), self.frame, self._generator)
        cfg = self.fmt if isinstance(self.fmt, GETokConfig) else None
        out = render(picture, pred_shapes=shapes, pred_mask=mask, cfg=cfg, frame=self.frame, grid=grid and cfg is not None)
        if moves:
            d = ImageDraw.Draw(out)
            r = max(2, round(max(out.size) / 150))
            for anchor, point in moves:
                (ax, ay), (px, py) = points_from_frame(np.asarray([anchor, point]), out.size, self.frame).tolist()
                d.line([(ax, ay), (px, py)], fill=(255, 220, 0), width=max(1, r // 2))
                d.ellipse([ax - r, ay - r, ax + r, ay + r], outline=(255, 220, 0), width=max(1, r // 2))
        return out


class Conversation:
    """A chat about one image with an :class:`Engine`: the turns as training wrote them (raw GETok answers), the
    last answer, and the three commands chat and web offer (ground, refine, reset)."""

    def __init__(self, engine: Engine, picture=None, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int | None = None):
        self.engine, self.picture = engine, picture
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.turns: list[dict] = []
        self.last = Answer()
        self.last_prompt = ""  # the prompt text of the last answer, as the model read it

    def reset(self, picture=None):
        """Forget the turns (and change the image when one is given)."""
        self.turns, self.last = [], Answer()
        if picture is not None:
            self.picture = picture

    def _human(self, text: str) -> dict:
        first = not self.turns and self.picture is not None and "<image>" not in text
        return {"from": "human", "value": ("<image>\n" + text) if first else text}

    def ask(self, text: str, only: str | None = None) -> Iterator[Chunk]:
        """Stream the answer to ``text`` (constrained to one shape of kind ``only`` when given: box, point, mask,
        polyline, shape); the turn and its raw answer join the history once the answer is complete."""
        turns = self.turns + [self._human(text)]
        yield from self._answer(turns, self.engine.processors(only), self.engine.answer_fmt)

    def ground(self, kind: str, phrase: str) -> Iterator[Chunk]:
        """Ask for the ``kind`` (box, point, mask) of ``phrase`` with the records' own prompt, constrained to one
        shape of that kind."""
        if kind not in GROUND:
            raise ValueError(f"ground a box, a point or a mask, not {kind!r}")
        task, only = GROUND[kind]
        if only == "mask" and not isinstance(self.engine.fmt, GETokConfig):
            raise ValueError("masks need the GETok location format; this model answers in "
                             f"{type(self.engine.fmt).__name__}")
        prompts = getattr(self.engine.fmt, "PROMPTS", {})  # a stock model's own prompts (Qwen2.5-VL's JSON boxes)
        prompt = prompts.get(task) or PROMPTS[task]
        return self.ask(prompt.format(expression=phrase.strip().rstrip(".")), only)

    def refine(self) -> Iterator[Chunk]:
        """Refine mode's second turn for the last answer: REFINE_PROMPT restates it, and the answer (one offset or
        ``<delete>`` per earlier point, constrained to fit it) moves its points; the chunks' shapes are the refined
        ones once the refinement is complete."""
        engine = self.engine
        if not engine.refine_mode:
            raise ValueError("/refine is for models trained in refine mode (their sidecar's GETok mode is 'refine')")
        if not self.last.shapes:
            raise ValueError("nothing to refine: the last answer has no shapes")
        return self._refinement(self.last.shapes, self.turns + [self._human(REFINE_PROMPT.format(answer=self.last.text))])

    def _refinement(self, first, turns) -> Iterator[Chunk]:
        from .codec import apply_refinement

        engine = self.engine

        def refined(ids):
            r = engine.parse(ids, engine.fmt)
            if r.errors or not r.refinements:
                return first
            try:
                return apply_refinement(first, r.refinements, engine.fmt)
            except ValueError:
                return first

        yield from self._answer(turns, engine.processors(first_shapes=first), engine.fmt, shapes_of=refined,
                                anchors_from=first)

    def _answer(self, turns, processors, fmt, shapes_of=None, anchors_from=None) -> Iterator[Chunk]:
        engine = self.engine
        ids_seen = []
        size = self.picture.size if self.picture is not None else None

        def track(ids):
            ids_seen[:] = ids
            return shapes_of(ids) if shapes_of else engine.parse(ids, fmt, size).shapes

        last = None
        self.last_prompt = engine.prompt(turns)
        for chunk in engine.stream(self.last_prompt, self.picture, processors, self.temperature, self.top_p,
                                   self.max_new_tokens, shapes_of=track):
            last = chunk
            yield chunk
        shapes = track(ids_seen)
        if anchors_from is not None:  # a refinement: each first-answer point moved to its refined place
            kept = len(anchors_from) == len(shapes) and all(len(s.points) == len(r.points) for s, r in zip(anchors_from, shapes))
            moves = [(a, p) for s, r in zip(anchors_from, shapes) for a, p in zip(s.points, r.points)] if kept else []
        else:
            moves = engine.moves(ids_seen)
        self.turns = turns + [{"from": "gpt", "value": last.text}]
        self.last = Answer(last.text, list(ids_seen), shapes, last.shapes, moves)

"""Grammar-constrained decoding: a transformers ``LogitsProcessor`` that only lets the model write GETok
that :func:`llava_getok.parse.parse_ids` accepts (spec sections 4, 5 and 8), or 1D bins tokens that
``formats.BinsFormat.parse_ids`` accepts (:class:`BinsGrammar`: a run of 2 location tokens is a point, of 4 a box).

The grammar (the one :mod:`llava_getok.parse` reads), with R = cfg.inline_rounds:

    answer  := (TEXT | group | refine)* EOS
    point   := GRID OFF{R}
    group   := <box> point point </box> | <pl> point+ </pl> | <seg> point+ </seg> | point
    refine  := <offset> (TEXT | rgroup)* </offset>       (refine mode only)
    rgroup  := the same groups with OFF | <delete> in place of each point

Inside a group nothing but its points and its closing tag may follow (no free text, no EOS).

How it stays cheap: the grammar is a small finite automaton over *token classes* (text, EOS, grid, offset,
delete, each tag). Every vocabulary id is mapped to its class once; the automaton is tabulated once as a
transition table and, per state, an additive bias over the vocabulary (0 or -inf). Each step then costs one
table lookup per row for the new state and one row gather + add on the device, with the state of every
batch row updated from the one token that was just generated (no re-scan of the sequence, no host sync).

``max_new_tokens`` (optional) makes the output parse even when the budget runs out: when only just enough
tokens are left, the processor allows only the tokens that close the open group in time.

Limitation: the state follows each row's own last token, so use it with greedy search or sampling
(``num_beams=1``, no assisted decoding): beam search reorders rows between steps, and assisted decoding
checks several tokens per call.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch
from transformers import LogitsProcessor

from .formats import BinsFormat, LocationFormat, format_name
from .vocab import DELETE, KIND_TAGS, TAG_KINDS, TAGS, GETokConfig

# Token classes. NEVER: ids the model may never write (BOS, ids beyond the tokenizer in a padded head).
CLASSES = (
    "text", "eos", "grid", "off", "delete",
    "<box>", "</box>", "<seg>", "</seg>", "<pl>", "</pl>", "<offset>", "</offset>", "never", "loc", "space",
)
# A bare word boundary ("▁" in SentencePiece, "Ġ" in byte-level BPE): LLaVA's templates put a space between the
# assistant's role and its reply, and a tokenizer that splits added tokens off writes it as this token before an
# answer that starts with a location token. A shape-only answer may start with it (once), as in training;
# elsewhere it is text.
SPACE_PIECES = ("▁", "Ġ")
_C = {c: k for k, c in enumerate(CLASSES)}
ONLY = {  # answer restrictions -> the ways an answer may start
    None: None,
    "box": ("<box>",),
    "mask": ("<seg>",),
    "polyline": ("<pl>",),
    "point": ("grid",),
    "shape": ("<box>", "<seg>", "<pl>", "grid"),
    "refinement": ("<offset>",),
}


class State(NamedTuple):
    """One automaton state.

    ctx: "text" (free text), "start" (only-mode, nothing written yet), "end" (only-mode, answer complete:
    EOS only), "done" (EOS written: anything, generate pads these rows), a group "box"/"seg"/"pl" (a point
    in free text is ctx "point"), "off" (inside <offset>, between rgroups) or a refine group
    "off_box"/"off_seg"/"off_pl".
    points: completed points in the current group (capped at 2 for a box, at 1 for seg/pl).
    need: offset tokens still owed by the current point (inline mode).
    """

    ctx: str
    points: int = 0
    need: int = 0


class _Automaton:
    """A grammar over token classes, tabulated: subclasses give ``start``, ``step`` and ``accepting``; this builds the
    reachable states breadth-first (``states``, ``index``), the transition table ``trans`` (-1: forbidden) and
    ``dist``, the fewest tokens from each state to an accepting one."""

    def _tabulate(self):
        self.states: list[State] = [self.start, State("done")]
        index = {s: k for k, s in enumerate(self.states)}
        edges: dict[tuple[int, int], int] = {}
        todo = deque(self.states)
        while todo:
            s = todo.popleft()
            for c in range(len(CLASSES)):
                t = self._step_or_space(s, CLASSES[c])
                if t is None:
                    continue
                if t not in index:
                    index[t] = len(self.states)
                    self.states.append(t)
                    todo.append(t)
                edges[index[s], c] = index[t]
        S, C = len(self.states), len(CLASSES)
        self.index = index
        self.trans = [[edges.get((s, c), -1) for c in range(C)] for s in range(S)]
        self.dist = self._distances()
        for s, d in enumerate(self.dist):
            if d is None:
                raise AssertionError(f"grammar bug: {self.states[s]} cannot reach the end of an answer")

    def _step_or_space(self, s: State, cls: str) -> State | None:
        """``step``, with the word-boundary token (class "space") allowed once before a shape-only answer
        (state ``spaced``: the start again, without a second space) and read as text everywhere else."""
        if s.ctx == "spaced":
            return None if cls == "space" else self.step(State("start"), cls)
        if cls == "space":
            return State("spaced") if s.ctx == "start" else self.step(s, "text")
        return self.step(s, cls)

    def step(self, s: State, cls: str) -> State | None:
        raise NotImplementedError

    def accepting(self, s: int) -> bool:
        raise NotImplementedError

    def walk(self, classes) -> list[int]:
        """State indices after each class in ``classes`` from the start (for tests and debugging)."""
        out, s = [], self.index[self.start]
        for c in classes:
            t = self.trans[s][_C[c]]
            if t < 0:
                raise ValueError(f"class {c!r} is not allowed in {self.states[s]}")
            out.append(t)
            s = t
        return out

    def _distances(self) -> list[int | None]:
        """Fewest tokens from each state to an accepting one (reverse breadth-first search)."""
        S, C = len(self.states), len(CLASSES)
        dist: list[int | None] = [0 if self.accepting(s) else None for s in range(S)]
        frontier = [s for s in range(S) if dist[s] == 0]
        while frontier:
            nxt = []
            for s in range(S):
                if dist[s] is None and any(self.trans[s][c] in frontier for c in range(C) if self.trans[s][c] >= 0):
                    dist[s] = dist[frontier[0]] + 1
                    nxt.append(s)
            frontier = nxt
        return dist

    def allowed(self, budget: int | None = None) -> list[list[bool]]:
        """allowed[state][class] with ``budget`` tokens left including this one (None: no limit).

        With a budget, a class is allowed only if the state it leads to can still reach an accepting
        state within the remaining tokens; where none can, the classes that get closest are allowed.
        """
        out = []
        for s, row in enumerate(self.trans):
            ok = [t >= 0 for t in row]
            if budget is not None:
                d = [self.dist[t] if t >= 0 else None for t in row]
                fit = [o and d[c] <= budget - 1 for c, o in enumerate(ok)]
                if not any(fit):
                    best = min(x for x in d if x is not None)
                    fit = [o and d[c] == best for c, o in enumerate(ok)]
                ok = fit
            out.append(ok)
        return out


class GETokGrammar(_Automaton):
    """The automaton for one config and one answer restriction (``only``), tabulated.

    only: None (free text with any groups), "box", "point", "mask", "polyline", "shape" (exactly one
    shape of any kind) or "refinement" (exactly one ``<offset>`` block, refine mode).

    >>> g = GETokGrammar(GETokConfig(grid=4, rounds=1), only="box")
    >>> [g.states[s].ctx for s in g.walk(["<box>", "grid", "off", "grid", "off", "</box>", "eos"])]
    ['box', 'box', 'box', 'box', 'box', 'end', 'done']
    >>> g.walk(["<box>", "text"])  # free text inside a box is not allowed
    Traceback (most recent call last):
    ...
    ValueError: class 'text' is not allowed in State(ctx='box', points=0, need=0)
    """

    def __init__(self, cfg: GETokConfig, only: str | None = None):
        if only not in ONLY:
            raise ValueError(f"only must be one of {sorted(k for k in ONLY if k)} or None, got {only!r}")
        if only == "refinement" and cfg.mode != "refine":
            raise ValueError(f"only='refinement' needs a config in refine mode, got mode {cfg.mode!r}")
        self.cfg, self.only = cfg, only
        self.rounds = cfg.inline_rounds
        self.start = State("start") if only else State("text")
        self._tabulate()

    # -- the grammar, one transition at a time ------------------------------------------------------
    def _after_point(self, s: State) -> State:
        """The state once the current point is complete."""
        if s.ctx == "point":
            return State("end") if self.only else State("text")
        cap = 2 if s.ctx == "box" else 1
        return State(s.ctx, min(s.points + 1, cap), 0)

    def step(self, s: State, cls: str) -> State | None:
        """The state after a token of class ``cls`` in state ``s``; None when the grammar forbids it."""
        R, done_group = self.rounds, (State("end") if self.only else State("text"))
        if s.ctx == "done":
            return s  # generate pads finished rows; anything goes
        if s.ctx == "end":
            return State("done") if cls == "eos" else None
        if s.need:  # a point owes offsets
            return (State(s.ctx, s.points, s.need - 1) if s.need > 1 else self._after_point(s)) if cls == "off" else None
        if s.ctx in ("text", "start"):
            if s.ctx == "start" and cls not in ONLY[self.only]:
                return None
            if cls == "text":
                return s
            if cls == "eos":
                return State("done")
            if cls == "grid":
                return State("point", 0, R) if R else self._after_point(State("point"))
            if cls in ("<box>", "<seg>", "<pl>"):
                return State(cls[1:-1])
            if cls == "<offset>" and self.cfg.mode == "refine":
                return State("off")
            return None
        if s.ctx in TAG_KINDS:  # inside a shape group
            if cls == "grid" and (s.ctx != "box" or s.points < 2):
                return State(s.ctx, s.points, R) if R else self._after_point(s)
            if cls == TAGS[s.ctx][1] and s.points >= (2 if s.ctx == "box" else 1):
                return done_group
            return None
        if s.ctx == "off":
            if cls in ("text", "off", "delete"):
                return s  # free text, or a refined bare point
            if cls in ("<box>", "<seg>", "<pl>"):
                return State("off_" + cls[1:-1])
            if cls == "</offset>":
                return done_group
            return None
        # a refine group: one offset or <delete> per earlier point
        name = s.ctx[4:]
        cap = 2 if name == "box" else 1
        if cls in ("off", "delete") and (name != "box" or s.points < 2):
            return State(s.ctx, min(s.points + 1, cap))
        if cls == TAGS[name][1] and s.points >= cap:
            return State("off")
        return None

    def accepting(self, s: int) -> bool:
        """May the output stop here (EOS written, or a budget cut) and still parse without errors?"""
        return self.states[s].ctx in ("text", "end", "done")


class BinsGrammar(_Automaton):
    """1D location tokens (formats.BinsFormat): runs of adjacent ``loc`` tokens, 2 a point and 4 a box, in free text
    (``only`` None), or exactly one shape then EOS (``only`` "box": 4 tokens, "point": 2, "shape": either).
    State ``run`` with ``points`` = the tokens of the run so far.

    >>> g = BinsGrammar(BinsFormat(bins=8), only="box")
    >>> [g.states[s].points for s in g.walk(["loc", "loc", "loc", "loc"])], g.walk(["loc"] * 4 + ["eos"])[-1] == 1
    ([1, 2, 3, 4], True)
    >>> g.walk(["loc", "loc", "eos"])  # a point is not a box
    Traceback (most recent call last):
    ...
    ValueError: class 'eos' is not allowed in State(ctx='run', points=2, need=0)
    """

    RUNS = {None: (2, 4), "shape": (2, 4), "box": (4,), "point": (2,)}

    def __init__(self, fmt: BinsFormat, only: str | None = None):
        if only not in self.RUNS:
            raise ValueError(f"the bins format writes boxes and points only: only must be one of "
                             f"{sorted(k for k in self.RUNS if k)} or None, got {only!r}")
        self.cfg, self.only = fmt, only
        self.complete = self.RUNS[only]
        self.start = State("start") if only else State("text")
        self._tabulate()

    def step(self, s: State, cls: str) -> State | None:
        if s.ctx == "done":
            return s  # generate pads finished rows; anything goes
        n = s.points if s.ctx == "run" else 0
        if cls == "loc":
            return State("run", n + 1) if n < max(self.complete) else None
        if s.ctx == "start" or (s.ctx == "run" and n not in self.complete):
            return None  # an answer that must be a shape, or a run that is no shape yet
        if cls == "eos":
            return State("done")
        return State("text") if cls == "text" and not self.only else None

    def accepting(self, s: int) -> bool:
        st = self.states[s]
        return st.ctx in ("text", "done") or (st.ctx == "run" and st.points in self.complete)


def grammar_for(fmt: LocationFormat, only: str | None = None) -> _Automaton:
    """The automaton of a format that adds tokens: GETok's or the bins'; text coordinates are not constrained."""
    if isinstance(fmt, GETokConfig):
        return GETokGrammar(fmt, only)
    if isinstance(fmt, BinsFormat):
        return BinsGrammar(fmt, only)
    raise ValueError(f"the {format_name(fmt)} format adds no tokens: there is no grammar to constrain it with")


def getok_token_ids(tokenizer, cfg: LocationFormat) -> dict[str, int]:
    """Map every token of the location format ``cfg`` (GETok's; the bins'; none for text) to its id in
    ``tokenizer``; ValueError if one is missing or two share an id."""
    tokens = cfg.tokens()
    if not tokens:
        return {}
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in zip(tokens, ids) if i is None or i == unk]
    what = "GETok" if isinstance(cfg, GETokConfig) else f"{format_name(cfg)} location"
    if missing:
        raise ValueError(
            f"the tokenizer lacks {len(missing)} of the {len(tokens)} {what} tokens (first: {missing[0]!r}); "
            "add them with llava_getok.register() or load a checkpoint trained with them"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"two {what} tokens share one id in this tokenizer")
    return dict(zip(tokens, ids))


def space_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's bare word-boundary tokens (:data:`SPACE_PIECES`)."""
    ids = tokenizer.convert_tokens_to_ids(list(SPACE_PIECES))  # cheap: no whole-vocabulary dict per call
    unk = getattr(tokenizer, "unk_token_id", None)
    return [i for i in ids if i is not None and i != unk]


def token_class_names(cfg: LocationFormat) -> dict[str, str]:
    """Each token of a format -> its class in :data:`CLASSES`."""
    if isinstance(cfg, BinsFormat):
        return dict.fromkeys(cfg.tokens(), "loc")
    cls = {t: "grid" for t in cfg.grid_tokens} | {t: "off" for t in cfg.offset_tokens} | {DELETE: "delete"}
    return cls | {tag: tag for pair in TAGS.values() for tag in pair}


class GETokLogitsProcessor(LogitsProcessor):
    """Mask the logits so that generation follows the GETok grammar (or, for a ``formats.BinsFormat``, the bins'
    grammar :class:`BinsGrammar`); one automaton state per batch row.

    token_ids: location token -> id (see :func:`getok_token_ids`); eos_token_id: int or list of ints;
    text_vocab_size: len(tokenizer) (ids at or beyond it, e.g. a padded LM head, are never allowed);
    never_ids: further ids never allowed (BOS by default via :meth:`from_tokenizer`);
    only: see :class:`GETokGrammar` and :class:`BinsGrammar`; max_new_tokens: the generation budget, so that an answer cut by it
    still parses.

    A processor instance follows one ``generate`` call at a time: call :meth:`reset` before reusing it (reuse
    saves building its tables, which costs more than many steps), or make one per call.
    It also restarts by itself when a call looks new (another batch size, or a sequence that did not grow by
    exactly one token), which catches reuse unless a new prompt happens to be one token longer.
    """

    def __init__(self, token_ids: dict[str, int], cfg: LocationFormat, eos_token_id, text_vocab_size: int,
                 never_ids=(), only: str | None = None, max_new_tokens: int | None = None, space_ids=()):
        self.cfg = cfg
        self.grammar = grammar_for(cfg, only)
        self.max_new_tokens = max_new_tokens
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if not eos:
            raise ValueError("eos_token_id is required: the grammar decides where an answer may end")
        cls = token_class_names(cfg)
        missing = [t for t in cfg.tokens() if t not in token_ids]
        if missing:
            raise ValueError(f"token_ids lacks {len(missing)} location token(s), first {missing[0]!r}")
        self._classes = {"text_vocab_size": text_vocab_size, "eos": eos, "never": list(never_ids),
                         "space": list(space_ids),
                         "getok": [(token_ids[t], _C[cls[t]]) for t in cfg.tokens()]}
        # Host-side tables; device tensors are made on first use (and per vocabulary width).
        self._trans = torch.tensor(self.grammar.trans, dtype=torch.long)
        self._trans[self._trans < 0] = self.grammar.index[State("done")]  # misuse (beams): stop constraining
        levels = [self.grammar.allowed(None)]
        if max_new_tokens is not None:  # level b: b tokens left; beyond the longest forced path: no limit
            top = max(self.grammar.dist) + 1
            levels = [self.grammar.allowed(b) for b in range(1, top + 1)] + levels
        self._allowed = torch.tensor(levels, dtype=torch.bool)  # (levels, states, classes)
        self._dev = None
        self._rows = None
        self._state = None
        self._prompt_len = 0
        self._last_len = -1

    @classmethod
    def from_tokenizer(cls, tokenizer, cfg: LocationFormat, eos_token_id=None, **kwargs):
        """Build from a tokenizer holding the format's tokens (ids from :func:`getok_token_ids`)."""
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        never = kwargs.pop("never_ids", [i for i in (tokenizer.bos_token_id,) if i is not None])
        kwargs.setdefault("space_ids", space_token_ids(tokenizer))
        return cls(getok_token_ids(tokenizer, cfg), cfg, eos, len(tokenizer), never_ids=never, **kwargs)

    def token_classes(self, vocab_size: int) -> torch.Tensor:
        """Class index of every id in a vocabulary of ``vocab_size`` (the width of the scores)."""
        c = self._classes
        out = torch.full((vocab_size,), _C["text"], dtype=torch.long)
        out[min(c["text_vocab_size"], vocab_size):] = _C["never"]
        for ids, k in ((c["space"], _C["space"]), (c["never"], _C["never"]), (c["eos"], _C["eos"])):
            ids = [i for i in ids if i < vocab_size]
            out[ids] = k
        ids, ks = zip(*c["getok"])
        if max(ids) >= vocab_size:
            raise ValueError(f"location token id {max(ids)} is outside the model's vocabulary of {vocab_size}")
        out[list(ids)] = torch.tensor(ks)
        return out

    def _to(self, device, vocab_size, dtype):
        if self._dev != (device, vocab_size, dtype):
            self._dev = (device, vocab_size, dtype)
            self._cls = self.token_classes(vocab_size).to(device)
            self._trans_d = self._trans.to(device)
            self._bias = {}

    def _level_bias(self, level: int, dtype) -> torch.Tensor:
        """(states, vocab) additive bias, 0 where allowed and -inf elsewhere, made on first use of a level.
        Adding rows of it is several times faster than gathering classes or ``masked_fill`` per step."""
        if level not in self._bias:
            per_class = torch.zeros(self._allowed[level].shape, dtype=dtype).masked_fill_(~self._allowed[level], float("-inf"))
            self._bias[level] = per_class.to(self._cls.device).index_select(1, self._cls)
        return self._bias[level]

    def reset(self):
        self._rows, self._state, self._last_len = None, None, -1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._to(scores.device, scores.shape[-1], scores.dtype)
        rows, length = input_ids.shape
        if rows != self._rows or length != self._last_len + 1:  # a new generate call: the prompt ends here
            self._rows, self._prompt_len = rows, length
            self._state = torch.full((rows,), self.grammar.index[self.grammar.start], dtype=torch.long,
                                     device=scores.device)
        else:  # advance every row by the token it just wrote
            self._state = self._trans_d[self._state, self._cls[input_ids[:, -1]]]
        self._last_len = length
        level = len(self._allowed) - 1  # no budget limit
        if self.max_new_tokens is not None:
            left = self.max_new_tokens - (length - self._prompt_len)
            level = min(max(left, 1) - 1, level)
        return scores + self._level_bias(level, scores.dtype).index_select(0, self._state)


def refinement_classes(shapes) -> list[tuple[str, ...]]:
    """The token classes, position by position, of the one refinement that fits ``shapes`` (the first
    answer, spec section 5): ``<offset>``, per shape its tag and one offset or ``<delete>`` per point,
    ``</offset>``, EOS.

    >>> from llava_getok.codec import Shape
    >>> refinement_classes([Shape("box", ((0.1, 0.1), (0.5, 0.5)))])
    [('<offset>',), ('<box>',), ('off', 'delete'), ('off', 'delete'), ('</box>',), ('</offset>',), ('eos',)]
    """
    out = [("<offset>",)]
    for s in shapes:
        open_, close = TAGS[KIND_TAGS[s.kind]] if s.kind in KIND_TAGS else (None, None)
        out += [(open_,)] if open_ else []
        out += [("off", "delete")] * len(s.points)
        out += [(close,)] if close else []
    return out + [("</offset>",), ("eos",)]


class RefinementLogitsProcessor(GETokLogitsProcessor):
    """Refine mode's second answer, made to fit each row's first answer exactly: row r may only write
    ``refinement_classes(first_shapes[r])``, one position per step (then anything: generate pads it).
    So every refinement applies (``codec.apply_refinement``) without a structure mismatch."""

    def __init__(self, token_ids, cfg: GETokConfig, eos_token_id, text_vocab_size: int, first_shapes,
                 never_ids=(), space_ids=()):
        super().__init__(token_ids, cfg, eos_token_id, text_vocab_size, never_ids, space_ids=space_ids)
        plans = [refinement_classes(shapes) for shapes in first_shapes]
        width = max(map(len, plans)) + 1
        table = torch.ones(len(plans), width, len(CLASSES), dtype=torch.bool)  # past the end: anything
        for r, plan in enumerate(plans):
            for k, allowed in enumerate(plan):
                table[r, k] = False
                table[r, k, [_C[c] for c in allowed]] = True
        self._plan = table
        self._spaced = torch.zeros(len(plans), dtype=torch.long)
        self.max_new_tokens = width  # the longest plan and a leading space: pass it to generate as max_new_tokens

    @classmethod
    def from_tokenizer(cls, tokenizer, cfg: GETokConfig, first_shapes, eos_token_id=None):
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        never = [i for i in (tokenizer.bos_token_id,) if i is not None]
        return cls(getok_token_ids(tokenizer, cfg), cfg, eos, len(tokenizer), first_shapes, never_ids=never,
                   space_ids=space_token_ids(tokenizer))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._to(scores.device, scores.shape[-1], scores.dtype)
        rows, length = input_ids.shape
        if rows != self._plan.shape[0]:
            raise ValueError(f"{rows} rows to generate, but first answers for {self._plan.shape[0]}")
        if rows != self._rows or length != self._last_len + 1:
            self._rows, self._prompt_len = rows, length
        self._last_len = length
        step = length - self._prompt_len
        if step == 0:  # a row may first write the word-boundary token training put before the answer (once)
            self._spaced = torch.zeros(rows, dtype=torch.long)
        elif step == 1:
            self._spaced = (self._cls[input_ids[:, -1]] == _C["space"]).long().cpu()
        pos = (step - self._spaced).clamp(max=self._plan.shape[1] - 1)
        plan = self._plan[torch.arange(rows), pos]  # (rows, classes)
        if step == 0:
            plan[:, _C["space"]] = True
        allowed = plan.to(scores.device)[:, self._cls]  # (rows, vocab)
        return scores.masked_fill(~allowed, float("-inf"))

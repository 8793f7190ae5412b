"""The grammar of answers with location tokens, as a finite automaton over token classes (spec sections 4, 5 and 8):
what :mod:`llava_getok.parse` reads, :mod:`llava_getok.codec` writes, and constrained decoding
(:mod:`llava_getok.generation`) enforces. Torch-free.

GETok, with R = cfg.inline_rounds:

    answer  := (TEXT | group | refine)* EOS
    point   := GRID OFF{R}
    group   := <box> point point </box> | <pl> point+ </pl> | <seg> point+ </seg> | point
    refine  := <offset> (TEXT | rgroup)* </offset>       (refine mode only)
    rgroup  := the same groups with OFF | <delete> in place of each point

Inside a group nothing but its points and its closing tag may follow (no free text, no EOS). A shape-only answer
may start with the tokenizer's bare word-boundary token, once (spec section 8). The bins format
(formats.BinsFormat): a run of 2 adjacent location tokens is a point, of 4 a box.

Each grammar is tabulated once (:class:`GETokGrammar`, :class:`BinsGrammar`): its reachable states, the transition
table over :data:`CLASSES` and, for every state, the fewest tokens to a complete answer, so that an answer cut by a
token budget can still be closed in time.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from .formats import BinsFormat, LocationFormat, format_name
from .vocab import DELETE, KIND_TAGS, TAG_KINDS, TAG_TOKENS, TAGS, GETokConfig

# Token classes. NEVER: ids the model may never write (BOS, ids beyond the tokenizer in a padded head).
CLASSES = ("text", "eos", "grid", "off", "delete", *TAG_TOKENS, "never", "loc", "space")
# A bare word boundary ("▁" in SentencePiece, "Ġ" in byte-level BPE): LLaVA's templates put a space between the
# assistant's role and its reply, and a tokenizer that splits added tokens off writes it as this token before an
# answer that starts with a location token. A shape-only answer may start with it (once), as in training;
# elsewhere it is text.
SPACE_PIECES = ("▁", "Ġ")
CLASS_INDEX = {c: k for k, c in enumerate(CLASSES)}
OPENS = {TAGS[tag][0]: tag for tag in TAG_KINDS}  # the opening tag of each shape group -> its tag name
REFINE_OPEN, REFINE_CLOSE = TAGS["offset"]
ONLY = {  # answer restrictions -> the ways an answer may start
    None: None,
    **{kind: (TAGS[tag][0],) for kind, tag in KIND_TAGS.items()},  # box, polyline, mask: their opening tag
    "point": ("grid",),
    "shape": (*OPENS, "grid"),
    "refinement": (REFINE_OPEN,),
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
            t = self.trans[s][CLASS_INDEX[c]]
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
            if cls in OPENS:
                return State(OPENS[cls])
            if cls == REFINE_OPEN and self.cfg.mode == "refine":
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
            if cls in OPENS:
                return State("off_" + OPENS[cls])
            if cls == REFINE_CLOSE:
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


def token_class_names(cfg: LocationFormat) -> dict[str, str]:
    """Each token of a format -> its class in :data:`CLASSES`."""
    if isinstance(cfg, BinsFormat):
        return dict.fromkeys(cfg.tokens(), "loc")
    cls = {t: "grid" for t in cfg.grid_tokens} | {t: "off" for t in cfg.offset_tokens} | {DELETE: "delete"}
    return cls | {tag: tag for pair in TAGS.values() for tag in pair}


def refinement_classes(shapes) -> list[tuple[str, ...]]:
    """The token classes, position by position, of the one refinement that fits ``shapes`` (the first
    answer, spec section 5): ``<offset>``, per shape its tag and one offset or ``<delete>`` per point,
    ``</offset>``, EOS.

    >>> from llava_getok.codec import Shape
    >>> refinement_classes([Shape("box", ((0.1, 0.1), (0.5, 0.5)))])
    [('<offset>',), ('<box>',), ('off', 'delete'), ('off', 'delete'), ('</box>',), ('</offset>',), ('eos',)]
    """
    out = [(REFINE_OPEN,)]
    for s in shapes:
        open_, close = TAGS[KIND_TAGS[s.kind]] if s.kind in KIND_TAGS else (None, None)
        out += [(open_,)] if open_ else []
        out += [("off", "delete")] * len(s.points)
        out += [(close,)] if close else []
    return out + [(REFINE_CLOSE,), ("eos",)]

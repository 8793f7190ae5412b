"""Grammar-constrained decoding: a transformers ``LogitsProcessor`` that only lets the model write answers the
location format's grammar accepts (:mod:`llava_getok.grammar`: GETok's, or the bins'), so that every answer parses.

How it stays cheap: every vocabulary id is mapped to its token class once; the grammar's automaton is tabulated
once as a transition table and, per state, an additive bias over the vocabulary (0 or -inf). Each step then costs
one table lookup per row for the new state and one row gather + add on the device, with the state of every batch
row updated from the one token that was just generated (no re-scan of the sequence, no host sync).

``max_new_tokens`` (optional) makes the output parse even when the budget runs out: when only just enough tokens
are left, the processor allows only the tokens that close the open group in time.

Limitation: the state follows each row's own last token, so use it with greedy search or sampling (``num_beams=1``,
no assisted decoding): beam search reorders rows between steps, and assisted decoding checks several tokens per
call.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .formats import LocationFormat, format_name
from .grammar import CLASS_INDEX, CLASSES, SPACE_PIECES, State, grammar_for, refinement_classes, token_class_names
from .vocab import GETokConfig

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
                         "getok": [(token_ids[t], CLASS_INDEX[cls[t]]) for t in cfg.tokens()]}
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
        out = torch.full((vocab_size,), CLASS_INDEX["text"], dtype=torch.long)
        out[min(c["text_vocab_size"], vocab_size):] = CLASS_INDEX["never"]
        for ids, k in ((c["space"], CLASS_INDEX["space"]), (c["never"], CLASS_INDEX["never"]), (c["eos"], CLASS_INDEX["eos"])):
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
                table[r, k, [CLASS_INDEX[c] for c in allowed]] = True
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
            self._spaced = (self._cls[input_ids[:, -1]] == CLASS_INDEX["space"]).long().cpu()
        pos = (step - self._spaced).clamp(max=self._plan.shape[1] - 1)
        plan = self._plan[torch.arange(rows), pos]  # (rows, classes)
        if step == 0:
            plan[:, CLASS_INDEX["space"]] = True
        allowed = plan.to(scores.device)[:, self._cls]  # (rows, vocab)
        return scores.masked_fill(~allowed, float("-inf"))

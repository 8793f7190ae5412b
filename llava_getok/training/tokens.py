"""GETok tokens in the tokenizer and the embedding matrices (spec section 2; docs/pitfalls.md "New tokens").

- :func:`add_getok_tokens`: every GETok token becomes an added token that is content, not control (not special:
  ``decode(..., skip_special_tokens=True)``, which LLaVA's serve code, trl and serving engines use, keeps it), never
  normalised or stripped, so it is exactly one id in any context, with the ids the special tokens of earlier
  versions had; :func:`check_token_ids` proves it. :func:`location_tokens_as_content` turns the special location
  tokens of a tokenizer saved by an earlier version into such tokens, ids unchanged.
- :func:`use_non_legacy`: a slow LLaMA tokenizer that loaded with ``legacy=True`` (a ``tokenizer_config.json``
  without ``"legacy": false``) is switched to ``legacy=False`` in place, once, with one line saying so.
- :func:`resize_embeddings`: resize to an explicit size (never shrink), keep ``config.vocab_size`` right.
- :func:`init_getok_rows`: ``mean`` (what LLaVA does for its own new tokens) or ``sincos2d`` (the mean plus a
  fixed 2D sinusoidal code of the cell's position, scaled to the spread of the existing rows; for the bins format a
  1D code of the bin centre), for the input embeddings and the LM head alike (LLaMA does not tie them). Works under
  ZeRO-3 (gathers the matrices).

Every function takes a location format (:mod:`llava_getok.formats`): GETok's config, or the bins' (its ``<loc_k>``
tokens go through the same hooks); the text format adds no token, so there is nothing to add, check or initialise.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys

import torch

from ..formats import BinsFormat, LocationFormat
from ..patching import model_patches
from ..vocab import DELETE, TAG_TOKENS, GETokConfig

INITS = ("mean", "sincos2d")
# Contexts a GETok token must survive as one id: start of text, after a space, after a word, at the start
# of a turn (after the role and colon), after a newline, right after another GETok token.
CONTEXTS = ("{t}", " {t}", "a {t} b", "{t} b", "ASSISTANT: {t}", "USER: x\n{t}", "{t}{t}", "x{t}y")


class _DropLegacyNotice(logging.Filter):
    """transformers' "You are using the default legacy behaviour" notice: GETok switches such a tokenizer to
    legacy=False wherever it uses one (:func:`use_non_legacy`) and says so itself."""

    def filter(self, record):
        return not record.getMessage().startswith("You are using the default legacy behaviour")


logging.getLogger("transformers.models.llama.tokenization_llama").addFilter(_DropLegacyNotice())


def use_non_legacy(tokenizer, where: str | None = None) -> bool:
    """Switch a slow sentencepiece tokenizer (LlamaTokenizer and kin) that loaded with ``legacy=True`` to
    ``legacy=False`` in place, exactly as loading it with ``legacy=False`` would; True if it switched.

    A LLaMA tokenizer folder whose ``tokenizer_config.json`` lacks ``"legacy": false`` loads as legacy, and the
    legacy tokenizer puts stray '▁' pieces around added special tokens (transformers#25073): GETok answers
    would not tokenize as written. LLaVA splits prompts at ``<image>`` before tokenizing and its
    ``preprocess_v1`` handles both flags, so nothing else changes. ``save_pretrained`` then writes
    ``"legacy": false``: a checkpoint reloads as it was trained. Prints one line when it switches."""
    if getattr(tokenizer, "legacy", None) is not True or not hasattr(tokenizer, "get_spm_processor"):
        return False
    tokenizer.legacy = False
    tokenizer.sp_model = tokenizer.get_spm_processor()  # legacy=False: no sentencepiece dummy prefix
    tokenizer.init_kwargs["legacy"] = False
    name = where or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    print(f"GETok: tokenizer {name} loads with legacy=True (its tokenizer_config.json does not say "
          f"\"legacy\": false); "
          f"using it with legacy=False, so every GETok token stays one id", file=sys.stderr, flush=True)
    return True


def add_getok_tokens(tokenizer, cfg: LocationFormat) -> list[int]:
    """Add every token of ``cfg`` as content (:func:`location_tokens_as_content`); return their ids in
    ``cfg.tokens()`` order. Tokens already present keep their ids (idempotent); special ones, as earlier versions
    added them, become content. A legacy slow tokenizer is switched to ``legacy=False`` first
    (:func:`use_non_legacy`)."""
    use_non_legacy(tokenizer)
    tokens = cfg.tokens()
    if not tokens:
        return []
    vocab = tokenizer.get_vocab()  # once: a slow tokenizer builds it anew on every call (32k pieces: ~60 ms)
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens([_content_token(t) for t in new])
    location_tokens_as_content(tokenizer, cfg)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} did not add {tokens[ids.index(tokenizer.unk_token_id)]!r}")
    return ids


def _content_token(text: str):
    """A location token as content: not special (decoders that skip special tokens keep it), never normalised
    (no normaliser may rewrite it), nothing stripped around it (lstrip / rstrip would drop the '▁' pieces
    that LLaVA's templates put before an answer and so change every record's ids)."""
    from transformers import AddedToken

    return AddedToken(text, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)


def location_tokens_as_content(tokenizer, cfg: LocationFormat) -> int:
    """Make the tokens of ``cfg`` that ``tokenizer`` has content (:func:`_content_token`), their ids unchanged; return
    how many were not (special, as an earlier version added them, or normalised / stripped). A slow sentencepiece
    tokenizer then also gets :class:`_NoPieceBeforeLeadingLocation`, so every text keeps the ids it had when the
    tokens were special. Idempotent; a tokenizer without these tokens is left as it is."""
    tokens = set(cfg.tokens())
    if not tokens:
        return 0
    present = {i: t for i, t in tokenizer.added_tokens_decoder.items() if t.content in tokens}
    redo = {i: t for i, t in present.items() if t.special or t.normalized or t.lstrip or t.rstrip or t.single_word}
    listed = tokenizer.special_tokens_map_extended.get("additional_special_tokens", [])
    if any(str(t) in tokens for t in listed):
        tokenizer.additional_special_tokens = [t for t in listed if str(t) not in tokens]
    if redo and getattr(tokenizer, "is_fast", False):
        _fast_tokens_as_content(tokenizer, {t.content for t in redo.values()})
    elif redo:
        tokenizer.add_tokens([_content_token(t.content) for t in redo.values()])  # same content: same id, new flags
    if not getattr(tokenizer, "is_fast", False) and present:
        _NoPieceBeforeLeadingLocation.install(tokenizer, [t.content for t in present.values()])
    return len(redo)


def _fast_tokens_as_content(tokenizer, contents: set[str]) -> None:
    """The Rust tokenizer only ever adds to its set of special tokens: rebuild it from its JSON with these tokens
    as content (same ids, nothing else changes)."""
    import json

    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for entry in state["added_tokens"]:
        if entry["content"] in contents:
            entry.update(special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))


class _NoPieceBeforeLeadingLocation:
    """``tokenize`` of a slow sentencepiece tokenizer (``LlamaTokenizer``, ``legacy=False``) whose location tokens
    are content. Such a tokenizer puts '▁' before every text and leaves it out only when a *special* token
    follows (``LlamaTokenizer.tokenize``), so a text that starts with a location token would start with a bare
    '▁' piece: one id more than when the tokens were special, and than the fast tokenizer writes. This drops
    that piece there, and only there. A patch of the instance, listed in its ``llava_getok.patching.model_patches``
    (``save_pretrained`` does not store it; every loader of GETok checkpoints installs it again); pickles and copies
    with the tokenizer."""

    def __init__(self, tokenizer, tokens):
        self.tokenizer, self.tokens = tokenizer, frozenset(tokens)

    @classmethod
    def install(cls, tokenizer, tokens) -> None:
        current = tokenizer.__dict__.get("tokenize")
        if isinstance(current, cls):
            current.tokens = current.tokens | frozenset(tokens)
            return
        first = next(iter(tokens))
        if type(tokenizer).tokenize(tokenizer, first) == ["\u2581", first]:  # the behaviour, not a class name
            model_patches(tokenizer).replace(tokenizer, "tokenize", cls(tokenizer, tokens),
                                             why="no bare '▁' before a leading location token (llava_getok.training.tokens)")

    def __call__(self, text, **kwargs):
        pieces = type(self.tokenizer).tokenize(self.tokenizer, text, **kwargs)
        if len(pieces) > 1 and pieces[0] == "\u2581" and pieces[1] in self.tokens:
            return pieces[1:]
        return pieces


def check_token_ids(tokenizer, cfg: LocationFormat, tokens=None) -> None:
    """Raise ValueError unless every GETok token is exactly one id, in every context of :data:`CONTEXTS`,
    and no context produces two word-boundary pieces ('▁') in a row where the text has one space (the slow
    LlamaTokenizer with ``legacy=True`` does, after added tokens: transformers#25073). A text that starts with
    a space gives '▁', '▁' for every word with sentencepiece's dummy prefix; that one is not a GETok issue.
    Then that every token is content: a text that starts with it is that one id, and decoding it with
    ``skip_special_tokens=True`` keeps it (:func:`location_tokens_as_content`)."""
    ids = dict(zip(cfg.tokens(), tokenizer.convert_tokens_to_ids(list(cfg.tokens()))))
    probe = tokens if tokens is not None else _probe_tokens(cfg)
    for t in probe:
        for ctx in CONTEXTS:
            text = ctx.format(t=t)
            got = tokenizer(text, add_special_tokens=False).input_ids
            pieces = tokenizer.convert_ids_to_tokens(got)
            if got.count(ids[t]) != text.count(t):
                raise ValueError(f"GETok token {t!r} is not one id in {text!r}: pieces {pieces}")
            start = 1 if text.startswith(" ") else 0
            for a, b in zip(pieces[start:], pieces[start + 1 :]):
                if a == "\u2581" and b.startswith("\u2581") and "  " not in text:
                    legacy = getattr(tokenizer, "legacy", None)
                    raise ValueError(
                        f"stray '\u2581' piece around GETok token {t!r} in {text!r}: {pieces} (tokenizer legacy="
                        f"{legacy}); load the tokenizer with legacy=False (transformers#25073)")
    for t in probe:
        alone = tokenizer.convert_ids_to_tokens(tokenizer(t, add_special_tokens=False).input_ids)
        if alone != [t]:
            raise ValueError(f"a text that starts with GETok token {t!r} tokenizes as {alone}, not as that one token")
        kept = tokenizer.decode([ids[t]], skip_special_tokens=True)
        if kept != t:
            raise ValueError(f"GETok token {t!r} is a special token: decoding it with skip_special_tokens=True gives "
                             f"{kept!r}; add it as content (llava_getok.llava.tokens.location_tokens_as_content)")


def _probe_tokens(cfg: LocationFormat) -> list[str]:
    """A few tokens of each kind; all of them share one code path in the tokenizer."""
    if not isinstance(cfg, GETokConfig):
        t = cfg.tokens()
        return [t[0], t[len(t) // 2], t[-1]] if t else []
    n = cfg.grid
    return [cfg.grid_token(0, 0), cfg.grid_token(n - 1, n - 1), cfg.grid_token(n // 2, 0), *cfg.offset_tokens[:2],
            DELETE, *TAG_TOKENS]


def resize_embeddings(model, size: int) -> int:
    """Resize input and output embeddings to ``size`` rows (never fewer than now); return the old row count."""
    old = model.get_input_embeddings().weight.shape[0]
    if _zero3_rows(model.get_input_embeddings().weight) is not None:
        old = _zero3_rows(model.get_input_embeddings().weight)
    if size < old:
        raise ValueError(f"refusing to shrink the vocabulary from {old} to {size} rows")
    if size != old:
        # mean_resizing=False: the new rows are initialised by init_getok_rows, not by transformers.
        model.resize_token_embeddings(size, mean_resizing=False)
    model.config.get_text_config().vocab_size = size  # a vision-language config keeps it in its text config
    return old


def _zero3_rows(weight):
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else None


@contextlib.contextmanager
def _gathered(params):
    """Full tensors of ZeRO-3 partitioned params, written back from rank 0 on exit; a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


def sincos2d_code(points: torch.Tensor, dim: int) -> torch.Tensor:
    """2D sinusoidal code (transformer style, half the channels for x, half for y) of points (N, 2) in
    [0, 1]^2 or direction vectors in [-1, 1]^2; rows are scaled to unit RMS.

    >>> c = sincos2d_code(torch.tensor([[0.1, 0.2], [0.1, 0.2], [0.9, 0.9]]), 8)
    >>> c.shape, bool(torch.equal(c[0], c[1])), round(float(c[2].pow(2).mean()), 4)
    (torch.Size([3, 8]), True, 1.0)
    """
    return sincos_code(points, dim)


def sincos_code(points: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal code of points (N, D) (D axes, the channels shared out equally: sine and cosine per frequency and
    axis); rows scaled to unit RMS. D = 2 is :func:`sincos2d_code`; D = 1 codes a bin centre (bins format).

    >>> c = sincos_code(torch.tensor([[0.1], [0.11], [0.9]]), 8)
    >>> c.shape, bool((c[0] - c[1]).norm() < (c[0] - c[2]).norm())
    (torch.Size([3, 8]), True)
    """
    axes = points.shape[1]
    count = max(dim // (2 * axes), 1)
    # Wavelengths from 1/4 of the frame down to a small fraction of a cell: neighbours get close codes.
    freqs = 2 * math.pi * torch.logspace(0, math.log10(max(dim, 2) * 2.0), count, dtype=torch.float64) / 4
    parts = []
    for axis in range(axes):
        angle = points[:, axis : axis + 1].double() * freqs
        parts += [angle.sin(), angle.cos()]
    code = torch.cat(parts, dim=1)
    code = torch.nn.functional.pad(code, (0, dim - code.shape[1])) if code.shape[1] < dim else code[:, :dim]
    return (code / code.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)).float()


def getok_row_targets(cfg: LocationFormat, init: str, mean: torch.Tensor, spread: float) -> torch.Tensor:
    """Initial rows (len(cfg.tokens()), dim) for one matrix from the mean row and the spread of old rows: the mean,
    plus with ``sincos2d`` the spread times a sinusoidal code of each token's position (GETok: 2D, of the cell's
    anchor and of the offset's direction; bins: 1D, of the bin centre)."""
    if init not in INITS:
        raise ValueError(f"embedding init must be one of {INITS}, got {init!r}")
    dim = mean.shape[-1]
    rows = mean.reshape(1, dim).repeat(len(cfg.tokens()), 1).float()
    if init == "sincos2d" and isinstance(cfg, BinsFormat):
        centres = torch.from_numpy(cfg.centres(range(cfg.bins))).float()[:, None]
        rows += spread * sincos_code(centres, dim)
    elif init == "sincos2d":
        n, h = cfg.grid, max(cfg.half, 1)
        cells = torch.from_numpy(cfg.grid_anchors).float()
        dirs = torch.tensor([[dx / h, dy / h] for dx, dy in cfg.offset_values], dtype=torch.float32)
        rows[: n * n] += spread * sincos2d_code(cells, dim)
        rows[n * n : n * n + len(dirs)] += spread * sincos2d_code(dirs, dim)
    return rows


def init_getok_rows(model, ids: list[int], cfg: LocationFormat, init: str = "sincos2d", n_old: int | None = None) -> None:
    """Initialise the GETok rows of the input embeddings and the LM head from the rows before ``n_old``
    (default: every row that is not a GETok row)."""
    matrices = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    with _gathered(matrices), torch.no_grad():
        for w in matrices:
            keep = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
            keep[torch.tensor(ids, device=w.device)] = False
            if n_old is not None:
                keep[n_old:] = False
            old = w[keep].float()
            mean = old.mean(0)
            spread = float(old.std(0).mean()) if len(old) > 1 else 0.0
            w[torch.tensor(ids, device=w.device)] = getok_row_targets(cfg, init, mean, spread).to(w.dtype).to(w.device)

"""Text (or token ids) with GETok tokens -> typed shapes in order (spec section 8).

Never raises, whatever the text: each problem becomes a :class:`ParseError` with its character
position, and the offending group is dropped. The grammar is :mod:`llava_getok.grammar`'s, the one
:mod:`llava_getok.codec` writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .codec import Refinement, Shape, dequantize
from .vocab import TAG_KINDS, TAGS, TOKEN_RE, GETokConfig

_OPEN = {TAGS[k][0]: k for k in TAGS}
_CLOSE = {TAGS[k][1]: k for k in TAGS}


@dataclass(frozen=True)
class ParseError:
    position: int  # character offset in the text (token index when parsing ids)
    message: str


@dataclass
class ParseResult:
    shapes: list[Shape] = field(default_factory=list)
    refinements: list[Refinement] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def boxes(self):
        return [s.box for s in self.shapes if s.kind == "box"]


def lex(text: str):
    """Yield (position, token, match) for every GETok token in ``text``; free text is skipped. A token's indices
    are ASCII digits: ``<grid_１_２>`` (fullwidth digits, which ``\\d`` also matches) is free text, as the tokenizer
    sees it (no such token exists)."""
    for m in TOKEN_RE.finditer(text):
        if m.group(0).isascii():
            yield m.start(), m.group(0), m


def lex_ids(ids, id_to_token: dict[int, str]):
    """Yield (index, token, match) for every GETok token id in ``ids`` (strict: text that merely looks
    like a token does not count)."""
    for k, t in enumerate(ids):
        tok = id_to_token.get(int(t))
        if tok is not None:
            yield k, tok, TOKEN_RE.fullmatch(tok)


def parse(text: str, cfg: GETokConfig) -> ParseResult:
    """Parse generated text.

    >>> cfg = GETokConfig(grid=4, mode="grid")
    >>> r = parse("the cat <box><grid_0_0><grid_2_3></box> and <box><grid_1_1></box>", cfg)
    >>> [s.points for s in r.shapes], [e.message for e in r.errors]
    ([((0.125, 0.125), (0.625, 0.875))], ['box at 44 has 1 point(s), expected 2'])
    """
    return parse_tokens(lex(text), cfg)


def parse_ids(ids, id_to_token: dict[int, str], cfg: GETokConfig) -> ParseResult:
    """Parse generated token ids; ``id_to_token`` maps the GETok ids only (see ``GETokConfig.tokens``)."""
    return parse_tokens(lex_ids(ids, id_to_token), cfg)


# More digits than this cannot be an index of any grid or offset alphabet; int() of more than 4300 digits would
# raise (Python's limit), so longer numbers are read as "out of range" without converting them.
_MAX_DIGITS = 9


def _int(digits: str) -> int | None:
    """The value of an index token's digits ("-3", "12"), or None when it has more than _MAX_DIGITS digits."""
    return int(digits) if len(digits.lstrip("-")) <= _MAX_DIGITS else None


def _quote(tok: str) -> str:
    """A token as error messages show it: cut short, so that a hostile 5000-digit token keeps messages short."""
    return tok if len(tok) <= 40 else tok[:37] + "..."


def parse_tokens(tokens, cfg: GETokConfig) -> ParseResult:
    rounds = cfg.inline_rounds
    n, h = cfg.grid, cfg.half
    res = ParseResult()
    group = None  # (tag name, start position, items) while inside a group
    in_offset = None  # start position of an open <offset> block
    point = None  # [position, cell, offsets] of the point being read
    broken = False  # the current group already has an error: skip to its end

    def err(pos, msg):
        res.errors.append(ParseError(pos, msg))

    def finish_point():
        nonlocal point, broken
        if point is None:
            return None
        pos, cell, offs, _ = point
        point = None
        if len(offs) != rounds:
            err(pos, f"point at {pos} has {len(offs)} offset token(s), expected {rounds}")
            broken = True
            return None
        return dequantize([cell], [offs], cfg)[0]

    def emit(kind, items, start, end):
        if kind == "box" and len(items) != 2:
            err(start, f"box at {start} has {len(items)} point(s), expected 2")
            return
        if not items:
            err(start, f"{kind} at {start} has no points")
            return
        if in_offset is not None:
            res.refinements.append(Refinement(kind, tuple(items), (start, end)))
            return
        pts = [(float(x), float(y)) for x, y in items]
        if kind == "box":
            (x1, y1), (x2, y2) = pts
            pts = [(min(x1, x2), min(y1, y2)), (max(x1, x2), max(y1, y2))]
        res.shapes.append(Shape(kind, tuple(pts), (start, end)))

    def close_bare_point(pos):
        # a point outside any group ends at the next non-offset token
        nonlocal broken
        if group is None and point is not None:
            start, end_ = point[0], point[3]
            p = finish_point()
            if p is not None:
                emit("point", [p], start, end_)
            broken = False

    end = 0
    for pos, tok, m in tokens:
        end = pos + len(tok)
        if m is None:
            continue
        if m.group("i") is not None:  # grid token
            close_bare_point(pos)
            i, j = _int(m.group("i")), _int(m.group("j"))
            if in_offset is not None:
                err(pos, f"grid token {_quote(tok)} at {pos} inside <offset>: a refinement holds offsets only")
                broken = True
                continue
            if i is None or j is None or not (i < n and j < n):
                err(pos, f"grid token {_quote(tok)} at {pos} is outside the {n}x{n} grid")
                broken = True
                continue
            if group is not None and point is not None:
                p = finish_point()
                if p is not None:
                    group[2].append(p)
            point = [pos, (i, j), [], end]
        elif m.group("dx") is not None or m.group("delete"):
            o = None if m.group("delete") else (_int(m.group("dx")), _int(m.group("dy")))
            if o is not None and (None in o or not (abs(o[0]) <= h and abs(o[1]) <= h)):
                err(pos, f"offset {_quote(tok)} at {pos} is outside the offset alphabet (|d| <= {h})")
                broken = True
                continue
            if in_offset is not None:  # refinement: each offset/delete stands for one earlier point
                if group is None:
                    emit("point", [o], pos, end)
                else:
                    group[2].append(o)
            elif point is None or o is None:
                err(pos, f"{_quote(tok)} at {pos} has no grid token before it")
                broken = True
            else:
                point[2].append(o)
                point[3] = end
        elif tok in _OPEN:
            close_bare_point(pos)
            name = _OPEN[tok]
            if name == "offset":
                if in_offset is not None or group is not None:
                    err(pos, f"<offset> at {pos} inside another group")
                    broken = True
                in_offset = pos
                group, point, broken = None, None, False
                continue
            if group is not None:
                err(group[1], f"<{group[0]}> at {group[1]} is not closed before {tok} at {pos}")
            group, point, broken = (name, pos, []), None, False
        else:  # closing tag
            name = _CLOSE[tok]
            close_bare_point(pos)
            if name == "offset":
                if group is not None:
                    err(group[1], f"<{group[0]}> at {group[1]} is not closed before </offset>")
                    group = None
                if in_offset is None:
                    err(pos, f"</offset> at {pos} without <offset>")
                in_offset, point, broken = None, None, False
                continue
            if group is None or group[0] != name:
                err(pos, f"{tok} at {pos} does not close an open <{name}>")
                group, point, broken = None, None, False
                continue
            if point is not None:
                p = finish_point()
                if p is not None:
                    group[2].append(p)
            if not broken:
                emit(TAG_KINDS[name], group[2], group[1], end)
            group, point, broken = None, None, False
    close_bare_point(end)
    if group is not None:
        err(group[1], f"<{group[0]}> at {group[1]} is never closed")
    if in_offset is not None:
        err(in_offset, f"<offset> at {in_offset} is never closed")
    return res

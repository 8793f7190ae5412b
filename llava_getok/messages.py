"""How error messages quote bad input: short (a value cut to a few dozen characters) and on one line (control
characters escaped), whatever a corrupt or hostile file holds."""
from __future__ import annotations

import reprlib

def short(value) -> str:
    """A value of a bad input as messages quote it: its repr, cut short (long strings and lists, deep nesting),
    so that an error stays one short line whatever the input holds."""
    return _REPR.repr(value)


def one_line(text: str) -> str:
    """``text`` with every character that is not printable (newlines, form feeds, the control bytes a library's
    message may quote from a corrupt file) escaped, so that a CLI's error is exactly one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 6
_REPR.maxlevel = 3

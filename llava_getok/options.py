"""Options declared once: a dataclass field holds an option's help, type, default and choices, and every command-line
flag, its help text and what a checkpoint records are made from it.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Lattice:
...     grid: int = option(32, "n: the lattice is n x n cells")
...     offset_levels: int = option(3, "m: offset values per axis")
>>> p = argparse.ArgumentParser()
>>> add_flags(p, Lattice, dash=True)
>>> from_flags(p.parse_args(["--offset-levels", "5"]), Lattice, dash=True)
{'grid': 32, 'offset_levels': 5}
>>> q = argparse.ArgumentParser()
>>> add_flags(q, Lattice, prefix="getok_")
>>> from_flags(q.parse_args(["--getok_grid", "8"]), Lattice, prefix="getok_")
{'grid': 8, 'offset_levels': 3}
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

_NO_DEFAULT = dataclasses.MISSING


def option(default, help: str, choices=None, flag: str | None = None):
    """A dataclass field that is also a flag: ``help`` and ``choices`` for its help text and checking, ``flag`` the
    name users already type when it is not the field's (without dashes)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def same_option(cls, name: str, default=_NO_DEFAULT, help: str | None = None):
    """Field ``name`` of dataclass ``cls`` again, for a class that holds the same option: its help, choices and
    default (``default`` / ``help`` where this class's differ)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = dict(f.metadata)
    if help is not None:
        meta["help"] = help
    return dataclasses.field(default=f.default if default is _NO_DEFAULT else default, metadata=meta)


def truth(text: str) -> bool:
    """A flag's true/false value as users type it (``True``, ``false``, ``1``, ``no``)."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def flag_name(f: dataclasses.Field, prefix: str = "", dash: bool = False) -> str:
    """The flag of field ``f``: its own ``flag`` name if it has one, else ``prefix`` + the field name (dashes for
    underscores with ``dash``)."""
    if f.metadata.get("flag"):
        return "--" + f.metadata["flag"]
    name = prefix + f.name
    return "--" + (name.replace("_", "-") if dash else name)


def _base_type(hint):
    """``int | None`` -> int; a plain type stays."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _fields(cls, only):
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    return [f for f in fields if only is None or f.name in only]


def add_flags(parser, cls, prefix: str = "", dash: bool = False, only=None, defaults: dict | None = None,
              switches: bool = False) -> None:
    """A flag for every option of dataclass ``cls`` (``only`` these names, if given; a field without a default is a
    required flag); ``defaults`` overrides some defaults for this command. A boolean option is ``--flag True`` (as
    LLaVA's and transformers' flags are), or ``--flag`` / ``--no-flag`` with ``switches``."""
    hints = typing.get_type_hints(cls)
    for f in _fields(cls, only):
        kind = _base_type(hints[f.name])
        default = (defaults or {}).get(f.name, f.default)
        choices = f.metadata.get("choices")
        shown = f" (default: {default})" if default is not None and default is not _NO_DEFAULT and not choices else ""
        kwargs = dict(dest=prefix + f.name, help=f.metadata["help"] + shown)
        if default is _NO_DEFAULT:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if kind is bool and switches:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif kind is bool:
            kwargs.update(type=truth, nargs="?", const=True, metavar="true|false")
        else:
            kwargs.update(type=kind, choices=choices)
        parser.add_argument(flag_name(f, prefix, dash), **kwargs)


def from_flags(namespace, cls, prefix: str = "", dash: bool = False, only=None) -> dict:
    """{field name: value} of the options of ``cls`` in a namespace parsed with :func:`add_flags`."""
    return {f.name: getattr(namespace, prefix + f.name) for f in _fields(cls, only)}


def check_choices(obj, prefix: str = "", dash: bool = False) -> None:
    """ValueError naming the flag of the first option of dataclass instance ``obj`` whose value is not one of its
    choices (None passes: "not given")."""
    for f in _fields(type(obj), None):
        value, choices = getattr(obj, f.name), f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ValueError(f"{flag_name(f, prefix, dash)} must be one of {', '.join(choices)}, got {value!r}")


def as_flag_dataclass(cls, prefix: str, name: str):
    """A dataclass with one field ``prefix + field`` per option of ``cls`` (its type, default, help and choices), for
    transformers' ``HfArgumentParser`` beside its own argument classes; read it back with :func:`from_flags`."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in _fields(cls, None):
        meta = {k: v for k, v in f.metadata.items() if k in ("help", "choices") and v is not None}
        fields.append((prefix + f.name, hints[f.name], dataclasses.field(default=f.default, metadata=meta)))
    return dataclasses.make_dataclass(name, fields)

"""The one table of sources: name -> module path, imported only when that source is used.

A module missing from the installation (``shapes`` before its author commits it, or one whose optional
dependency is absent) shows as "not installed" in ``convert-datasets --list`` and gives a clear error when
asked for; it never breaks the other sources.
"""
from __future__ import annotations

import importlib

SOURCES = {
    "llava": "data_converters.llava",
    "coco": "data_converters.coco",
    "refcoco": "data_converters.refcoco",
    "vlm-r1": "data_converters.vlm_r1",
    "shikra": "data_converters.shikra",
    "odvg": "data_converters.odvg",
    "flickr30k": "data_converters.flickr30k",
    "vg": "data_converters.vg",
    "qwen": "data_converters.qwen",
    "kosmos2": "data_converters.kosmos2",
    "shapes": "data_converters.shapes",
}


class SourceNotInstalled(ImportError):
    pass


def load(name: str):
    """The source module called ``name``; ValueError for an unknown name (listing the known ones)."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    try:
        return importlib.import_module(SOURCES[name])
    except ModuleNotFoundError as e:
        if e.name == SOURCES[name] or (e.name and SOURCES[name].startswith(e.name + ".")):
            raise SourceNotInstalled(f"source {name!r} is not installed (module {SOURCES[name]} not found)") from None
        raise SourceNotInstalled(f"source {name!r} needs the package {e.name!r}, which is not installed") from e


def describe() -> list[tuple[str, str, str]]:
    """(name, tasks, description) for every source; "not installed" where its module cannot be imported."""
    rows = []
    for name in SOURCES:
        try:
            mod = load(name)
        except SourceNotInstalled as e:
            rows.append((name, "-", f"not installed ({e})"))
            continue
        if not all(hasattr(mod, a) for a in ("TASKS", "read", "parse")):
            rows.append((name, "-", "in progress (module lacks TASKS / read / parse: see data_converters/base.py)"))
            continue
        rows.append((name, ", ".join(mod.TASKS), getattr(mod, "FORMATS", "")))
    return rows

"""Changes to code that is not ours (LLaVA, transformers, accelerate, a model instance), made one way: each is a
:class:`Patch` that says what it changed and why and knows how to undo itself, kept in a :class:`Patches` list.

Three lifetimes, one mechanism:

- the process's patches (:data:`PROCESS`): the compat fixes LLaVA cannot run without on the current stack
  (``permanent``: ``unregister()`` reports them as staying), the builder and trainer hooks, CPU training ranks;
- a model's patches, kept on the model (the GETok row deltas' forward hooks, a trainable vision tower's forward):
  every forward needs them, ``remove()`` takes them off;
- one call's patches, in a ``with`` block (the loss capture of one training step, peft's ``save_pretrained``
  for one save): :meth:`Patches.undo` on the way out.

>>> class Owner: value = 1
>>> patches = Patches()
>>> _ = patches.replace(Owner, "value", 2, why="a test")
>>> Owner.value, [name.rsplit(".", 2)[-2:] for name in patches.names()]
(2, [['Owner', 'value']])
>>> len(patches.undo()), Owner.value
(1, 1)
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Any, Callable

_MISSING = object()


@dataclass
class Patch:
    """One change: ``name`` (what was changed, ``Owner.attribute`` or ``module: hook``), ``why``, and ``undo`` (None:
    it cannot be undone)."""

    name: str
    why: str
    undo: Callable[[], None] | None = None
    permanent: bool = False


def _label(owner) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    if isinstance(owner, types.ModuleType):
        return owner.__name__
    return f"{type(owner).__name__} instance"


def original(owner, attr: str):
    """What ``owner.attr`` was before any patch of this module replaced it (itself when never patched)."""
    value = owner.__dict__.get(attr, _MISSING) if hasattr(owner, "__dict__") else _MISSING
    value = getattr(owner, attr) if value is _MISSING else value
    func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
    while hasattr(func, "__getok_original__"):
        func = func.__getok_original__
    return func


@dataclass
class Patches:
    """An ordered list of patches; :meth:`undo` takes them off in reverse order."""

    patches: list[Patch] = field(default_factory=list)

    def replace(self, owner, attr: str, new: Any, why: str, permanent: bool = False) -> Patch:
        """Set ``owner.attr = new`` (a class, module or instance attribute); ``new`` remembers what it replaced as
        ``__getok_original__`` when it is a function. Undo restores the attribute exactly (deletes an instance
        attribute that was not there)."""
        had = owner.__dict__.get(attr, _MISSING) if hasattr(owner, "__dict__") else getattr(owner, attr, _MISSING)
        if callable(new) and not isinstance(new, type):
            try:
                new.__getok_original__ = had if had is not _MISSING else getattr(owner, attr, None)
            except (AttributeError, TypeError):  # a bound method or a builtin: nothing to mark
                pass
        setattr(owner, attr, new)

        def undo():
            if had is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, had)

        return self.add(Patch(f"{_label(owner)}.{attr}", why, undo, permanent))

    def hook(self, handle, name: str, why: str) -> Patch:
        """A torch hook handle (``module.register_forward_hook(...)``, ``tensor.register_hook(...)``) as a patch."""
        return self.add(Patch(name, why, handle.remove))

    def add(self, patch: Patch) -> Patch:
        self.patches.append(patch)
        return patch

    def names(self) -> list[str]:
        return [p.name for p in self.patches]

    def undo(self, keep_permanent: bool = False) -> list[str]:
        """Undo every patch that can be undone (not the permanent ones with ``keep_permanent``), newest first; return
        their names in the order they were made."""
        done, kept = [], []
        for p in reversed(self.patches):
            if p.undo is None or (keep_permanent and p.permanent):
                kept.append(p)
                continue
            p.undo()
            done.append(p.name)
        self.patches = kept[::-1]
        return done[::-1]

    @contextlib.contextmanager
    def applied(self):
        """Undo everything added to this list inside the block, on the way out (one call's patches)."""
        start = len(self.patches)
        try:
            yield self
        finally:
            mine, self.patches = self.patches[start:], self.patches[:start]
            for p in reversed(mine):
                p.undo()


PROCESS = Patches()  # the patches this process holds: compat fixes, builder and trainer hooks, CPU training ranks

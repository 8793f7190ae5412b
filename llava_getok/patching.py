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


@dataclass
class _Restore:
    """Undo of :meth:`Patches.replace`: an object, not a closure, so that a patched object (a tokenizer) still
    pickles and copies with its patches."""

    owner: Any
    attr: str
    had: bool
    value: Any

    def __call__(self):
        if self.had:
            setattr(self.owner, self.attr, self.value)
        else:
            delattr(self.owner, self.attr)


@dataclass
class Patches:
    """An ordered list of patches; :meth:`undo` takes them off in reverse order."""

    patches: list[Patch] = field(default_factory=list)

    def replace(self, owner, attr: str, new: Any, why: str, permanent: bool = False) -> Patch:
        """Set ``owner.attr = new`` (a class, module or instance attribute). Undo restores the attribute exactly as it
        was in ``owner``'s own namespace (an instance attribute that was not there is deleted again)."""
        had = owner.__dict__.get(attr, _MISSING) if hasattr(owner, "__dict__") else getattr(owner, attr, _MISSING)
        setattr(owner, attr, new)
        undo = _Restore(owner, attr, had is not _MISSING, None if had is _MISSING else had)
        return self.add(Patch(f"{_label(owner)}.{attr}", why, undo, permanent))

    def hook(self, handle, name: str, why: str) -> Patch:
        """A torch hook handle (``module.register_forward_hook(...)``, ``tensor.register_hook(...)``) as a patch."""
        return self.add(Patch(name, why, handle.remove))

    def add(self, patch: Patch) -> Patch:
        self.patches.append(patch)
        return patch

    def names(self, permanent: bool | None = None) -> list[str]:
        """Names of the patches held (only the permanent ones, or only the others, if ``permanent`` is given)."""
        return [p.name for p in self.patches if permanent is None or p.permanent == permanent]

    def item(self, mapping: dict, key, value, name: str, why: str) -> Patch:
        """Set ``mapping[key] = value`` (a registry of someone else's, e.g. LLaVA's template table); undo deletes it
        again, or puts back what it replaced."""
        had = mapping.get(key, _MISSING)
        mapping[key] = value

        def undo():
            if had is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = had

        return self.add(Patch(name, why, undo))

    def undo(self, keep_permanent: bool = False, where: Callable[[Patch], bool] | None = None) -> list[str]:
        """Undo every patch that can be undone (not the permanent ones with ``keep_permanent``; only those ``where``
        accepts, if given), newest first; return their names in the order they were made."""
        done, kept = [], []
        for p in reversed(self.patches):
            if p.undo is None or (keep_permanent and p.permanent) or (where is not None and not where(p)):
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


MODEL_ATTR = "_getok_patches"


def model_patches(model) -> Patches:
    """The patches kept on ``model`` (an ``nn.Module``, a tokenizer): created on first use, in its ``__dict__``,
    outside its parameters and submodules, so that saving and ``state_dict`` never see them."""
    patches = model.__dict__.get(MODEL_ATTR)
    if patches is None:
        patches = model.__dict__[MODEL_ATTR] = Patches()
    return patches

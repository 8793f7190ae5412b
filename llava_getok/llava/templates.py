"""GETok conversation templates: ``getok_<name>`` for each of LLaVA's ``conv_templates``, selectable with
LLaVA's ``--version``.

A GETok template is LLaVA's template with one sentence added to a non-empty system prompt that names the
location tokens. Separators, roles and ``version`` stay the same, because LLaVA's ``preprocess`` picks its
masking code from ``sep_style`` and ``version`` (``version.startswith("v1")``): GETok data goes through the
same, tested preprocessing as LLaVA's own.
"""
from __future__ import annotations

from ..patching import PROCESS

PREFIX = "getok_"
SYSTEM_NOTE = (
    " Locations in the image are written with grid tokens over an n x n grid of the image: a box is"
    " <box>, the top-left cell, the bottom-right cell, </box>, each cell optionally refined by offset tokens."
)


def getok_template(conv):
    """A copy of LLaVA ``Conversation`` ``conv`` with the GETok system note (none for an empty system)."""
    new = conv.copy()
    if conv.system.strip():
        new.system = conv.system + SYSTEM_NOTE
    return new


WHY = "GETok conversation template (llava_getok.llava.templates)"


def register_templates() -> list[str]:
    """Add ``getok_<name>`` to LLaVA's ``conv_templates`` for every LLaVA template that has none yet; return the names
    added."""
    from llava import conversation

    added = []
    for name, conv in list(conversation.conv_templates.items()):
        if name.startswith(PREFIX) or PREFIX + name in conversation.conv_templates:
            continue
        PROCESS.item(conversation.conv_templates, PREFIX + name, getok_template(conv),
                     f"llava.conversation.conv_templates[{PREFIX + name!r}]", why=WHY)
        added.append(PREFIX + name)
    return added


def unregister_templates() -> list[str]:
    """Remove the ``getok_*`` templates :func:`register_templates` added; return their names."""
    return [name.split("'")[1] for name in PROCESS.undo(where=lambda p: p.why == WHY)]


def resolve_template(version: str):
    """The template LLaVA's train() will use for ``--version``; ValueError for unknown names (LLaVA would
    silently fall back to vicuna_v1)."""
    from llava import conversation

    if version in ("v0", "v0.5"):  # LLaVA's train() special-cases these two names
        return conversation.conv_templates["v0"]
    if version not in conversation.conv_templates:
        names = ", ".join(sorted(conversation.conv_templates))
        raise ValueError(f"--version {version!r} is not a LLaVA conversation template; choose one of: {names}")
    return conversation.conv_templates[version]

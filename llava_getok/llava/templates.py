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


def llava_cli_template(model_path: str) -> str:
    """The conversation template LLaVA's ``llava.serve.cli`` picks from a model's folder name."""
    from llava.mm_utils import get_model_name_from_path

    name = get_model_name_from_path(str(model_path)).lower()
    for key, mode in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"), ("v1.6-34b", "chatml_direct"),
                      ("v1", "llava_v1"), ("mpt", "mpt")):
        if key in name:
            return mode
    return "llava_v0"


def pick_template(model_path: str, sidecar, conv_mode: str | None) -> str:
    """The template to talk to a checkpoint in: ``conv_mode`` when given; else the one it was trained with (its
    sidecar's ``template``); else LLaVA's cli rule. ValueError for a name LLaVA does not have."""
    mode = conv_mode or (sidecar.template if sidecar is not None else None) or llava_cli_template(model_path)
    if mode in ("v0", "v0.5"):  # LLaVA's train() maps these --version names to the v0 template
        return "v0"
    resolve_template(mode)
    return mode


def template_roles(name: str) -> tuple[str, str]:
    """(user role, assistant role) of a LLaVA template, as its prompts write them."""
    return tuple(resolve_template(name).roles)

"""LLaVA registration hooks: the only package of llava-getok that imports `llava`.

One small file per seam: ``compat`` (fixes for current transformers), ``tokens`` (tokenizer + embedding
rows), ``rows`` (GETok-only trainable rows), ``templates`` (``getok_*`` conversation templates), ``builder``
(checkpoint loading), ``box_loss`` (the spec's box-token loss, torch only), ``bins_loss`` (its 1D analogue for the
bins location format), ``trainer`` (LLaVA's trainer with the loss and the checkpoint files), ``sidecar``
(``getok_config.json``), ``check`` (``llava-getok check-data``). :func:`register` applies them all, is idempotent
and returns what it changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RegisterReport:
    """What one :func:`register` (or :func:`unregister`) call changed (empty lists: nothing to do)."""

    compat_fixes: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    builder_hook: bool = False
    trainer_hook: bool = False
    stays: list[str] = field(default_factory=list)  # unregister(): the patches that stay (the compat fixes)
    upright_images: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.compat_fixes or self.templates or self.builder_hook or self.trainer_hook or self.upright_images)


def register(settings=None, template: str | None = None, **kwargs) -> RegisterReport:
    """Apply every LLaVA hook: compat fixes, ``getok_*`` templates, the builder hook and the GETok trainer
    (as ``llava.train.train.LLaVATrainer``, so LLaVA's own ``train()`` uses it). Idempotent.

    settings: a :class:`llava_getok.training.settings.GETokSettings` for training (grid, init, loss weights, ...);
        keyword arguments build one (``register(grid=16, grid_weight=0.5)``). Without either, the trainer
        keeps the settings of an earlier call, or the defaults.
    template: the conversation template of the training run (LLaVA's ``--version``), recorded in its checkpoints.
    """
    from .compat import apply_compat_fixes

    report = RegisterReport()
    report.compat_fixes = apply_compat_fixes()  # first: fix 3 must precede any import of llava.train
    from .builder import install_builder_hook
    from ..training.settings import GETokSettings
    from .templates import register_templates
    from .trainer import install_trainer_hook

    if settings is None and kwargs:
        settings = GETokSettings(**kwargs)
    report.templates = register_templates()
    report.builder_hook = install_builder_hook()
    report.trainer_hook = install_trainer_hook(settings, template)
    from .upright import install_upright_images

    report.upright_images = install_upright_images()  # LLaVA's dataset reads images upright, as predict does
    return report


def unregister() -> RegisterReport:
    """Undo :func:`register`: LLaVA's own trainer and model builder again, the ``getok_*`` templates removed; returns
    what it removed and, in ``stays``, what it leaves: the compat fixes, since LLaVA 1.2.2 does not run on the current
    stack without them and each changes only code that would fail (docs/llava-compat.md). Every patch is listed in
    :data:`llava_getok.patching.PROCESS`. A model's own patches go with it: ``GETokRows.remove(model)``."""
    from .builder import uninstall_builder_hook
    from .templates import unregister_templates
    from .trainer import uninstall_trainer_hook
    from .upright import uninstall_upright_images

    from ..patching import PROCESS

    return RegisterReport(templates=unregister_templates(), builder_hook=uninstall_builder_hook(),
                          trainer_hook=uninstall_trainer_hook(), upright_images=uninstall_upright_images(),
                          stays=PROCESS.names(permanent=True))

"""Seam: LLaVA's training dataset reads its images upright, as every other reader of llava-getok does.

``LazySupervisedDataset.__getitem__`` opens an image with ``Image.open(path).convert('RGB')``, which ignores the EXIF
orientation: a phone photo stored on its side is trained on sideways while predict, chat and the web demo show the
model the upright picture, and the converters give coordinates in upright pixels (docs/getok-spec.md section 10,
"Upright images"). The module ``llava.train.train`` gets its own ``Image`` name bound to a view of PIL's module whose
``open`` returns :func:`llava_getok.images.load_image`'s picture; every other name is PIL's own.
"""
from __future__ import annotations

from PIL import Image as _pil

from ..patching import PROCESS


class _UprightPIL:
    """PIL.Image with ``open`` reading the upright picture (a file that PIL cannot show to the model: ImageError,
    one line naming it, instead of a traceback from the data loader's worker)."""

    __getok_upright__ = True

    def __getattr__(self, name):
        return getattr(_pil, name)

    @staticmethod
    def open(fp, mode="r", formats=None):
        from ..images import load_image

        return load_image(fp)


WHY = "LLaVA's training dataset reads images upright (llava_getok.llava.upright)"


def install_upright_images() -> bool:
    """Bind ``llava.train.train.Image`` to the upright view; True if this call installed it (idempotent)."""
    import llava.train.train as llava_train

    if getattr(llava_train.Image, "__getok_upright__", False):
        return False
    PROCESS.replace(llava_train, "Image", _UprightPIL(), why=WHY)
    return True


def uninstall_upright_images() -> bool:
    """Give ``llava.train.train`` PIL's own module back; True if the upright view was installed."""
    return bool(PROCESS.undo(where=lambda p: p.why == WHY))

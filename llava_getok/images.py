"""Image files as every part that shows an image to a model reads them: predict, chat, the web demo, the model
worker, GRPO, SFT training (LLaVA's dataset, through ``llava_getok.llava.upright``) and the converters' sizes and
mask proposals.

An image is its *upright* picture: the EXIF orientation a camera writes is applied (``ImageOps.exif_transpose``), as
every photo viewer shows it, so coordinates are pixels of the upright image (docs/getok-spec.md section 10,
"Upright images"). Every mode PIL reads becomes 8-bit RGB: CMYK, palette (with transparency), greyscale, RGBA (alpha
dropped, as LLaVA's training does), and 16-bit and 32-bit greyscale scaled to 8 bits (PIL's own conversion clips
them at 255, a white picture). A file that is not an image, is cut short, is too large for PIL or too small for
CLIP's processor is an :class:`ImageError` whose message names the file in one line; callers add the record.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# LLaVA's CLIP processor guesses the channel axis from the array's shape: an image with a side of 1 or 3 pixels
# (after LLaVA's pad to a square, or as it is) is read channels-first, and fails ("mean must have 1 elements") or is
# silently misread. Smaller images are refused.
MIN_SIDE = 4
# EXIF orientations that swap width and height (a quarter turn, with or without a mirror)
TRANSPOSING = (5, 6, 7, 8)
ORIENTATION_TAG = 0x0112


class ImageError(ValueError):
    """An image file that cannot be shown to the model; the message is one line naming the file."""


def _name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the uploaded image"


def orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image (1, upright, when it has none or an unreadable one)."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001  a corrupt EXIF block: the pixels are still the picture
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(path) -> tuple[int, int]:
    """(W, H) of the upright image from the file's header (no pixels decoded): the stored size, width and height
    swapped for an EXIF quarter turn. FileNotFoundError for a missing file, :class:`ImageError` for one PIL cannot
    read."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if orientation(im) in TRANSPOSING else (w, h)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{_name(path)}: not a readable image ({_reason(e)})") from None


def stored_size(path) -> tuple[tuple[int, int], int]:
    """((W, H) as stored, EXIF orientation) from the header: what the converters check a dataset's own sizes with."""
    try:
        with Image.open(path) as im:
            return im.size, orientation(im)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{_name(path)}: not a readable image ({_reason(e)})") from None


def load_image(source) -> Image.Image:
    """An image file (path, bytes or a binary file object) -> the upright picture, 8-bit RGB, fully decoded.

    FileNotFoundError for a missing path; :class:`ImageError` (one line naming the file) for anything else that
    keeps the model from seeing it: not an image, cut short, a decompression bomb, smaller than MIN_SIDE."""
    name = _name(source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as im:
            im.load()  # decode now: a truncated file fails here, not later inside LLaVA's processing
            picture = _rgb(ImageOps.exif_transpose(im) if orientation(im) != 1 else im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (PIL cannot identify image format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot decode the image ({_reason(e)})") from None
    if min(picture.size) < MIN_SIDE:
        raise ImageError(f"{name}: the image is {picture.width} x {picture.height} pixels; the model needs at least "
                         f"{MIN_SIDE} x {MIN_SIDE}")
    return picture


def _rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module's docstring)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if a.size and a.max() > 255:  # 16 bits of grey (PIL's "I" holds 16-bit PNGs too)
            a = a / 257.0
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:  # PIL warns when such a palette goes straight to RGB
        im = im.convert("RGBA")
    return im.convert("RGB")


def _reason(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."

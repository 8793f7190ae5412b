"""Which frame a model sees (spec section 1), read off what its image processor does, never assumed.

Two conventions, one function each, and :func:`frame_of` that reads either from the object at hand:

- :func:`llava_frame`: LLaVA 1.2.2 (``image_aspect_ratio`` in its config, the tower's image processor): ``pad``
  pastes the image into a square (``expand2square``) that the processor then keeps whole: ``pad``; ``anyres`` is
  refused (LLaVA 1.2.2's ``train.py`` feeds such a model the processor's centre crop while its ``process_images``
  answers on tiles of the whole image: no one frame holds for both); any other value (``square``, LLaVA's default)
  is the processor's own frame: ``crop`` for CLIP's shortest-edge resize and centre crop.
- :func:`processor_frame`: a transformers image processor by its settings: ``do_pad`` (``LlavaImageProcessor``,
  LLaVA's ``expand2square``) -> ``pad``; Qwen2-VL's ``smart_resize`` (every side stretched to a multiple of
  ``patch_size * merge_size``) -> ``orig``; LLaVA-NeXT's anyres (a global view stretched to a square beside tiles of
  the whole image whose padding the model removes) -> ``orig``; a shortest-edge resize with ``do_center_crop`` ->
  the crop frame of those sizes (:func:`llava_getok.geometry.crop_frame`); a resize that keeps the whole image
  (no crop, or a crop no smaller than the resized image is the same square) -> ``orig``.

A processor whose output is none of these (a pad followed by a crop that cuts the square, a crop without a resize)
is a ValueError naming it: the frames cannot say what it keeps.
"""
from __future__ import annotations

from .geometry import check_frame, crop_frame, crop_sizes

ANYRES_REFUSED = ("image_aspect_ratio 'anyres': LLaVA 1.2.2 trains such a model on the processor's centre crop "
                  "(train.py) but answers on tiles of the whole image (process_images), so no one frame holds for "
                  "both; train and predict with 'pad' or 'square'")


def _sizes(processor):
    """(do_resize, size dict, do_center_crop, crop dict) of a transformers image processor."""
    size = dict(getattr(processor, "size", None) or {})
    crop = dict(getattr(processor, "crop_size", None) or {})
    return bool(getattr(processor, "do_resize", True)), size, bool(getattr(processor, "do_center_crop", False)), crop


def _resize_frame(processor) -> str:
    """The frame of a resize, optionally followed by a centre crop (CLIP, SigLIP, LLaVA's and LLaVA-NeXT's)."""
    name = type(processor).__name__
    do_resize, size, do_crop, crop = _sizes(processor)
    if not do_crop:
        return "orig"  # resized to a fixed size or by its shortest edge: the whole image either way
    cw, ch = crop.get("width"), crop.get("height")
    if not (cw and ch):
        raise ValueError(f"{name}: do_center_crop without a crop_size {{'height', 'width'}}: {crop!r}")
    if not do_resize:
        raise ValueError(f"{name}: a centre crop of {cw} x {ch} pixels without a resize keeps a part that depends on "
                         f"the image's own size; no frame describes it")
    if "shortest_edge" in size:
        return crop_frame(size["shortest_edge"], cw, ch)
    if size.get("height") == ch and size.get("width") == cw:
        return "orig"  # stretched to exactly the crop: nothing is cut
    raise ValueError(f"{name}: a resize to {size!r} then a centre crop of {cw} x {ch} cuts an image stretched to a "
                     f"fixed size; no frame describes it")


def _keeps_square_whole(frame: str) -> bool:
    """Whether a processor of this frame keeps a square image whole (so a padded square stays the pad frame)."""
    sizes = crop_sizes(frame)
    return sizes is None or sizes[0] == sizes[1] == sizes[2]


def processor_frame(image_processor) -> str:
    """The frame of a transformers image processor (or of a processor that holds one as ``image_processor``)."""
    p = getattr(image_processor, "image_processor", image_processor)
    name = type(p).__name__
    if not callable(getattr(p, "preprocess", None)):
        raise ValueError(f"{name} is not an image processor (no preprocess method): cannot tell the frame it sees")
    if hasattr(p, "min_pixels") and hasattr(p, "merge_size"):
        return "orig"  # Qwen2-VL / Qwen2.5-VL: smart_resize stretches the whole image to multiples of the patch
    if getattr(p, "image_grid_pinpoints", None) is not None:  # LLaVA-NeXT's anyres
        base = _resize_frame(p)
        if not _keeps_square_whole(base):
            raise ValueError(f"{name}: anyres with a crop ({base}) that cuts its square global view; no frame "
                             f"describes it")
        return "orig"
    frame = _resize_frame(p)
    if getattr(p, "do_pad", False):  # LlavaImageProcessor(do_pad=True): LLaVA's expand2square, then the resize
        if not _keeps_square_whole(frame):
            raise ValueError(f"{name}: do_pad, then a centre crop ({frame}) that cuts the padded square; no frame "
                             f"describes it")
        return "pad"
    return frame


def llava_frame(image_aspect_ratio: str | None, image_processor) -> str:
    """The frame LLaVA 1.2.2 feeds a model with this ``image_aspect_ratio`` and its tower's image processor, in
    training (``LazySupervisedDataset``) and in inference (``process_images``) alike."""
    if image_aspect_ratio == "anyres":
        raise ValueError(ANYRES_REFUSED)
    if image_processor is None:
        raise ValueError(f"image_aspect_ratio {image_aspect_ratio!r}: the frame needs the vision tower's image "
                         f"processor, and the model has none")
    frame = processor_frame(image_processor)
    if image_aspect_ratio != "pad":  # "square", LLaVA's default, and any other value: the processor's own
        return frame
    if not _keeps_square_whole(frame):
        raise ValueError(f"image_aspect_ratio 'pad' with {type(image_processor).__name__} ({frame}): its centre "
                         f"crop cuts the padded square; no frame describes it")
    return "pad"


def frame_of(obj, image_processor=None) -> str:
    """The frame of a transformers image processor (or processor), or of LLaVA 1.2.2's model / config (its
    ``image_aspect_ratio``; absent is LLaVA's default, ``square``) fed by ``image_processor``, or of a LLaVA model
    itself (its config and its vision tower's processor)."""
    if callable(getattr(obj, "get_vision_tower", None)) and image_processor is None:
        tower = obj.get_vision_tower()
        image_processor = getattr(tower, "image_processor", None) if tower is not None else None
        obj = obj.config
    if callable(getattr(obj, "preprocess", None)) or hasattr(obj, "image_processor"):
        return processor_frame(obj)
    return llava_frame(getattr(obj, "image_aspect_ratio", None) or "square", image_processor)


def frames_differ(records, frame: str, source) -> str | None:
    """One line naming ``source``, the frame(s) of the records (their ``getok.frame``; records without a ``getok``
    field carry no locations and are not counted) and the model's ``frame`` when any record differs; else None."""
    want = check_frame(frame)
    found = set()
    for r in records:
        g = r.get("getok") if isinstance(r, dict) else None
        if isinstance(g, dict):
            try:
                found.add(check_frame(g.get("frame")))
            except ValueError:
                found.add(str(g.get("frame")))
    if found <= {want}:
        return None
    return (f"{source}: records are in frame(s) {sorted(found)}, but the model sees frame {want!r} (read off its "
            f"image processor: llava_getok.frames); convert the data with --frame {want}")

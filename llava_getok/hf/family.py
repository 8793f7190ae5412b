"""The model families of the transformers-native backend and everything that differs between them: the model and
processor classes, the processor settings a checkpoint records, the layers LoRA
adapts. Everything else (data, training, checkpoints, generation) is written once against what both share:
``get_input_embeddings`` / ``get_output_embeddings`` / ``get_decoder``, a processor with ``apply_chat_template``,
one image token that the processor expands, and a chat template.

Qwen2.5-VL's processor class holds a video processor, and transformers builds video processors only with
torchvision. torchvision's wheels on PyPI are CUDA builds that do not import beside a CPU-only torch (and a broken
torchvision install makes transformers' image-processor imports fail): where torchvision is missing, the processor is
:class:`ImageOnlyQwenProcessor`, Qwen's own class with its image path only, saved so that ``AutoProcessor`` loads
the folder as Qwen's ``Qwen2_5_VLProcessor`` wherever torchvision is installed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import Qwen2_5_VLProcessor

# the language model's linear layers (the vision towers of both families have modules named alike: gate_proj, ...)
LANGUAGE_LINEARS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class Family:
    """name: what users type (``--backend``, the sidecar's ``model_family``); model_type: ``config.model_type``."""

    name: str
    model_type: str
    model_class: str
    processor_class: str
    vision: str  # the vision tower, a submodule path of the model (what --getok_train_vision_tower unfreezes)
    projector: str  # what maps vision features into the language model (trains with full fine-tuning)
    lora_targets: str = LANGUAGE_LINEARS

    def load_class(self):
        return getattr(transformers, self.model_class)


QWEN25_VL = Family("qwen2.5-vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                   vision="model.visual", projector="model.visual.merger")
LLAVA_HF = Family("llava-hf", "llava", "LlavaForConditionalGeneration", "LlavaProcessor",
                  vision="model.vision_tower", projector="model.multi_modal_projector")
FAMILIES = (QWEN25_VL, LLAVA_HF)
NAMES = tuple(f.name for f in FAMILIES)


def family_named(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown model family {name!r}; this backend has {', '.join(NAMES)}")


def family_of(model_or_path) -> Family:
    """The family of a model, a config or a model folder; ValueError naming the model type otherwise."""
    config = getattr(model_or_path, "config", model_or_path)
    if isinstance(config, (str, Path)):
        path = Path(config) / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the model's config ({e})") from None
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    model_type = get("model_type")
    # LLaVA 1.2.x's own checkpoints say model_type "llava" too (liuhaotian/llava-v1.5-7b), with a LLaMA config and
    # mm_vision_tower; a transformers-native model holds its vision tower's config
    for f in FAMILIES:
        if f.model_type == model_type and get("vision_config") is not None:
            return f
    raise ValueError(f"model type {model_type!r} is not one of this backend's families "
                     f"({', '.join(f'{f.name}: {f.model_type}' for f in FAMILIES)})")


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without its video processor (which needs torchvision): the same ``__call__`` and chat
    template for images and text. :func:`save_processor` saves it under Qwen's own class name."""

    attributes = ["image_processor", "tokenizer"]


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA build beside a CPU torch fails with RuntimeError, not ImportError
        return False
    return True


def load_processor(path, family: Family | None = None):
    """The processor saved in ``path`` (a model folder or a GETok checkpoint)."""
    family = family or family_of(path)
    if family is QWEN25_VL and not _torchvision_imports():
        return ImageOnlyQwenProcessor.from_pretrained(str(path))
    return transformers.AutoProcessor.from_pretrained(str(path))


def save_processor(processor, folder) -> None:
    """Save ``processor`` into ``folder`` so that ``AutoProcessor`` loads it as its family's own processor class."""
    processor.save_pretrained(str(folder))
    if not isinstance(processor, ImageOnlyQwenProcessor):
        return
    for name in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        path = Path(folder) / name
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("processor_class") == ImageOnlyQwenProcessor.__name__:
                data["processor_class"] = QWEN25_VL.processor_class
                path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# The image processor's settings a checkpoint records (those that exist on its class): what decides the frame and
# the number of image tokens.
PROCESSOR_SETTINGS = ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size", "do_pad",
                      "do_center_crop", "size", "crop_size")


def processor_settings(processor) -> dict:
    ip = processor.image_processor
    out = {"image_processor": type(ip).__name__}
    for key in PROCESSOR_SETTINGS:
        value = getattr(ip, key, None)
        if value is not None:
            out[key] = dict(value) if isinstance(value, dict) else value
    return out

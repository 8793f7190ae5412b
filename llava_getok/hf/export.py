"""A standalone transformers folder from a GETok checkpoint: what ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` load with no llava-getok installed, the form serving engines take.

- :func:`export_checkpoint`: a checkpoint of this backend (LoRA merged, the GETok rows written into the matrices) with
  its processor (the tokenizer with the GETok tokens, the image processor whose frame the model was trained in).
- :func:`llava_hf_from_llava`: a LLaVA 1.2.x model as ``LlavaForConditionalGeneration`` (its LLaMA, CLIP tower and
  ``mlp2x_gelu`` projector, weight for weight) with a ``LlavaProcessor``: the tokenizer made fast with ``<image>``
  added, ``LlavaImageProcessor(do_pad=True)`` (LLaVA's ``expand2square`` with the processor's mean colour) and the
  training conversation as chat template. The LLaVA model itself is loaded by the caller (``llava-getok export``).

Both write the GETok sidecar (backend ``hf``, kind ``full``) and rows beside the model, so ``llava-getok predict``
reads the folder too; transformers ignores them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..training.rows import getok_rows_values
from ..training.sidecar import ROWS_FILE, Sidecar, save_tensors_atomic, write_sidecar
from .checkpoint import load_checkpoint
from ..frames import processor_frame
from .family import LLAVA_HF, processor_settings, save_processor


def export_checkpoint(path, out, model_base=None, dtype=torch.float32) -> Path:
    """Write checkpoint ``path`` of this backend as a standalone model folder ``out``."""
    processor, model, sidecar = load_checkpoint(path, model_base, dtype=dtype, merge=True)
    return write_folder(out, model, processor, dataclasses.replace(sidecar, kind="full", base_model=None))


def write_folder(out, model, processor, sidecar: Sidecar | None) -> Path:
    """The model, its processor and (for a GETok model) the GETok files, into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    save_processor(processor, out)
    if sidecar is not None:
        if sidecar.token_ids:
            save_tensors_atomic(out / ROWS_FILE, getok_rows_values(model, sidecar.token_ids))
        write_sidecar(out, sidecar)
    return out


# LLaVA 1.2.x's module names -> LlavaForConditionalGeneration's (transformers >= 4.52)
LLAVA_KEYS = (("model.vision_tower.vision_tower.", "model.vision_tower."),
              ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
              ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
              ("model.", "model.language_model."),
              ("lm_head.", "lm_head."))


def llava_state_to_hf(state: dict) -> dict:
    """A LLaVA 1.2.x state dict with llava-hf's key names (every key mapped, or KeyError naming it)."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in LLAVA_KEYS if key.startswith(p[0])), None)
        if prefix is None:
            raise KeyError(f"LLaVA weight {key!r} has no place in LlavaForConditionalGeneration")
        out[prefix[1] + key[len(prefix[0]):]] = value
    return out


@dataclasses.dataclass(frozen=True)
class LlavaParts:
    """What :func:`llava_hf_from_llava` needs of a loaded LLaVA model, in plain values (no ``llava`` import here).

    state: the LLaVA model's state dict (LoRA merged, GETok rows in); text_config: its LLaMA config as a dict;
    vision_config: the CLIP tower's ``CLIPVisionConfig``; select_layer / select_feature: ``mm_vision_select_layer`` /
    ``mm_vision_select_feature``; projector: ``mm_projector_type``; image_processor: the tower's
    ``CLIPImageProcessor``; tokenizer_dir: the checkpoint's tokenizer folder; chat_template: the training
    conversation (``tiny.two_separator_template``); image_aspect_ratio: LLaVA's setting."""

    state: dict
    text_config: dict
    vision_config: object
    select_layer: int
    select_feature: str
    projector: str
    image_processor: object
    tokenizer_dir: str
    chat_template: str
    image_aspect_ratio: str


def llava_hf_from_llava(parts: LlavaParts, sidecar: Sidecar | None, out, dtype=torch.float32) -> Path:
    """Write a LLaVA 1.2.x model as a llava-hf folder ``out`` (see the module's docstring)."""
    from transformers import (AddedToken, LlamaConfig, LlamaTokenizerFast, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaImageProcessor, LlavaProcessor)

    if parts.image_aspect_ratio != "pad":
        raise ValueError(f"image_aspect_ratio {parts.image_aspect_ratio!r}: llava-hf's LlavaImageProcessor "
                         "reproduces LLaVA's padded square (pad) only")
    if parts.projector != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {parts.projector!r}: llava-hf's projector is LLaVA-1.5's mlp2x_gelu")
    if parts.select_feature not in ("patch", "cls_patch"):
        raise ValueError(f"mm_vision_select_feature {parts.select_feature!r} has no llava-hf equivalent")
    tokenizer = LlamaTokenizerFast.from_pretrained(parts.tokenizer_dir, from_slow=True, legacy=False)
    if sidecar is not None:
        sidecar.check_tokenizer(tokenizer, parts.tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", special=True, normalized=False)]},
                                 replace_additional_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # what LLaVA's train.py sets for its v1 templates
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(**{**parts.text_config, "vocab_size": parts.state["lm_head.weight"].shape[0]})
    vision = parts.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2 + (parts.select_feature == "cls_patch")
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token,
                         projector_hidden_act="gelu", vision_feature_layer=parts.select_layer,
                         vision_feature_select_strategy="default" if parts.select_feature == "patch" else "full",
                         image_seq_length=n_image, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    state = llava_state_to_hf(parts.state)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(dtype)
    # <image> gets a row: its input row is never read (the image features replace it), its output row is the mean
    # (as transformers' own LLaVA conversion does) and generation never writes it
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    model.generation_config.suppress_tokens = list(range(rows, len(tokenizer)))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    ip = parts.image_processor
    image_processor = LlavaImageProcessor(
        do_pad=True, size=dict(ip.size), crop_size=dict(ip.crop_size), resample=ip.resample,
        do_center_crop=ip.do_center_crop, rescale_factor=ip.rescale_factor, image_mean=list(ip.image_mean),
        image_std=list(ip.image_std), do_convert_rgb=True)
    tokenizer.chat_template = parts.chat_template
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               chat_template=parts.chat_template, num_additional_image_tokens=1)
    if sidecar is None:  # a stock LLaVA: a stock llava-hf folder
        return write_folder(out, model, processor, None)
    hf_sidecar = dataclasses.replace(sidecar, kind="full", base_model=None, backend="hf", model_family=LLAVA_HF.name,
                                     vocab_size=len(tokenizer), tokenizer_legacy=None, frame=processor_frame(processor),
                                     processor=processor_settings(processor))
    return write_folder(out, model, processor, hf_sidecar)

"""What the conversation engine (:mod:`llava_getok.session`: chat, web, the model worker) asks of a backend, one class
each: :class:`LlavaModel` (haotian-liu/LLaVA 1.2.x through ``llava_getok.llava``) and :class:`HFModel` (Qwen2.5-VL
and llava-hf through ``llava_getok.hf``). The engine picks one by the checkpoint (``predict.backend_of``: its sidecar,
else its config) and does everything else itself: the grammar, streaming, parsing, pixels, pictures.

Each gives, for one loaded model:

- ``load(model_path, model_base, device, load_4bit, load_8bit, conv_mode) -> (part, location format or None)``: the
  format is the sidecar's; None for a model without one (the engine then asks :meth:`default_format`);
- ``prompt(turns)``: LLaVA-style turns (``{"from": "human"|"gpt", "value"}``, ``<image>`` where the picture goes,
  ending with a human turn) -> the prompt text, exactly as training rendered it;
- ``inputs(prompt, picture)``: the ``generate`` keyword arguments for a rendered prompt and its picture (an upright
  RGB PIL image, or None), on the model's device;
- ``frame``: the frame the model sees an image in, read off its image processor (:mod:`llava_getok.frames`);
- ``tokenizer``, ``model``, ``eos_ids`` (what ends an answer), ``pad_id``, ``roles`` (how chat names the two sides),
  ``image_marker`` (what marks the image in a rendered prompt: the worker's requests hold one), ``template``.
"""
from __future__ import annotations

import torch

from .formats import Qwen25Format, TextFormat


class LlavaModel:
    """A LLaVA 1.2.x model: LLaVA's conversation templates, ``<image>`` as one ``IMAGE_TOKEN_INDEX``, the image
    through LLaVA's ``process_images`` into ``generate(images=...)``."""

    backend = "llava"
    image_marker = "<image>"

    def __init__(self, tokenizer, model, image_processor, template: str):
        from .frames import frame_of
        from .llava.templates import template_roles

        self.tokenizer, self.model, self.image_processor, self.template = tokenizer, model, image_processor, template
        self.roles = template_roles(template)
        self.frame = frame_of(model)  # image_aspect_ratio and the tower's processor, as predict reads it
        self.eos_ids = [tokenizer.eos_token_id]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id

    @classmethod
    def load(cls, model_path: str, model_base: str | None = None, device: str = "cpu", load_4bit: bool = False,
             load_8bit: bool = False, conv_mode: str | None = None):
        """Through the builder hook (GETok tokens and rows from the sidecar; float32 on a CPU); the template is
        ``conv_mode``, else the sidecar's, else the one LLaVA's cli picks from the folder name."""
        from .llava import register
        from .llava.builder import load_getok_checkpoint
        from .llava.templates import pick_template
        from .training.sidecar import read_sidecar

        register()
        sidecar = read_sidecar(model_path)
        template = pick_template(model_path, sidecar, conv_mode)
        tokenizer, model, processor, _ = load_getok_checkpoint(model_path, model_base, load_8bit=load_8bit,
                                                               load_4bit=load_4bit, device=device, sidecar=sidecar)
        model.eval()
        return cls(tokenizer, model, processor, template), (sidecar.location_format if sidecar else None)

    def default_format(self):
        return TextFormat()  # a stock LLaVA answers LLaVA-1.5's text boxes

    def prompt(self, turns) -> str:
        from .llava.inputs import render_prompt

        return render_prompt(turns, self.template)

    def inputs(self, prompt: str, picture=None) -> dict:
        from .llava import inputs

        ids = torch.tensor([inputs.prompt_ids(prompt, self.tokenizer)], device=self.model.device)
        out = {"inputs": ids, "attention_mask": torch.ones_like(ids)}  # LLaVA's generate reads ``inputs`` only
        if picture is not None:
            dtype = next(self.model.parameters()).dtype
            pixels = inputs.image_tensor(picture, self.image_processor, self.model.config)
            out["images"] = pixels[None].to(self.model.device, dtype=dtype)
        return out


class HFModel:
    """A transformers-native model of ``llava_getok.hf`` (a checkpoint of ``python -m llava_getok.hf.train``, an
    export, or a stock Qwen2.5-VL / llava-hf folder): prompts from the model's chat template and the images through its
    processor, both as training and ``llava-getok predict`` use them (``hf.generate``)."""

    backend = "hf"
    roles = ("USER", "ASSISTANT")
    template = None  # the model's own chat template

    def __init__(self, generator, sidecar=None, where: str = "the model"):
        from .frames import processor_frame
        from .geometry import check_frame

        self.generator, self.processor = generator, generator.processor
        self.tokenizer, self.model = generator.tokenizer, generator.model
        self.eos_ids, self.pad_id = generator.eos_ids, generator.pad_id
        self.image_marker = getattr(self.processor, "image_token", None) or "<image>"
        self.frame = processor_frame(self.processor)
        if sidecar is not None and check_frame(sidecar.frame) != self.frame:
            raise ValueError(f"{where}: its sidecar records frame {sidecar.frame!r}, but its processor gives "
                             f"{self.frame!r} (llava_getok.frames): the processor is not the one it was trained with")

    @classmethod
    def load(cls, model_path: str, model_base: str | None = None, device: str = "cpu", load_4bit: bool = False,
             load_8bit: bool = False, conv_mode: str | None = None):
        """The checkpoint (its processor and sidecar) or stock model folder, in float32; the options only LLaVA has
        are refused in one line."""
        from .predict import load_hf
        from .training.sidecar import read_sidecar

        if conv_mode:
            raise ValueError(f"{model_path}: --conv-mode {conv_mode} names a LLaVA template; a transformers model "
                             "answers in its own chat template (the one it was trained with)")
        if load_4bit or load_8bit:
            raise ValueError(f"{model_path}: --load-4bit / --load-8bit are for LLaVA checkpoints; this model loads in "
                             "float32 (export it and quantise it with transformers)")
        sidecar = read_sidecar(model_path)
        generator, _ = load_hf(model_path, model_base, device)
        return cls(generator, sidecar, model_path), (sidecar.location_format if sidecar else None)

    def default_format(self):
        """A model without GETok tokens: Qwen2.5-VL's own JSON pixel boxes, bound to the processor's resize; llava-hf's
        LLaVA-1.5 text boxes."""
        ip = self.processor.image_processor
        if hasattr(ip, "min_pixels") and hasattr(ip, "merge_size"):
            return Qwen25Format(min_pixels=int(ip.min_pixels), max_pixels=int(ip.max_pixels),
                                patch_size=int(ip.patch_size), merge_size=int(ip.merge_size))
        return TextFormat()

    def prompt(self, turns) -> str:
        from .hf.generate import prompt_text

        return prompt_text(self.processor, turns)

    def inputs(self, prompt: str, picture=None) -> dict:
        return self.generator.inputs([prompt], [picture] if picture is not None else None)

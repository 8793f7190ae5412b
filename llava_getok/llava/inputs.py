"""Model inputs from converted records, by LLaVA's own input path: conversation turns -> prompt text -> token
ids, image files -> pixel tensors. Used by prediction (:mod:`llava_getok.predict`) and by GRPO's rollouts and
log-probabilities (:mod:`llava_getok.rl`).

Generation must see exactly what supervised training saw (docs/pitfalls.md, "GRPO with grounding"): the prompt
rendered by LLaVA's conversation template, ``<image>`` turned into one ``IMAGE_TOKEN_INDEX`` by LLaVA's
``tokenizer_image_token`` (LLaVA's model expands it into image features itself: nothing else may expand it),
and the image through LLaVA's ``process_images`` (``expand2square`` with the processor's mean colour when
``image_aspect_ratio`` is ``pad``, as ``LazySupervisedDataset`` does).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def render_prompt(turns, conv_mode: str) -> str:
    """LLaVA conversation turns ``[{"from": "human"|"gpt", "value": str}, ...]`` ending with a human turn ->
    the prompt text up to the assistant's next reply, in template ``conv_mode``."""
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise ValueError(f"unknown conversation template {conv_mode!r}; LLaVA has {sorted(conv_templates)}")
    conv = conv_templates[conv_mode].copy()
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    for k, t in enumerate(turns):
        if t["from"] not in roles:
            raise ValueError(f"turn {k} is from {t['from']!r}; expected 'human' or 'gpt'")
        conv.append_message(roles[t["from"]], t["value"])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def prompt_ids(prompt: str, tokenizer) -> list[int]:
    """Token ids of a prompt; each ``<image>`` becomes one ``IMAGE_TOKEN_INDEX`` (LLaVA's tokenizer_image_token)."""
    from llava.mm_utils import tokenizer_image_token

    return tokenizer_image_token(prompt, tokenizer)


def image_tensor(image, image_processor, model_config) -> torch.Tensor:
    """One image (a file, read upright by :func:`llava_getok.images.load_image`, or a PIL image it returned) -> pixel
    tensor (3, H, W), processed as LLaVA processes it for this model's config."""
    from llava.mm_utils import process_images

    from ..images import load_image

    if not hasattr(image, "convert"):
        image = load_image(image)
    return process_images([image], image_processor, model_config)[0]


def image_token_index() -> int:
    from llava.constants import IMAGE_TOKEN_INDEX

    return IMAGE_TOKEN_INDEX


@contextmanager
def padding_side(llava_model, side: str):
    """LLaVA re-pads the expanded sequence by ``config.tokenizer_padding_side``; batched ``generate`` needs
    "left" (docs/pitfalls.md), training uses "right". Set it for the block, restore it after."""
    old = getattr(llava_model.config, "tokenizer_padding_side", "right")
    llava_model.config.tokenizer_padding_side = side
    try:
        yield
    finally:
        llava_model.config.tokenizer_padding_side = old

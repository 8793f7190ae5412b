"""Generation for a loaded model of this backend, as ``llava-getok predict`` asks for it: conversation turns (LLaVA's
``{"from", "value"}``, ending with a question) rendered by the model's chat template with its generation prompt, the
images through the model's processor, left padding, greedy decoding with the given logits processors (GETok's grammar,
``llava_getok.generation``) through the model's own ``generate``. What training saw is what generation sees: the same
messages (``data.turn_messages``), the same template, the same processor.
"""
from __future__ import annotations

import torch

from .data import render, turn_messages


def prompt_text(processor, turns) -> str:
    """The model's prompt for LLaVA conversation turns ending with a question: what training rendered before the
    answer (the same messages and chat template), with the template's generation prompt."""
    return render(processor, turn_messages(turns), generation_prompt=True)


class Generator:
    """``generate(conversations, images, processors, max_new_tokens) -> new token ids per row, up to the end of turn``
    for one model and its processor; ``inputs(texts, images)``: what ``generate`` hands the model (chat streams its
    own ``generate`` over them: ``llava_getok.session``)."""

    def __init__(self, processor, model):
        self.processor, self.model = processor, model
        self.tokenizer = processor.tokenizer
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = list(dict.fromkeys([self.tokenizer.eos_token_id, *eos]))  # the template's end of turn first
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def inputs(self, texts: list[str], images: list | None) -> dict:
        """The model's inputs for rendered prompts and their images (upright RGB PIL images; None or ``[None, ...]``
        for none), left-padded, on the model's device, floating tensors in its dtype."""
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            inputs = self.processor(text=texts, images=images if images and images[0] is not None else None,
                                    padding=True, return_tensors="pt")
        finally:
            self.tokenizer.padding_side = side
        dtype = next(self.model.parameters()).dtype
        return {k: v.to(self.model.device, dtype) if torch.is_floating_point(v) else v.to(self.model.device)
                for k, v in inputs.items()}

    def generate(self, conversations: list[list[dict]], images: list, processors=(), max_new_tokens: int = 64
                 ) -> list[list[int]]:
        from transformers import LogitsProcessorList

        inputs = self.inputs([prompt_text(self.processor, c) for c in conversations], images)
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                      logits_processor=LogitsProcessorList(processors), pad_token_id=self.pad_id,
                                      eos_token_id=self.eos_ids, use_cache=True)
        answers = []
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():  # the prompt comes back first
            end = next((k for k, t in enumerate(row) if t in self.eos_ids), len(row))
            answers.append(row[:end])
        return answers

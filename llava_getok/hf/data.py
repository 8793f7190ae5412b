"""Converted records (docs/data-format.md, the one data format) -> the model's chat messages -> processor inputs with
labels on the assistant turns only.

- :func:`record_messages`: LLaVA's conversations (``{"from": "human"|"gpt", "value"}``) become chat messages
  (``user`` / ``assistant``, content parts). The image goes first in the turn that holds ``<image>``, the text without
  the placeholder after it, as LLaVA's own preprocessing moves it (``preprocess_multimodal``).
- :func:`assistant_spans`: where each assistant turn sits in the rendered conversation, from the chat template itself:
  the conversation up to a turn rendered with the generation prompt, and up to its end; the span between them, less
  trailing whitespace, is the answer and the template's end of turn (``<|im_end|>``, ``</s>``), which the model must
  learn to write. trl 1.16 builds such masks for vision data only from transformers 5.18 on, which this stack's pin
  (< 5) excludes.
- :func:`encode`: the processor's own inputs for the record (its image processing, its image-token expansion) and
  ``labels``: the token ids inside the assistant spans, -100 elsewhere. The spans are found on the tokenizer's offsets
  of the rendered text and carried over to the processor's ids, whose only difference is each image token repeated.
- :class:`Collator`: right-padded batches; the image tensors of the batch concatenated (Qwen's patches, LLaVA's
  squares alike).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..records import RecordsError
from ..training.loss_parts import IGNORE_INDEX

IMAGE = "<image>"
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def record_messages(record: dict) -> list[dict]:
    """The chat messages of a converted record; RecordsError naming the record and field for a conversation this
    backend cannot train on (a turn of another role, an image without one ``<image>`` in its turns, no answer)."""
    rid = record.get("id")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordsError(f"record {rid}: field 'conversations': a non-empty list of turns is required")
    n_image = sum(str(t.get("value", "")).count(IMAGE) for t in turns if isinstance(t, dict))
    if n_image != (1 if record.get("image") else 0):
        raise RecordsError(f"record {rid}: field 'conversations': {n_image} '{IMAGE}' placeholders for "
                           f"{'one image' if record.get('image') else 'no image'}")
    messages = turn_messages(turns, rid)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordsError(f"record {rid}: field 'conversations': no gpt turn to train on")
    return messages


def turn_messages(turns: list, rid=None) -> list[dict]:
    """LLaVA conversation turns -> chat messages (the image first in the turn that holds ``<image>``)."""
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise RecordsError(f"record {rid}: field 'conversations[{k}]': expected {{\"from\": \"human\"|\"gpt\", "
                               f"\"value\": text}}")
        text = turn["value"]
        content = []
        if IMAGE in text:
            content.append({"type": "image"})
            text = text.replace(IMAGE, "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": ROLES[turn["from"]], "content": content})
    return messages


def render(processor, messages, generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(processor, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it (answer and end of turn)."""
    text = render(processor, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(processor, messages[:i], generation_prompt=True))
        end = render(processor, messages[: i + 1])
        if not text.startswith(end) or start > len(end):
            raise ValueError("the chat template does not render a conversation as the prefix of a longer one: "
                             "assistant turns cannot be located")
        spans.append((start, len(end.rstrip())))
    return text, spans


def span_mask(offsets, spans, where: str) -> np.ndarray:
    """True for the tokens inside a span; ValueError for a token that crosses a span's edge."""
    mask = np.zeros(len(offsets), dtype=bool)
    for s, e in spans:
        for k, (a, b) in enumerate(offsets):
            if a < e and b > s:
                if a < s or b > e:
                    raise ValueError(f"{where}: a token spans the edge of an assistant turn (characters {a}-{b}, "
                                     f"turn {s}-{e}): its labels cannot be told apart")
                mask[k] = True
    return mask


def expand_mask(mask: np.ndarray, ids: list[int], expanded: list[int], image_id: int | None, where: str) -> np.ndarray:
    """``mask`` over the tokenizer's ``ids`` carried over to the processor's ``expanded`` ids (each image token
    repeated); ValueError when they differ otherwise."""
    out = np.zeros(len(expanded), dtype=bool)
    j = 0
    for k, token in enumerate(ids):
        if j >= len(expanded) or expanded[j] != token:
            raise ValueError(f"{where}: the processor's token ids differ from the tokenizer's at token {k}")
        if token == image_id:
            while j < len(expanded) and expanded[j] == image_id:
                j += 1
            continue
        out[j] = mask[k]
        j += 1
    if j != len(expanded):
        raise ValueError(f"{where}: the processor's token ids differ from the tokenizer's after token {len(ids)}")
    return out


def image_token_id(processor) -> int | None:
    token = getattr(processor, "image_token", None)
    return processor.tokenizer.convert_tokens_to_ids(token) if token else None


def text_labels(processor, record: dict) -> tuple[str, list[int], np.ndarray]:
    """The rendered text, its token ids (one image token per image) and which of them are labelled."""
    where = f"record {record.get('id')}"
    text, spans = assistant_spans(processor, record_messages(record))
    enc = processor.tokenizer(text, return_offsets_mapping=True)
    return text, enc["input_ids"], span_mask(enc["offset_mapping"], spans, where)


def load_image(record: dict, image_root):
    """The record's image, upright and 8-bit RGB (``llava_getok.images``), None for a record without one;
    FileNotFoundError or ValueError naming the record, the field and the file."""
    from ..images import ImageError
    from ..images import load_image as read

    if not record.get("image"):
        return None
    path = Path(image_root or ".") / record["image"]
    if not path.is_file():
        raise FileNotFoundError(f"record {record.get('id')}: field 'image': {path} not found (image root {image_root})")
    try:
        return read(path)
    except ImageError as e:
        raise ValueError(f"record {record.get('id')}: field 'image': {e}") from None


def encode(processor, record: dict, image_root) -> dict:
    """The processor's inputs for one record (``input_ids``, ``attention_mask``, its image tensors) and ``labels``."""
    where = f"record {record.get('id')}"
    text, ids, mask = text_labels(processor, record)
    image = load_image(record, image_root)
    out = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    expanded = out["input_ids"][0].tolist()
    labelled = expand_mask(mask, ids, expanded, image_token_id(processor), where)
    labels = torch.full((len(expanded),), IGNORE_INDEX, dtype=torch.long)
    labels[torch.from_numpy(labelled)] = torch.tensor(expanded)[torch.from_numpy(labelled)]
    item = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    item.update(input_ids=out["input_ids"][0], attention_mask=out["attention_mask"][0], labels=labels)
    return item


def training_dataset(records: list[dict], processor, image_root):
    """A ``datasets.Dataset`` (what trl's SFTTrainer takes) of the records, encoded on access (images are processed
    when a batch is drawn, not up front)."""
    from datasets import Dataset

    data = Dataset.from_dict({"record": [json.dumps(r) for r in records]})
    return data.with_transform(_Encode(processor, image_root))


class _Encode:
    """``datasets`` transform: a batch of JSON records -> their encodings (a class, so a worker process can pickle
    it)."""

    def __init__(self, processor, image_root):
        self.processor, self.image_root = processor, image_root

    def __call__(self, batch: dict) -> dict:
        items = [encode(self.processor, json.loads(r), self.image_root) for r in batch["record"]]
        return {k: [item.get(k) for item in items] for k in items[0]}


class Collator:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels``; every other field (pixel values, image grids)
    concatenated over the batch's records that have it."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(x["input_ids"]) for x in items)
        fill = {"input_ids": self.pad, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {k: torch.stack([torch.nn.functional.pad(x[k], (0, width - len(x[k])), value=v) for x in items])
                 for k, v in fill.items()}
        for key in {k for x in items for k in x} - set(fill):
            parts = [x[key] for x in items if x.get(key) is not None]
            if parts:
                batch[key] = torch.cat(parts)
        return batch

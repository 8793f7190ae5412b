"""Load a checkpoint of ``python -m llava_getok.hf.train`` back, from its sidecar: the processor saved with it (the
GETok tokens with their recorded ids), and the model: a full checkpoint as it is; a LoRA one as its base model
(``--model-base``, else the sidecar's ``base_model``) resized to the recorded vocabulary, with the adapter and its
trainable GETok rows on top (merged for inference by default). A base that is a GETok checkpoint itself (a GRPO run's
adapter on the SFT checkpoint it started from) is loaded the same way first, merged. The rows the model ends up with are checked against
``getok_rows.safetensors``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..training.rows import getok_rows_values
from ..training.sidecar import SIDECAR, Sidecar, read_rows, read_sidecar
from ..training.tokens import resize_embeddings
from .family import family_named, load_processor

ROW_TOL = 1e-5  # the saved rows are float32 copies of the model's


def hf_sidecar(path) -> Sidecar:
    """The sidecar of an hf-backend checkpoint; ValueError naming the folder otherwise."""
    sidecar = read_sidecar(path)
    if sidecar is None:
        raise ValueError(f"{path}: no {SIDECAR}: not a GETok checkpoint")
    if sidecar.backend != "hf":
        raise ValueError(f"{path}: a checkpoint of the {sidecar.backend} backend, not of llava_getok.hf")
    return sidecar


def load_checkpoint(path, model_base=None, device: str = "cpu", dtype=torch.float32, merge: bool = True):
    """(processor, model in eval mode, sidecar) of the checkpoint folder ``path``."""
    path = Path(path)
    sidecar = hf_sidecar(path)
    family = family_named(sidecar.model_family)
    processor = load_processor(path, family)
    sidecar.check_tokenizer(processor.tokenizer, str(path))
    cls = family.load_class()
    if sidecar.kind == "full":
        model = cls.from_pretrained(str(path), dtype=dtype)
    else:
        base = model_base or sidecar.base_model
        if not base:
            raise ValueError(f"{path}: a LoRA checkpoint whose sidecar names no base model: pass --model-base")
        if read_sidecar(base) is not None:  # a GETok checkpoint itself (GRPO's adapters sit on the model it started from)
            _, model, _ = load_checkpoint(base, dtype=dtype)
        else:
            model = cls.from_pretrained(str(base), dtype=dtype)
        # the rows past the base's are GETok rows: the adapter's trainable tokens write them
        resize_embeddings(model, sidecar.vocab_size)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
        if merge:
            model = model.merge_and_unload()
    check_rows(model, path, sidecar)
    return processor, model.to(device).eval(), sidecar


def check_rows(model, path, sidecar: Sidecar) -> None:
    """Refuse a model whose GETok rows are not the checkpoint's saved ones (a wrong base, a stale adapter)."""
    if not sidecar.token_ids:
        return
    saved = read_rows(path, sidecar)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    have = getok_rows_values(base, sidecar.token_ids)
    for key in ("input_rows", "output_rows"):
        diff = float((have[key] - saved[key]).abs().max())
        if diff > ROW_TOL:
            raise ValueError(f"{path}: the loaded model's GETok {key.split('_')[0]} rows differ from "
                             f"getok_rows.safetensors by up to {diff:.3g}: wrong base model or files of another run")

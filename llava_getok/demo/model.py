"""The demo's tiny random LLaVA: LLaVA's own tiny model (llava_getok.llava.tiny) with 2D sine-cosine patch positions
written into its random CLIP tower."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def build_model(out: Path, a) -> Path:
    """The tiny LLaVA, with 2D sine-cosine position embeddings in its (random) CLIP tower."""
    import torch
    from transformers import CLIPVisionModel

    from ..llava.tiny import TinyLlavaConfig, build_tiny_llava, train_tokenizer

    torch.set_num_threads(a.threads)
    tok = train_tokenizer(out / "tokenizer", seed=a.seed)
    cfg = TinyLlavaConfig(image_size=a.image_size, patch_size=a.patch, num_layers=a.layers, num_heads=a.heads,
                          mm_vision_select_layer=-1,
                          vision_hidden_size=a.vision_width, vision_heads=max(1, a.vision_width // 16), seed=a.seed)
    model_dir = build_tiny_llava(out / "tiny-llava", tok, cfg)
    tower_dir = model_dir / "vision_tower"
    tower = CLIPVisionModel.from_pretrained(tower_dir)
    set_sincos_positions(tower, dims=a.position_dims or None)
    tower.save_pretrained(tower_dir, safe_serialization=True)
    return model_dir


def set_sincos_positions(clip_vision_model, scale: float = 1.0, dims: int | None = None) -> None:
    """Overwrite a CLIP tower's patch position embeddings with 2D sine-cosine codes (frequencies 1/100^(k/q), sines
    and cosines of the column then the row index, times ``scale``) in their first ``dims`` dimensions (None: all; the
    rest zero) and zeros at the CLS position: where each patch is, readable by a tower that starts random, while the
    other dimensions are left to the patch's content."""
    import torch

    pe = clip_vision_model.vision_model.embeddings.position_embedding.weight
    side = int(round((pe.shape[0] - 1) ** 0.5))
    dim = pe.shape[1]
    q = (dim if dims is None else dims) // 4
    freq = 1.0 / (100.0 ** (np.arange(q) / q))
    j, i = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    i, j = i.reshape(-1, 1) * freq, j.reshape(-1, 1) * freq
    code = np.concatenate([np.sin(i), np.cos(i), np.sin(j), np.cos(j)], 1)
    code = np.pad(code, ((0, 0), (0, dim - code.shape[1])))
    with torch.no_grad():
        pe[1:] = torch.as_tensor(code, dtype=pe.dtype) * scale
        pe[0] = 0

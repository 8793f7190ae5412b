"""The demo's model family: LLaVA 1.2.x (``--backend llava``, the default: ``model``, ``training``) or a
transformers-native model trained with trl through ``llava_getok.hf`` (``--backend qwen2.5-vl`` / ``llava-hf``): a tiny
random model of that family, built offline, and ``python -m llava_getok.hf.train`` with the demo's recipe (full
fine-tuning with the vision tower, the same curriculum, schedule and box-token loss as the LLaVA demo)."""
from __future__ import annotations

import json
from pathlib import Path

from .model import set_sincos_positions
from .training import WARMUP_STEPS, log_every

BACKENDS = ("llava", "qwen2.5-vl", "llava-hf")


def frame(backend: str) -> str:
    """The frame the backend's processor sees a (square) demo image in: Qwen2.5-VL's smart_resize keeps the original
    image (``orig``), LLaVA and llava-hf pad to a square (``pad``)."""
    return "orig" if backend == "qwen2.5-vl" else "pad"


def build_hf_model(out: Path, a) -> Path:
    """The tiny random model of ``a.backend`` for the demo's images (``--image-size`` px, ``--patch`` px patches);
    llava-hf's chat template without a system prompt, as the LLaVA demo's ``getok_mistral_instruct``."""
    import torch

    from ..hf import tiny

    torch.set_num_threads(a.threads)
    if a.backend == "qwen2.5-vl":
        pixels = a.image_size * a.image_size  # smart_resize keeps a demo image as it is
        cfg = tiny.TinyQwenConfig(num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.heads,
                                  vision_hidden_size=a.vision_width, vision_heads=max(1, a.vision_width // 16),
                                  patch_size=a.patch, merge_size=a.merge, window_size=a.patch * a.merge * 4,
                                  min_pixels=pixels, max_pixels=pixels, rope_theta=a.rope_theta, seed=a.seed)
        return tiny.build_tiny_qwen(out / "tiny-qwen2.5-vl", cfg)
    from transformers import LlavaForConditionalGeneration

    from ..llava.tiny import train_tokenizer

    tok = train_tokenizer(out / "tokenizer", seed=a.seed)
    cfg = tiny.TinyLlavaHFConfig(num_layers=a.layers, num_heads=a.heads, vision_hidden_size=a.vision_width,
                                 vision_heads=max(1, a.vision_width // 16), image_size=a.image_size,
                                 patch_size=a.patch, vision_feature_layer=-1, system="", seed=a.seed)
    model_dir = tiny.build_tiny_llava_hf(out / "tiny-llava-hf", tok, cfg)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)  # the LLaVA demo's CLIP positions, as there
    set_sincos_positions(model.model.vision_tower, dims=a.position_dims or None)
    model.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def hf_train_args(model_dir: Path, data_json: Path, image_root: Path, ckpt: Path, a, file_order: bool = False
                  ) -> list[str]:
    """``python -m llava_getok.hf.train`` arguments: the LLaVA demo's recipe (``training.train_args``) in this
    backend's flags; float32 and no gradient checkpointing (trl's defaults are bf16 and checkpointing)."""
    return [
        "--model_name_or_path", str(model_dir), "--data_path", str(data_json), "--image_folder", str(image_root),
        "--getok_grid", str(a.grid), "--getok_rounds", str(a.rounds), "--getok_sigma", str(a.sigma),
        "--getok_train_vision_tower", "True", "--getok_check_data", "1000",
        *(["--getok_data_order", "file"] if file_order else []),
        "--output_dir", str(ckpt), "--max_steps", str(a.steps), "--per_device_train_batch_size", str(a.batch),
        "--learning_rate", str(a.lr), "--lr_scheduler_type", a.schedule, "--warmup_steps", str(WARMUP_STEPS),
        *(["--lr_scheduler_kwargs", json.dumps({"num_decay_steps": a.decay_steps or a.steps // 4})]
          if a.schedule == "warmup_stable_decay" else []),
        "--max_grad_norm", str(a.max_grad_norm), "--weight_decay", "0",
        *(["--save_strategy", "steps", "--save_steps", str(a.eval_every), "--save_only_model", "True"]
          if a.eval_every else ["--save_strategy", "no"]),
        "--logging_steps", str(log_every(a.steps)), "--report_to", "none", "--disable_tqdm", "True",
        "--dataloader_num_workers", "1" if a.threads == 1 else "0", "--seed", str(a.seed), "--use_cpu", "True",
        "--bf16", "False", "--gradient_checkpointing", "False",
    ]

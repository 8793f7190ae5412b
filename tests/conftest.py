"""Session fixtures: the real data in tests/fixtures/data, a LLaMA-layout sentencepiece tokenizer trained here
and a tiny random LLaVA saved to a temp dir, so LLaVA's real loading code runs (no hub, no GPU)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).resolve().parent / "fixtures" / "data"  # provenance and licences: its README.md


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real annotation data the tests share (COCO-mini annotations and 15 images, LLaVA-Bench boxes):
    tests/fixtures/data, in the repository. Read-only."""
    assert (DATA / "coco_mini" / "instances_val2017.json").is_file(), f"real test data missing from {DATA}"
    return DATA


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A slow LlamaTokenizer folder (vocab 1000, byte fallback) without GETok tokens."""
    from llava_getok.llava.tiny import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny random LLaVA (LLaMA hidden 64 x 2 layers, CLIP tower 32 px / 8 px patches) saved to disk.
    Treat as read-only: copy it before writing into it."""
    import torch

    torch.set_num_threads(2)
    from llava_getok.llava.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_getok_checkpoint(tmp_path_factory, tiny_llava_dir, shared_data) -> Path:
    """A GETok checkpoint of the tiny LLaVA trained by ``python -m llava_getok.train`` (a few steps on four COCO REC
    records, grid 8, one offset round, template getok_v1, pad frame): a folder with its sidecar, as users load one.
    The chat, web and model-worker tests share it. Read-only."""
    import subprocess
    import sys

    import llava_getok as gt
    from llava_getok.llava.tiny import make_grounding_data

    root = tmp_path_factory.mktemp("getok-ckpt")
    data = make_grounding_data(root / "data", shared_data / "coco_mini", gt.GETokConfig(grid=8), n_records=4)
    out = root / "tiny-llava-getok"
    argv = ["--model_name_or_path", str(tiny_llava_dir), "--version", "getok_v1", "--data_path", str(data),
            "--image_folder", str(data.parent / "images"), "--vision_tower", str(tiny_llava_dir / "vision_tower"),
            "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
            "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad", "--getok_grid", "8",
            "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2",
            "--learning_rate", "3e-3", "--save_strategy", "no", "--report_to", "none", "--model_max_length", "256",
            "--dataloader_num_workers", "0", "--seed", "0", "--disable_tqdm", "True", "--use_cpu", "True"]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "llava_getok.train", *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out

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

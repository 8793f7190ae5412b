"""Session fixtures: the real data in tests/fixtures/data, a LLaMA-layout sentencepiece tokenizer trained here
and a tiny random LLaVA saved to a temp dir, so LLaVA's real loading code runs (no hub, no GPU)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Each test process (and what it launches) gets its share of the cores: under pytest-xdist (scripts/test.sh runs two
# workers) two processes with a thread per core each would spin against each other on every tiny matmul.
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(THREADS)

@pytest.fixture(autouse=True)
def no_mixed_precision_after_the_test():
    """TrainingArguments writes its mixed precision into os.environ (ACCELERATE_MIXED_PRECISION), where every later
    Trainer of the process reads it even with --bf16 False: one bf16 run in this process (GRPO's CLI test) would run
    the next test's float32 trainings under bf16 autocast. Users run one training a process."""
    yield
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)


# The modules whose runs are longest go first, so that under pytest-xdist (one module per worker at a time) none of
# them is left to the end while the other worker idles; the order changes nothing else.
LONGEST_FIRST = ("test_recipes", "test_hf_train", "test_rl_grpo", "test_demo", "test_llava_train", "test_rl_hf",
                 "test_convert_property")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(getattr(getattr(item, "module", None), "__name__", ""), len(rank)))

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

    torch.set_num_threads(THREADS)
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
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "llava_getok.train", *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


# --- tiny transformers-native models of llava_getok.hf (Qwen2.5-VL, llava-hf), built offline; read-only ---

@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL (Qwen2 text 64 x 2 layers, ViT 32 wide, 8 px patches merged 2 x 2), its byte-level
    BPE tokenizer and processor, saved to disk."""
    from llava_getok.hf.tiny import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("models") / "tiny-qwen")


@pytest.fixture(scope="session")
def tiny_qwen_tied_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL with tied input and output embeddings (as Qwen2.5-VL-3B)."""
    from llava_getok.hf.tiny import TinyQwenConfig, build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("models") / "tiny-qwen-tied", TinyQwenConfig(tie=True))


@pytest.fixture(scope="session")
def tiny_llava_hf_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny random llava-hf (LLaMA 64 x 2 layers, CLIP 32 px / 8 px patches, LlavaImageProcessor(do_pad=True))."""
    from llava_getok.hf.tiny import build_tiny_llava_hf

    return build_tiny_llava_hf(tmp_path_factory.mktemp("models") / "tiny-llava-hf", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_grounding(tmp_path_factory, shared_data) -> dict:
    """Two GETok REC records of real COCO boxes (grid 8) per frame: "orig" (Qwen2.5-VL), "pad" (llava-hf)."""
    from hf_helpers import CFG

    from llava_getok.llava.tiny import make_grounding_data

    return {frame: make_grounding_data(tmp_path_factory.mktemp(frame), shared_data / "coco_mini", CFG, n_records=2,
                                       frame=frame) for frame in ("orig", "pad")}


@pytest.fixture(scope="session")
def hf_full_run(tiny_qwen_dir, hf_grounding, tmp_path_factory):
    """(trainer, output folder) of a 6-step full fine-tuning of the tiny Qwen2.5-VL (checkpoints at 3 and 6)."""
    from hf_helpers import train_argv, train_here

    out = tmp_path_factory.mktemp("hf-full") / "out"
    return train_here(train_argv(tiny_qwen_dir, hf_grounding["orig"], out)), out


@pytest.fixture(scope="session")
def hf_lora_run(tiny_llava_hf_dir, hf_grounding, tmp_path_factory):
    """(trainer, output folder) of a 6-step LoRA (r 8) training of the tiny llava-hf (checkpoints at 3 and 6)."""
    from hf_helpers import train_argv, train_here

    out = tmp_path_factory.mktemp("hf-lora") / "out"
    return train_here(train_argv(tiny_llava_hf_dir, hf_grounding["pad"], out, "--lora_enable", "True", "--lora_r", "8",
                                 "--lora_alpha", "16")), out


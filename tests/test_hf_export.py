"""``llava-getok export``: GETok checkpoints as standalone transformers folders, loaded in one fresh interpreter where
llava-getok cannot be imported at all: hf-backend checkpoints (llava-hf with LoRA merged; Qwen2.5-VL full) give the
trained model's logits, and a LLaVA 1.2.x GETok checkpoint becomes llava-hf with the LLaVA model's logits on a record,
its padded-square pixels and its training prompt."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hf_helpers import CFG, LOGIT_TOL, logits_of, probe

STANDALONE = r"""
import importlib.util, json, os, sys
# a clean interpreter: llava-getok is not importable (its paths and its editable install's finder are removed)
sys.path[:] = [p for p in sys.path if not p or not os.path.isdir(os.path.join(p, "llava_getok"))]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
assert importlib.util.find_spec("llava_getok") is None
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

jobs, tokens = json.loads(sys.argv[1]), sys.argv[2:]
seen = []
for folder, inputs, logits in jobs:
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    try:
        processor = type(AutoProcessor.from_pretrained(folder)).__name__
    except ImportError as e:  # Qwen2.5-VL's processor holds a video processor: transformers builds it with torchvision
        processor = "needs torchvision" if "Torchvision" in str(e) else repr(e)
    with torch.no_grad():
        torch.save(model(**torch.load(inputs)).logits, logits)
    seen.append({"model": type(model).__name__, "processor": processor,
                 "tokens": tokenizer.convert_tokens_to_ids(tokens), "do_pad": getattr(image_processor, "do_pad", None)})
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("llava_getok", "llava"))
print(json.dumps({"seen": seen, "imported": ours}))
"""


def torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA build beside a CPU torch fails with RuntimeError
        return False
    return True


def standalone(jobs: dict, tmp_path) -> dict:
    """{name: (what a fresh interpreter without llava-getok saw of the folder, the logits it computed on the inputs)}
    for ``jobs`` {name: (exported folder, model inputs)}, in one interpreter."""
    args = []
    for name, (folder, inputs) in jobs.items():
        torch.save(inputs, tmp_path / f"{name}.inputs.pt")
        args.append([str(folder), str(tmp_path / f"{name}.inputs.pt"), str(tmp_path / f"{name}.logits.pt")])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", STANDALONE, json.dumps(args), *CFG.tokens()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["imported"] == []  # nothing of llava-getok (nor LLaVA) was needed
    return {name: (info, torch.load(tmp_path / f"{name}.logits.pt").float()) for name, info in zip(jobs, out["seen"])}


@pytest.fixture(scope="module")
def llava_checkpoint(tiny_llava_dir, shared_data, tmp_path_factory):
    """A tiny LLaVA 1.2.x GETok checkpoint (2 steps of full fine-tuning with the GETok hooks, getok_v1), its data."""
    from test_llava_train import train_argv, train_in_process

    from llava_getok.llava.tiny import make_grounding_data

    data = make_grounding_data(tmp_path_factory.mktemp("llava-rec"), shared_data / "coco_mini", CFG, n_records=2)
    out = tmp_path_factory.mktemp("llava-getok") / "out"
    train_in_process(train_argv(tiny_llava_dir, data, out, "--save_strategy", "no", steps=2))
    return out, data


@pytest.fixture(scope="module")
def exported(hf_lora_run, hf_full_run, hf_grounding, llava_checkpoint, tmp_path_factory):
    """Every export, its inputs, and what the interpreter without llava-getok made of it."""
    from test_llava_train import load, probe_inputs

    from llava_getok.cli import main
    from llava_getok.hf.data import load_image
    from llava_getok.hf.family import load_processor
    from llava_getok.hf.generate import prompt_text

    root = tmp_path_factory.mktemp("exports")
    jobs, extra = {}, {}
    for name, (_, ckpt), frame in (("llava-hf", hf_lora_run, "pad"), ("qwen", hf_full_run, "orig")):
        assert main(["export", "--model-path", str(ckpt), "--out", str(root / name)]) == 0
        jobs[name] = (root / name, probe(load_processor(root / name), hf_grounding[frame]))
    ckpt, data = llava_checkpoint
    assert main(["export", "--model-path", str(ckpt), "--out", str(root / "from-llava"),
                 "--conv-mode", "getok_v1"]) == 0
    processor = load_processor(root / "from-llava")
    record = json.loads(data.read_text())[0]
    prompt = processor(text=[prompt_text(processor, record["conversations"][:1])],
                       images=[load_image(record, data.parent / "images")], return_tensors="pt")
    jobs["from-llava"] = (root / "from-llava",
                          {"input_ids": prompt["input_ids"], "pixel_values": prompt["pixel_values"]})
    tokenizer, llava, image_processor, _ = load(ckpt)
    ids, images = probe_inputs(tokenizer, image_processor, llava.config, data)  # LLaVA's own input path
    extra["llava"] = (processor, prompt, ids, images, logits_of(llava, {"input_ids": ids, "images": images}))
    return root, jobs, standalone(jobs, root), extra


def test_export_of_hf_checkpoints_loads_without_llava_getok(exported, hf_lora_run, hf_full_run):
    root, jobs, seen, _ = exported
    for name, (trainer, _), want in (("llava-hf", hf_lora_run, "LlavaProcessor"),
                                     ("qwen", hf_full_run, "Qwen2_5_VLProcessor")):
        info, logits = seen[name]
        assert info["tokens"] == trainer.getok.ids  # the GETok tokens, one id each, as trained
        assert info["processor"] == (want if torchvision_imports() or want == "LlavaProcessor" else "needs torchvision")
        assert (logits - logits_of(trainer.model, jobs[name][1])).abs().max() <= LOGIT_TOL
        assert info["do_pad"] is (True if name == "llava-hf" else None)
        assert not any(p.name.startswith("adapter") for p in (root / name).iterdir())  # LoRA merged: a plain model


def test_llava_checkpoint_exports_to_llava_hf_with_the_same_logits(exported, llava_checkpoint):
    root, _, seen, extra = exported
    processor, prompt, ids, images, want = extra["llava"]
    # the same pixels (LlavaImageProcessor(do_pad=True) is LLaVA's expand2square) and the same prompt: LLaVA's one
    # image token is llava-hf's run of image tokens
    assert torch.equal(prompt["pixel_values"], images)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    n_image = int((prompt["input_ids"] == image_id).sum())
    expanded = [t for i in ids[0].tolist() for t in ([image_id] * n_image if i < 0 else [i])]
    assert prompt["input_ids"][0].tolist() == expanded
    info, logits = seen["from-llava"]
    assert info["model"] == "LlavaForConditionalGeneration" and info["processor"] == "LlavaProcessor" and info["do_pad"]
    ckpt, _ = llava_checkpoint
    assert info["tokens"] == json.loads((ckpt / "getok_config.json").read_text())["token_ids"]
    vocab = want.shape[-1]  # llava-hf adds <image> after the GETok tokens: one more column, never generated
    assert logits.shape[-1] == vocab + 1 and (logits[..., :vocab] - want).abs().max() <= 1e-4
    exported_sidecar = json.loads((root / "from-llava" / "getok_config.json").read_text())
    assert exported_sidecar["backend"] == "hf" and exported_sidecar["model_family"] == "llava-hf"
    assert exported_sidecar["frame"] == "pad"


def test_export_refuses_what_llava_hf_cannot_hold(llava_checkpoint, tmp_path, capsys):
    from llava_getok.cli import main

    ckpt, _ = llava_checkpoint
    assert main(["export", "--model-path", str(ckpt), "--out", str(tmp_path / "x"), "--conv-mode", "mpt"]) == 1
    err = capsys.readouterr().err.strip()
    assert "only LLaVA's two-separator conversations" in err and "\n" not in err

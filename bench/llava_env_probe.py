"""What of LLaVA's own code runs in an environment, without llava_getok.register(): run it with that environment's
python to see what `pip install "llava-getok[llava,train]"` did to a LLaVA user's environment.

    PYTHON -m pip freeze > before.txt; PYTHON bench/llava_env_probe.py --models DIR    # LLaVA's pins
    PYTHON -m pip install "llava-getok[llava,train]"                                    # what a user would run
    PYTHON bench/llava_env_probe.py --models DIR [--fixes]                             # after; --fixes: with
                                                                                        # llava-getok's compat fixes
DIR holds a tiny LLaVA (``DIR/tiny-llava``) and a few records (``DIR/data/data.json``, ``DIR/data/images``), made
with the project's environment:

    python -c "from llava_getok.llava.tiny import *; from llava_getok import GETokConfig as C; \\
      build_tiny_llava('DIR/tiny-llava', train_tokenizer('DIR/tokenizer')); \\
      make_grounding_data('DIR/data', 'tests/fixtures/data/coco_mini', C(grid=8))"

Checks, each ok or the first error line: ``import llava.train.train`` (what ``train.py``/``train_mem.py`` do first);
LLaVA's builder and ``generate`` with an image (float32); ``python -m llava.serve.cli`` for one turn (LLaVA's float16
on the CPU); one step of ``python -m llava.train.train`` on the CPU (float32). Prints JSON; writes nothing else
outside /tmp. Results: bench/results/llava_env.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "peft", "bitsandbytes", "deepspeed", "numpy",
            "llava-torch", "llava-getok")
FIXES = "from llava_getok.llava.compat import apply_compat_fixes; apply_compat_fixes(); "


def _version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _python(code: str, stdin: str = "", timeout: int = 600):
    proc = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line and not line.startswith(" ")]
    return proc.returncode, (errors[-1] if errors else lines[-1] if lines else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--fixes", action="store_true", help="apply llava-getok's compat fixes first (no register())")
    a = ap.parse_args(argv)
    m, pre = a.models, FIXES if a.fixes else ""
    image = sorted(os.scandir(f"{m}/data/images"), key=lambda e: e.name)[0].path
    result = {"stack": {p: _version(p) for p in PACKAGES}, "compat fixes applied": a.fixes}

    result["import llava.train.train"] = _python(pre + "import llava.train.train")
    result["builder + generate with an image (float32)"] = _python(pre + f"""
import torch
from PIL import Image
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
tok, model, proc, _ = load_pretrained_model({m!r} + "/tiny-llava", None, "tiny-llava", device="cpu")
model = model.float(); model.get_vision_tower().to(torch.float32)
img = Image.open({image!r}).convert("RGB")
ids = tokenizer_image_token("USER: <image>\\nhello ASSISTANT:", tok, -200, return_tensors="pt")[None]
with torch.inference_mode():
    out = model.generate(ids, images=process_images([img], proc, model.config).float(), image_sizes=[img.size],
                         do_sample=False, max_new_tokens=4)
print("generated", out.shape[-1], "ids")""")
    result["python -m llava.serve.cli, one turn (float16 on the CPU)"] = _python(
        pre + f"import runpy, sys; sys.argv = ['cli', '--model-path', {m!r} + '/tiny-llava', '--image-file', {image!r}, "
        "'--device', 'cpu', '--max-new-tokens', '4']; runpy.run_module('llava.serve.cli', run_name='__main__')",
        stdin="hello\n")
    with tempfile.TemporaryDirectory() as out:
        args = ["--model_name_or_path", f"{m}/tiny-llava", "--version", "v1", "--data_path", f"{m}/data/data.json",
                "--image_folder", f"{m}/data/images", "--vision_tower", f"{m}/tiny-llava/vision_tower",
                "--mm_projector_type", "mlp2x_gelu", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token",
                "False", "--image_aspect_ratio", "pad", "--output_dir", out, "--max_steps", "1",
                "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
                "--model_max_length", "256", "--dataloader_num_workers", "0", "--use_cpu", "True",
                "--lazy_preprocess", "True"]
        result["llava.train.train.train(), one step on the CPU (float32)"] = _python(
            pre + f"import sys; sys.argv = ['train'] + {args!r}; from llava.train.train import train; train()")
    print(json.dumps({k: (v if not isinstance(v, tuple) else ("ok" if v[0] == 0 else f"exit {v[0]}: {v[1]}"))
                      for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

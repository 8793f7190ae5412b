"""patches/*.patch: unified diffs against the installed LLaVA 1.2.2 that only insert calls to the hooks."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PATCHES = sorted((Path(__file__).resolve().parents[1] / "patches").glob("*.patch"))


def llava_root() -> Path:
    import llava

    return Path(llava.__file__).resolve().parent.parent


def test_there_are_patches_and_they_only_insert_lines():
    assert {p.name for p in PATCHES} >= {"llava_train_train.patch", "llava_train_llava_trainer.patch",
                                         "llava_model_builder.patch"}
    for p in PATCHES:
        body = [line for line in p.read_text().splitlines() if not line.startswith(("---", "+++", "@@"))]
        assert not [line for line in body if line.startswith("-")], f"{p.name} removes lines"
        assert any(line.startswith("+") and "llava_getok" in line for line in body), p.name


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_applies_to_the_installed_llava(patch):
    out = subprocess.run(["patch", "--dry-run", "-p1", "-d", str(llava_root()), "-i", str(patch)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_patched_llava_imports_then_register_reports_once(tmp_path):
    """In a fresh process (one subprocess serves both checks): unpatched, `import llava.train.train` fails on
    transformers >= 4.53 (ALL_LAYERNORM_LAYERS moved); patched, it imports. register() then reports what it
    changed, and a second call reports nothing."""
    shutil.copytree(llava_root() / "llava", tmp_path / "llava", ignore=shutil.ignore_patterns("__pycache__"))
    for p in PATCHES:
        out = subprocess.run(["patch", "-p1", "-d", str(tmp_path), "-i", str(p)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    code = ("import json, inspect, llava, llava.train.train as t; assert llava.__file__.startswith(%r); "
            "assert 'llava_getok.register()' in inspect.getsource(t.train); "
            "import llava_getok as gt, llava.model.builder as mb; a = gt.register(); b = gt.register(); "
            "print(json.dumps([a.compat_fixes, len(a.templates), a.builder_hook, a.trainer_hook, b.changed, "
            "t.LLaVATrainer.__name__, mb.load_pretrained_model.__getok_hook__]))" % str(tmp_path))
    env_path = f"{tmp_path}:{Path(__file__).resolve().parents[1]}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    fixes, n_templates, builder, trainer, changed_again, cls, hooked = json.loads(out.stdout.strip().splitlines()[-1])
    # what this stack (transformers 4.57, deepspeed installed) needs; layernorm_name came with the patch
    assert {"cache_position", "bnb_kwargs", "head_unquantised", "sampler_arg", "generate_input_ids",
            "checkpoint_metrics"} <= set(fixes) and "layernorm_name" not in fixes
    assert "lazy_deepspeed" not in fixes and ("cuda_sync" in fixes) == (not torch.cuda.is_available())
    assert n_templates >= 16 and builder and trainer and not changed_again
    assert cls == "GETokTrainer" and hooked

"""patches/*.patch: unified diffs against the installed LLaVA 1.2.2 that only insert calls to the hooks."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_patched_llava_imports_its_trainer_on_current_transformers(tmp_path):
    """Unpatched, `import llava.train.train` fails on transformers >= 4.53 (ALL_LAYERNORM_LAYERS moved)."""
    shutil.copytree(llava_root() / "llava", tmp_path / "llava", ignore=shutil.ignore_patterns("__pycache__"))
    for p in PATCHES:
        out = subprocess.run(["patch", "-p1", "-d", str(tmp_path), "-i", str(p)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    code = ("import llava, llava.train.train as t; assert llava.__file__.startswith(%r); "
            "import inspect; assert 'llava_getok.register()' in inspect.getsource(t.train); print('ok')" % str(tmp_path))
    env_path = f"{tmp_path}:{Path(__file__).resolve().parents[1]}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

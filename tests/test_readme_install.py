"""The README's install lines, run as written: a fresh virtual environment, the wheel built from a copy of the
checkout, installed with its extras under the pinned constraints, LLaVA in its own step, then the recipes written.

Marked ``wheel`` (``pytest -m "not wheel"`` leaves it out). One thing is added to the lines: once the environment
exists, the pinned stack already installed here is made visible to it (a ``.pth`` file, as in test_wheel.py), so that
pip resolves ``[llava,train,masks]`` against the pinned versions already present instead of downloading several GB of
CUDA wheels on every run; pip uses the package index for nothing else than the wheel's build requirements.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.wheel


def install_lines() -> list[str]:
    """The command lines of the README's "Install beside an existing LLaVA" block, comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Install beside an existing LLaVA"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].rstrip() for line in block.splitlines() if line.strip()]


def test_the_readme_install_lines_run_as_written(tmp_path):
    lines = install_lines()
    assert lines[0].startswith("python -m venv ~/venvs/llava-getok") and lines[-1] == "llava-getok recipes --out recipes/"
    assert any("pip wheel" in line for line in lines) and any("-c requirements/constraints.txt" in line for line in lines)
    clone = tmp_path / "llava-getok"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "__pycache__", "*.egg-info", ".hypothesis", ".pytest_cache",
        "downloads"))
    home = tmp_path / "home"
    home.mkdir()
    stack = tmp_path / "stack"  # this environment's packages, less the checkout's own (editable) llava-getok
    stack.mkdir()
    for folder in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        for entry in Path(folder).iterdir():
            if "getok" not in entry.name.lower() and not entry.name.endswith(".pth"):
                (stack / entry.name).symlink_to(entry)
    site = "$(python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
    expose = f"echo {stack} > \"{site}/zz_pinned_stack.pth\""
    script = [lines[0], expose, *lines[1:]]  # the stack, visible once the environment exists
    env = {**{k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in ("http_proxy", "https_proxy")},
           "HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Downloading torch" not in proc.stdout + proc.stderr  # the pinned stack satisfied every requirement
    venv = home / "venvs" / "llava-getok"
    installed = subprocess.run([venv / "bin" / "python", "-c", "import llava_getok, sys; print(llava_getok.__file__)"],
                               capture_output=True, text=True, env={**env, "PATH": str(venv / "bin")}, cwd=home)
    assert str(venv) in installed.stdout, installed  # the wheel in the new environment, not the checkout
    assert (clone / "recipes" / "finetune_getok.sh").is_file() and (clone / "recipes" / "zero3.json").is_file()

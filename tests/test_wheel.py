"""The wheel stands alone: built from a copy of the repository (directly and through an sdist), installed into a
fresh virtual environment outside the checkout, it runs ``llava-getok --help`` and ``convert-datasets --list``,
and ``llava-getok recipes --out DIR`` writes the training recipes, the DeepSpeed configs and the LLaVA patches.

Marked ``wheel`` (about a minute; ``pytest -m "not wheel"`` leaves it out). Offline: the builds use this
environment's setuptools (no build isolation) and the fresh environment holds only the wheel, with this
environment's site-packages (the pinned stack, requirements/constraints.txt) appended to its path by a ``.pth``
file, and the stack's commands (``deepspeed``, ``torchrun``, ...) written into its ``bin/`` as pip writes them;
pip then confirms, with no index, that the pinned stack satisfies ``llava-getok[llava,train]``. (A full install
of the stack from PyPI would download a CUDA torch of several GB on every run.)
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["finetune_getok.sh", "finetune_getok_lora.sh", "grpo_getok.sh", "finetune_getok_qwen.sh", "grpo_getok_qwen.sh",
           "zero2.json", "zero3.json"]
PATCHES = sorted(p.name for p in (REPO / "patches").glob("*.patch"))
pytestmark = pytest.mark.wheel


def run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def pip(*args, cwd):
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_FIND_LINKS", None)
    return run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel built from the source tree, wheel built from the sdist of that tree)."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "__pycache__", "*.egg-info", ".hypothesis", ".pytest_cache",
        "downloads"))
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "direct", src, cwd=tmp)
    sdist = run([sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp / 'sdist')!r}))"],
                cwd=src).stdout.split()[-1]
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "from_sdist", tmp / "sdist" / sdist, cwd=tmp)
    return next((tmp / "direct").glob("*.whl")), next((tmp / "from_sdist").glob("*.whl"))


@pytest.fixture(scope="module")
def fresh(built, tmp_path_factory):
    """A fresh virtual environment outside the checkout with the wheel installed; returns (venv, env, cwd)."""
    root = tmp_path_factory.mktemp("fresh")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    py = venv / "bin" / "python"
    pip("--python", py, "install", "-q", "--no-deps", built[0], cwd=root)
    site = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    stack = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "zz_pinned_stack.pth").write_text("\n".join(sorted(stack)) + "\n")  # after the wheel's own folder
    # the stack's commands (deepspeed, torchrun, ...), their first line pointing at the fresh interpreter as
    # pip writes it when it installs them
    for script in Path(sys.executable).parent.iterdir():
        mine = venv / "bin" / script.name
        if script.is_file() and not mine.exists() and script.read_bytes()[:64].startswith(b"#!" + sys.executable.encode()):
            mine.write_text(f"#!{py}\n" + script.read_text().split("\n", 1)[1])
            mine.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    return venv, env, root


def test_the_wheel_holds_the_code_and_the_recipes_and_the_sdist_builds_the_same_wheel(built):
    direct, from_sdist = (sorted(zipfile.ZipFile(w).namelist()) for w in built)
    assert direct == from_sdist
    data = [n for n in direct if n.startswith("llava_getok/recipe_files/")]
    assert sorted(data) == sorted([f"llava_getok/recipe_files/{n}" for n in RECIPES]
                                  + [f"llava_getok/recipe_files/patches/{n}" for n in PATCHES])
    # pyproject.toml lists the packages: every package of the tree must be in the wheel
    packages = {str(p.parent.relative_to(REPO)) for top in ("llava_getok", "data_converters")
                for p in (REPO / top).rglob("__init__.py")}
    assert packages and {p for p in packages if f"{p}/__init__.py" not in direct} == set()
    modules = {str(p.relative_to(REPO)) for top in ("llava_getok", "data_converters") for p in (REPO / top).rglob("*.py")}
    assert modules <= set(direct)
    assert not [n for n in direct if n.startswith(("tests/", "scripts/", "bench/"))]


def test_the_installed_wheel_runs_its_commands_and_writes_the_recipes_outside_the_checkout(built, fresh, tmp_path):
    venv, env, cwd = fresh
    py = venv / "bin" / "python"
    where = run([py, "-c", "import llava_getok, data_converters; print(llava_getok.__file__, data_converters.__file__)"],
                cwd=cwd, env=env).stdout
    assert str(REPO) not in where and where.count(str(venv)) == 2  # the wheel's code, not the checkout's
    # the pinned stack satisfies the wheel's [llava,train] requirements: pip has nothing to install
    report = json.loads(pip("--python", py, "install", "--dry-run", "--quiet", "--report", "-", "-c",
                            REPO / "requirements" / "constraints.txt", f"{built[0]}[llava,train]", cwd=cwd).stdout)
    assert report["install"] == []

    assert "recipes" in run([venv / "bin" / "llava-getok", "--help"], cwd=cwd, env=env).stdout
    assert "refcoco" in run([venv / "bin" / "convert-datasets", "--list"], cwd=cwd, env=env).stdout
    out = tmp_path / "my recipes"  # a space: the scripts quote their paths
    printed = run([venv / "bin" / "llava-getok", "recipes", "--out", out], cwd=cwd, env=env).stdout
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(RECIPES + [f"patches/{n}" for n in PATCHES])
    assert all(f"wrote {out / name}" in printed for name in written)
    for name in written:  # the very files of the repository
        source = REPO / ("scripts" if "/" not in name else "") / name
        assert (out / name).read_bytes() == source.read_bytes(), name
        assert os.access(out / name, os.X_OK) == name.endswith(".sh"), name
    usage = run(["bash", out / "finetune_getok.sh", "--help"], cwd=cwd, env=env).stdout
    assert "DATA_PATH" in usage and "zero3.json beside this script" in usage
    assert "QLoRA" in run(["bash", out / "finetune_getok_lora.sh", "--help"], cwd=cwd, env=env).stdout
    assert "refine" in run(["bash", out / "grpo_getok.sh", "--help"], cwd=cwd, env=env).stdout
    assert "Qwen2.5-VL-7B-Instruct" in run(["bash", out / "finetune_getok_qwen.sh", "--help"], cwd=cwd, env=env).stdout
    assert "grpo_getok.sh" in run(["bash", out / "grpo_getok_qwen.sh", "--help"], cwd=cwd, env=env).stdout
    # a second run leaves a file the user changed alone, and says so
    (out / "zero2.json").write_text("{}")
    proc = subprocess.run([venv / "bin" / "llava-getok", "recipes", "--out", out], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "kept" in proc.stderr and (out / "zero2.json").read_text() == "{}"


def test_a_written_recipe_trains_a_step_on_cpu(fresh, tiny_llava_dir, shared_data, tmp_path):
    from llava_getok.llava.tiny import make_grounding_data
    from llava_getok.vocab import GETokConfig

    venv, env, cwd = fresh
    recipes = tmp_path / "recipes"
    run([venv / "bin" / "llava-getok", "recipes", "--out", recipes], cwd=cwd, env=env)
    data = make_grounding_data(tmp_path / "data", shared_data / "coco_mini", GETokConfig(grid=8), n_records=2)
    out = tmp_path / "out"
    env = dict(env, DEVICE="cpu", NUM_GPUS="1", MODEL_BASE=str(tiny_llava_dir), PROJECTOR="",
               VISION_TOWER=str(tiny_llava_dir / "vision_tower"), DATA_PATH=str(data),
               IMAGE_FOLDER=str(data.parent / "images"), OUTPUT_DIR=str(out), BATCH="2", WORKERS="0", MAX_LEN="256",
               GRID="8", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run(["bash", recipes / "finetune_getok.sh", "--max_steps", "1", "--save_strategy", "no"], cwd=cwd, env=env,
        timeout=500)
    assert (out / "getok_config.json").is_file() and (out / "getok_rows.safetensors").is_file()

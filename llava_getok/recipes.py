"""``llava-getok recipes --out DIR``: write the training recipes that ship in the package into DIR.

    llava-getok recipes --out my_recipes [--force]

Writes the launch scripts (``finetune_getok.sh``, ``finetune_getok_lora.sh``, ``grpo_getok.sh``; for Qwen2.5-VL
``finetune_getok_qwen.sh``, ``grpo_getok_qwen.sh``), the DeepSpeed
configs they default to (``zero2.json``, ``zero3.json``; the scripts look for them beside themselves) and
``patches/*.patch`` (unified diffs against LLaVA 1.2.2 for people who keep a fork), and prints each path written.
Then, for example: ``DATA_PATH=... IMAGE_FOLDER=... bash my_recipes/finetune_getok.sh`` (``--help`` lists the
settings). A file that exists with other contents is left alone and named, unless ``--force``.

The files are the repository's ``scripts/`` and ``patches/``, mapped into the wheel as the data package
``llava_getok.recipe_files`` (pyproject.toml); from a checkout (an editable install included) they are read there.
"""
from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path

from .atomic import _umask, atomic_path

SCRIPTS = ("finetune_getok.sh", "finetune_getok_lora.sh", "grpo_getok.sh", "finetune_getok_qwen.sh", "grpo_getok_qwen.sh")
CONFIGS = ("zero2.json", "zero3.json")


def recipe_files() -> dict[str, bytes]:
    """{relative path in DIR: contents} of every recipe file: the scripts, the configs, ``patches/*.patch``."""
    try:  # installed from a wheel or an sdist
        scripts = importlib.resources.files("llava_getok.recipe_files")
        patches = scripts / "patches"
    except ModuleNotFoundError:  # a checkout, installed editable (which does not map these folders) or not at all
        root = Path(__file__).resolve().parents[1]
        scripts, patches = root / "scripts", root / "patches"
    files = {name: (scripts / name).read_bytes() for name in (*SCRIPTS, *CONFIGS)}
    for patch in sorted(p.name for p in patches.iterdir() if p.name.endswith(".patch")):
        files[f"patches/{patch}"] = (patches / patch).read_bytes()
    return files


def write_recipes(out: Path, force: bool = False) -> tuple[list[Path], list[Path]]:
    """Write the recipe files into ``out`` (atomically; scripts executable). Returns (written, kept): files
    that already held the same bytes count as written; files with other contents are kept unless ``force``."""
    written, kept = [], []
    for rel, data in recipe_files().items():
        path = out / rel
        if path.exists() and not force and path.read_bytes() != data:
            kept.append(path)
            continue
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        if rel.endswith(".sh"):
            path.chmod(0o777 & ~_umask())
        written.append(path)
    return written, kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-getok recipes", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", type=Path, required=True, help="folder to write the recipes into (created)")
    p.add_argument("--force", action="store_true", help="overwrite files that exist with other contents")
    a = p.parse_args(argv)
    written, kept = write_recipes(a.out, a.force)
    for path in written:
        print(f"wrote {path}")
    for path in kept:
        print(f"kept {path}: it exists with other contents (--force overwrites it)", file=sys.stderr)
    if kept:
        return 1
    print(f"{len(written)} files in {a.out}; start with: bash {a.out / 'finetune_getok.sh'} --help")
    return 0


if __name__ == "__main__":
    sys.exit(main())

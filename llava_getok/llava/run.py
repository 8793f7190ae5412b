"""``python -m llava_getok.llava.run MODULE [ARGS ...]``: one of LLaVA's own entry points, run as
``python -m MODULE ARGS ...`` runs it, after ``llava_getok.register()`` (the compat fixes for the current stack, the
``getok_*`` templates, and the builder hook that loads GETok checkpoints from their ``getok_config.json``).

    python -m llava_getok.llava.run llava.serve.cli --model-path CKPT --image-file IMG --conv-mode getok_v1
    python -m llava_getok.llava.run llava.serve.model_worker --model-path CKPT ...   (needs the serve extra)
    python -m llava_getok.llava.run llava.eval.model_vqa --model-path CKPT ... --conv-mode getok_v1

LLaVA's scripts pick the template from the folder name: give a GETok checkpoint the one it was trained with.
"""
from __future__ import annotations

import runpy
import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    from . import register

    register()
    sys.argv = argv  # the module sees its own arguments, as under python -m
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Create .venv (if missing) and install llava-getok with the pinned stack (requirements/constraints.txt).
# LLaVA (llava-torch) goes in its own --no-deps step: as an ordinary dependency it downgrades torch & co.
# Usage: bash scripts/setup_env.sh            (EXTRAS=all by default; VENV=.venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-all}
LLAVA_SPEC=${LLAVA_SPEC:-llava-torch==1.2.2.post1}
stamp="$VENV/.getok-installed"
want="$(cat pyproject.toml requirements/constraints.txt | sha1sum | cut -c1-12)-$EXTRAS-$LLAVA_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
# torch first, alone: where a CPU wheel of this version lies on disk pip takes it instead of a CUDA build.
$PIP install -q -c requirements/constraints.txt torch 2>&1 | grep -v "is ignored" || true
$PIP install -q -c requirements/constraints.txt -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
$PIP install -q --no-deps "$LLAVA_SPEC" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import llava_getok, llava, torch, transformers; print('llava-getok env ready: torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"

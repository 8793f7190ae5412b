#!/usr/bin/env bash
# Create .venv (if missing) and install llava-getok with the pinned stack (requirements/constraints.txt).
# LLaVA (llava-torch) goes in its own --no-deps step: as an ordinary dependency it downgrades torch & co.
# A failing step stops the script with pip's own message and exit status.
# Usage: bash scripts/setup_env.sh            (EXTRAS=all by default, with web and serve; VENV=.venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-all}
LLAVA_SPEC=${LLAVA_SPEC:-llava-torch==1.2.2.post1}
DOWNLOADS=tests/fixtures/downloads  # test inputs fetched from PyPI, never installed (git-ignored)
stamp="$VENV/.getok-installed"
want="$(cat pyproject.toml requirements/constraints.txt | sha1sum | cut -c1-12)-$EXTRAS-$LLAVA_SPEC"

# pip with the "Location ... is ignored" notices filtered out (pip configs that list local indexes print one per
# package); pipefail keeps pip's exit status, the filter never adds one of its own.
pip_step() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored" || true; }; }

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  pip_step install -q --upgrade pip setuptools wheel
  # torch first, alone: where a CPU wheel of this version lies on disk pip takes it instead of a CUDA build.
  pip_step install -q -c requirements/constraints.txt torch
  pip_step install -q -c requirements/constraints.txt -e ".[$EXTRAS]"
  pip_step install -q --no-deps "$LLAVA_SPEC"
  "$VENV/bin/python" -c "import llava_getok, llava, torch, transformers; print('llava-getok env ready: torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "$want" > "$stamp"
fi

# The browser test (tests/test_web.py) drives Debian's chromium through Debian's chromedriver (no browser download is
# possible or wanted): installed with apt-get when missing; where apt-get cannot run (not root, not Debian) the test
# is skipped and says why.
case ",$EXTRAS," in
  *,all,*|*,test,*)
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
      if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing chromium and chromium-driver (apt-get) for the browser test"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
      else
        echo "setup_env: chromium / chromedriver missing and apt-get unavailable here (needs root on Debian):" \
             "tests/test_web.py's browser test will be skipped" >&2
      fi
    fi ;;
esac

# The real 32,000-piece LLaMA-layout sentencepiece model for tests/test_legacy_tokenizer.py ships in the
# mistral_common wheel (Apache-2.0): downloaded, read from the zip, never installed (it pins numpy < 2.4).
case ",$EXTRAS," in
  *,all,*|*,test,*)
    if ! compgen -G "$DOWNLOADS/mistral_common-*.whl" >/dev/null; then
      pip_step download -q --no-deps -c requirements/constraints.txt -d "$DOWNLOADS" mistral_common
    fi ;;
esac

#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs .venv if needed, then pytest (CPU, < 10 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"

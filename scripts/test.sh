#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs .venv if needed, then pytest (CPU, < 10 min).
# Two pytest-xdist workers, one test module each at a time (--dist loadscope keeps a module's fixtures in one
# process): most of a test's time is single-threaded (imports, process start-up, tokenisation), so two share two cores
# (tests/conftest.py gives each worker its share of the threads). TEST_WORKERS=0 runs everything in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
workers=${TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadscope "$@"

#!/usr/bin/env bash
# The main job end to end on a CPU, no GPU and no downloaded weights: draw the `shapes` dataset, convert it,
# build a tiny random LLaVA, fine-tune it with `python -m llava_getok.train`, predict with constrained
# decoding, evaluate (Acc@0.5 next to chance levels) and draw a contact sheet (runs/demo/contact_sheet.png).
# Usage: bash scripts/demo.sh [llava-getok demo options, e.g. --steps 4000 --out runs/demo2]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/llava-getok demo "$@"

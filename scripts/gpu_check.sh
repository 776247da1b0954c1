#!/usr/bin/env bash
# The GPU check: Triton kernels compiled on the GPU against the reference, the attention
# benchmark at 4k-32k, the small preset trained with landmark vs full attention (bf16, tokens/s), a
# landmark fine-tune of a SmolLM2-135M-shaped model (random weights), its long-context reading on the GPU
# against the CPU; JSON under $OUT; 560 s at most.
#   bash scripts/gpu_check.sh                  # on the GPU machine (nothing is downloaded)
#   bash scripts/gpu_check.sh --smoke          # on a CPU: tiny sizes, Triton interpreted (CI runs this)
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh
# Other options (--out DIR, --work DIR, --steps ...) go to scripts/gpu_check.py; see its docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
smoke="${GPU_CHECK_SMOKE:-0}"
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done
# The project without its dependencies (the machine has them and cannot download): an editable install
# where pip can do it offline, else the source tree on PYTHONPATH (gpu_check.py puts it there anyway).
if [ "$smoke" != 1 ] && ! "$PYTHON" -c "import landmark" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || echo "gpu_check: pip install -e . failed; running from the source tree (PYTHONPATH)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"

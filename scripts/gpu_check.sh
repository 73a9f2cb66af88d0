#!/usr/bin/env bash
# The device check (bench/gpu.py): every family's real-config fixture, load + probe suite (ids vs fp32) + every
# intervention (trace vs plain hooks) + generation + results on CPU + peak memory and time per image; one table.
# On a GPU machine: run it with the Python that has your CUDA torch, e.g.  PYTHON=python bash scripts/gpu_check.sh
# Without PYTHON it uses (and if needed creates) the project's CPU venv and runs the smaller CPU variant.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  bash scripts/setup.sh
  PYTHON=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PYTHON" bench/gpu.py "$@"

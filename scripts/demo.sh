#!/usr/bin/env bash
# The main job: installs what it needs, then runs the demo on the embedded default model (no download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
exec .venv/bin/mech-vtokens demo "$@"

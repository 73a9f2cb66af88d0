#!/usr/bin/env bash
# The project's test command: installs what it needs (scripts/setup.sh), lints (ruff), then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
# lint first (config: [tool.ruff] in pyproject.toml): a violation fails the run before the tests
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Set up, lint, then run the whole test suite (unit + end-to-end through the real nnU-Net CLIs, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -q -p no:cacheprovider --durations=15 "$@"

#!/usr/bin/env bash
# Set up, then run the demo: synthetic dataset -> plan/preprocess -> supervised vs Mean Teacher -> Dice table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
nnssl_demo --overwrite "$@"

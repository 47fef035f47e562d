#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install nnssl with its test tools.
# torch/torchvision first, pinned to the releases nnunetv2 2.8 is tested with here (pip takes them from the
# local wheel cache when one exists); then nnssl, which pulls nnunetv2 2.8.x and the rest from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
python -m pip install -q -e ".[test]"

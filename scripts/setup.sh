#!/usr/bin/env bash
# Set up .venv with spkv and its dependencies. Idempotent; needs only Python >= 3.10.
# torch is installed first and pinned (CPU build 2.13.0 by default): an unpinned torch would pull
# several GB of CUDA packages. On a GPU machine, install the torch build you want beforehand
# (or set SPKV_TORCH_VERSION) and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q "torch==${SPKV_TORCH_VERSION:-2.13.0}"
pip install -q -e ".[dev]"

#!/usr/bin/env bash
# The test suite (CPU, tiny random models, no downloads), slow tests included: pyproject's addopts
# deselects them by default, `-m 'slow or not slow'` selects every test. Extra arguments go to pytest
# (a later -m replaces this one, e.g. `scripts/test.sh -m 'not slow'` for the fast ones only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -m 'slow or not slow' "$@"

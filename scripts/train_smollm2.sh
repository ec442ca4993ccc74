#!/usr/bin/env bash
# The shipped SmolLM2-135M adapters, each with its dense control trained on the same tokens in the
# same data order (scripts/train_long_smollm2.sh, one run after another at one thread; ~35 min per
# 327k-token run, ~2.2 h per 1.3M-token run on a 2-core CPU with native bf16; its RUNS= trains the two
# of a pair at once, one per core), copied into adapters/:
# - adapters/smollm2-135m-{spkv,control}: the reg35 recipe on 327,680 tokens (issue 4);
# - adapters/smollm2-135m-{spkv,control}-1.3m: density target 0.25 on 1,310,720 tokens (issue 16).
# The earlier 164k-token recipe (reg25) is `bash scripts/train_adapter_pair.sh smollm2-135m smollm2`;
# results/train/options/ compares them.
set -euo pipefail
cd "$(dirname "$0")/.."
SHIP='adapters/smollm2-135m-{}' bash scripts/train_long_smollm2.sh
TOKENS=1310720 DENSITY=0.25 SHIP='adapters/smollm2-135m-{}-1.3m' bash scripts/train_long_smollm2.sh

#!/usr/bin/env bash
# The shipped SmolLM2-135M adapter and its dense control (~25 min per run on a 2-core CPU with
# native bf16; ~40 min in fp32 on one without), in runs/smollm2-spkv and runs/smollm2-control.
exec bash "$(dirname "$0")/train_adapter_pair.sh" smollm2-135m smollm2

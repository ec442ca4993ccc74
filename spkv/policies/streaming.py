"""StreamingLLM: sinks + the local window, nothing else (run it with sinks=4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class StreamingLLM(ScoringPolicy):
    name = "streaming"

    def score_new(self, keys, values, gate_logits):
        return torch.full(keys.shape[:3], float("-inf"), device=keys.device)

"""Keep every pair: a full cache under the same machinery (the quality reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class KeepAll(ScoringPolicy):
    name = "keep_all"

    def score_new(self, keys, values, gate_logits):
        return torch.full(keys.shape[:3], float("inf"), device=keys.device)

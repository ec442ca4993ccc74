"""Key norm: low-norm keys tend to draw attention, so the score is minus the key's L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class KeyNorm(ScoringPolicy):
    name = "key_norm"

    def score_new(self, keys, values, gate_logits):
        return -keys.float().norm(dim=-1)

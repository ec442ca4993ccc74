"""Key norm: low-norm keys tend to draw attention, so the score is minus the key's L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ScoringPolicy


@dataclass
class KeyNorm(ScoringPolicy):
    name = "key_norm"

    def score_new(self, keys, values, gate_logits):
        return -keys.float().norm(dim=-1)

"""H2O: a pair's score is the attention it has received so far (summed over queries and heads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class H2O(ScoringPolicy):
    name = "h2o"
    needs_attention = True

    def score_new(self, keys, values, gate_logits):
        return torch.zeros(keys.shape[:3], device=keys.device)

    def observe(self, scores, probs):
        return scores + probs.sum(dim=(2, 3))

"""TOVA-style: a pair's score is the attention of the latest query (averaged over the group's heads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class TOVA(ScoringPolicy):
    name = "tova"
    needs_attention = True

    def score_new(self, keys, values, gate_logits):
        return torch.zeros(keys.shape[:3], device=keys.device)

    def observe(self, scores, probs):
        return probs[:, :, :, -1].mean(dim=2)

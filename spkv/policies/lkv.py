"""LKV: the learned token scorer's score (spkv.lkv.TokenScorer), fixed when the pair is written; the
cache keeps each head's best pairs under its learned budget (SPKVCache's eviction mode)."""

from __future__ import annotations

from dataclasses import dataclass

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class LKVPolicy(ScoringPolicy):
    threshold: float | None = None  # unused: an LKV cache evicts under a budget, it has no threshold
    name = "lkv"

    def score_new(self, keys, values, gate_logits):
        if gate_logits is None:
            raise RuntimeError("The LKV policy needs the scores of an LKV model's token scorer (spkv.lkv).")
        return gate_logits.float().transpose(1, 2)

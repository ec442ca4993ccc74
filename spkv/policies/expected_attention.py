"""Expected Attention (kvpress): score a pair by the attention that future queries are expected to
give it, with queries modelled as a Gaussian fitted to the most recent ones.

For q ~ N(mu, Sigma), E[exp(s q.k)] = exp(s mu.k + s^2/2 k^T Sigma k), so the expected attention
logit of key k is z = s mu.k + s^2/2 k^T Sigma k; scores are softmax(z) over the window's pairs,
(+ eps) times ||v|| (as kvpress does), averaged over the group's query heads. The score is
recomputed at every step and decides when the pair leaves the window. Documented simplification:
the statistics are those of the post-RoPE queries of the last `window` positions (kvpress
re-rotates pre-RoPE statistics to the next positions instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class ExpectedAttention(ScoringPolicy):
    name = "expected_attention"
    needs_queries = True
    epsilon: float = 0.02

    def score_new(self, keys, values, gate_logits):
        return torch.zeros(keys.shape[:3], device=keys.device)

    def observe_queries(self, scores, keys, values, queries, scaling):
        q = queries.float()  # [B, Hkv, G, Q, D]
        if q.shape[3] < 2:  # no covariance from one query yet: keep the pairs undecided-high
            return torch.full_like(scores, float("inf"))
        k = keys.float().unsqueeze(2)  # [B, Hkv, 1, R, D]
        mu = q.mean(dim=3)  # [B, Hkv, G, D]
        centred = q - mu.unsqueeze(3)
        sigma = centred.transpose(-1, -2) @ centred / (q.shape[3] - 1)  # [B, Hkv, G, D, D]
        z = scaling * (k @ mu.unsqueeze(-1)).squeeze(-1) + 0.5 * scaling**2 * ((k @ sigma) * k).sum(-1)  # [B, Hkv, G, R]
        expected = torch.softmax(z, dim=-1).mean(dim=2)  # [B, Hkv, R]
        return (expected + self.epsilon) * values.float().norm(dim=-1)

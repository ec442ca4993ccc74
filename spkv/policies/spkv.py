"""SP-KV: the learned utility u = sigmoid(predictor logit), fixed when the pair is written."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class SPKVPolicy(ScoringPolicy):
    threshold: float | None = None  # None: follow the model's tau (spkv.set_threshold)
    name = "spkv"

    def score_new(self, keys, values, gate_logits):
        if gate_logits is None:
            raise RuntimeError("The SP-KV policy needs gate logits: use it with a model converted by spkv.convert().")
        return torch.sigmoid(gate_logits.float()).transpose(1, 2)

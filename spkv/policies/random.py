"""Random scores in [0, 1): keeps a fraction 1 - threshold; also how benchmarks force a density."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class RandomPolicy(ScoringPolicy):
    name = "random"
    seed: int = 0
    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def score_new(self, keys, values, gate_logits):
        if self._generator is None:
            self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.rand(keys.shape[:3], generator=self._generator).to(keys.device)

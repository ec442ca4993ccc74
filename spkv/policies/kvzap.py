"""KVzap-style surrogate: the score is a fitted regressor's predicted log importance, fixed when the
pair is written. The regressors must sit in the model's predictor slots (spkv.eval.kvzap.installed)."""

from __future__ import annotations

from dataclasses import dataclass

from spkv.policies.base import ScoringPolicy, register_policy


@register_policy
@dataclass
class KVzap(ScoringPolicy):
    name = "kvzap"

    def score_new(self, keys, values, gate_logits):
        if gate_logits is None:
            raise RuntimeError("The kvzap policy needs the regressors' scores: evaluate inside spkv.eval.kvzap.installed(model, regressors).")
        return gate_logits.float().transpose(1, 2)

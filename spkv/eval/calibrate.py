"""Calibrating a scoring policy's threshold to a target density: the rule that puts every method at
the same density before comparing quality (protocols.md: within 1 point)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from spkv.data.heldout import HeldoutSet
from spkv.eval.nll import NLLResult, nll_with_policy
from spkv.policies import POLICIES, ScoringPolicy

# Methods with no threshold to calibrate: they are reported at the density they have (lkv: at its
# budget r, which it keeps by construction; give it with --threshold lkv=R).
UNMATCHED = {"streaming", "keep_all", "lkv"}


@dataclass
class MatchSettings:
    tolerance: float = 0.01  # |density - target|, absolute (protocols.md: within 1 point)
    calibration_sequences: int = 4  # calibrate on the first documents, then confirm on all
    max_iterations: int = 6
    chunk: int = 32  # prefill chunk of the attention-based baselines (approximate: error measured)
    exact_chunk: int = 512  # prefill chunk of the write-time baselines (exact at any chunk)
    exactness_sequences: int = 1  # documents re-run token by token for attention-based policies
    exactness_tokens: int = 1024  # ... on their first tokens (token by token is slow on CPU)
    sinks: int = 4
    seed: int = 0
    score: bool = True  # False: calibrate on density alone (no NLL; much faster for large vocabularies)


@dataclass
class Calibration:
    threshold: float
    density: float  # on the calibration documents
    history: list[tuple[float, float]] = field(default_factory=list)  # (threshold, density) tried
    result: NLLResult | None = field(default=None, repr=False)  # the run at `threshold`

    def summary(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "density": self.density, "history": self.history}


def _recording(policy: ScoringPolicy) -> tuple[ScoringPolicy, list[torch.Tensor]]:
    """A copy of `policy` that also records the scores pairs have when they are decided.

    Write-time policies: every new score. Attention-based ones: the oldest window scores after each
    observe (the pairs about to leave). Used only to guess the next threshold; the density itself is
    always measured by the cache."""
    seen: list[torch.Tensor] = []
    rec = copy.copy(policy)
    score_new, observe, observe_queries = policy.score_new, policy.observe, policy.observe_queries

    def recorded_new(keys, values, gate_logits):
        scores = score_new(keys, values, gate_logits)
        if not decides_late(policy):
            seen.append(scores.detach().flatten().cpu())
        return scores

    def recorded_observe(scores, probs):
        scores = observe(scores, probs)
        if not policy.needs_queries:
            seen.append(scores[:, :, : probs.shape[3]].detach().flatten().cpu())
        return scores

    def recorded_observe_queries(scores, keys, values, queries, scaling):
        scores = observe_queries(scores, keys, values, queries, scaling)
        leaving = keys.shape[2] - queries.shape[3]  # the cache holds min(seen, window) queries
        seen.append(scores[:, :, :leaving].detach().flatten().cpu())
        return scores

    rec.score_new, rec.observe, rec.observe_queries = recorded_new, recorded_observe, recorded_observe_queries
    return rec, seen


def decides_late(policy: ScoringPolicy | type[ScoringPolicy]) -> bool:
    """Scores that change after writing are final only when the pair leaves: chunked runs approximate them."""
    return policy.needs_attention or policy.needs_queries


def _quantile(scores: list[torch.Tensor], q: float, seed: int) -> float:
    values = torch.cat(scores).float()
    values = values[torch.isfinite(values)]
    if values.numel() > 4_000_000:
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(seed))[:4_000_000]]
    return float(torch.quantile(values, q))


def calibrate(model: torch.nn.Module, data: HeldoutSet, make_policy: Callable[[float], ScoringPolicy], target: float,
              settings: MatchSettings, desc: str = "calibrate", start: float = -math.inf) -> Calibration:
    """Find a threshold whose density is within settings.tolerance of `target` on `data`.

    Density falls as the threshold rises. Each run's recorded scores map the density gap to a
    threshold step (quantile at the target minus quantile at the measured density); once the target
    is bracketed, a step that leaves the bracket is replaced by linear interpolation."""
    lo: tuple[float, float] | None = None  # (threshold, density > target)
    hi: tuple[float, float] | None = None  # (threshold, density < target)
    threshold, history, best = start, [], None  # -inf: keep everything first, only to record the scores
    for it in range(settings.max_iterations):
        policy, scores = _recording(make_policy(threshold))
        result = nll_with_policy(model, data, policy, sinks=settings.sinks, chunk=settings.chunk, desc=f"{desc} #{it}",
                                 score=settings.score)
        density = result.density
        history.append((threshold, density))
        if best is None or abs(density - target) < abs(best.density - target):
            best = Calibration(threshold, density, history, result)
        if abs(density - target) <= settings.tolerance:
            break
        if density > target:
            lo = (threshold, density)
        else:
            hi = (threshold, density)
        guess = _quantile(scores, 1.0 - target, settings.seed)
        if math.isfinite(threshold):  # recorded scores are only an estimate: move by their quantile gap
            guess = threshold + guess - _quantile(scores, 1.0 - density, settings.seed)
        inside = (lo is None or guess > lo[0]) and (hi is None or guess < hi[0])
        if not inside and lo is not None and hi is not None and math.isfinite(lo[0]):
            # interpolate the density linearly between the bracket's ends
            guess = lo[0] + (hi[0] - lo[0]) * (lo[1] - target) / (lo[1] - hi[1])
        threshold = guess
    return best


def calibrate_methods(model: torch.nn.Module, data: HeldoutSet, methods: list[str], target: float,
                      settings: MatchSettings) -> dict[str, Calibration]:
    """Thresholds at which each policy's density matches `target` on `data` (prefill chunk
    settings.chunk for every policy, as the caller will run them), e.g. for the task suite."""
    out = {}
    for method in methods:
        if method in UNMATCHED:
            continue
        cls = POLICIES[method]
        out[method] = calibrate(model, data, lambda t, c=cls: c(threshold=t), target, settings, desc=f"{method} calibrate")
    return out

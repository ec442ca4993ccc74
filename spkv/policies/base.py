"""The scoring-policy interface: every method decides under the same rule.

A pair is scored when it is written (and, for attention-based methods, re-scored by the attention it
receives while in the local window). When it leaves the window the cache keeps it iff
score >= threshold. Sink tokens are kept regardless; padding never.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

POLICIES: dict[str, type[ScoringPolicy]] = {}


def register_policy(cls: type[ScoringPolicy]) -> type[ScoringPolicy]:
    """Class decorator: list a policy in POLICIES under its own `name`.

    Explicit, so a subclass made for a variant is not registered by accident, and checked: a class
    that does not set its own `name` (it would replace its parent) or reuses a taken name raises."""
    if "name" not in vars(cls):
        raise TypeError(f"{cls.__name__} must set its own `name` to be registered (it inherits {cls.name!r}).")
    taken = POLICIES.get(cls.name)
    if taken is not None and taken.__qualname__ != cls.__qualname__:
        raise TypeError(f"Policy name {cls.name!r} is taken by {taken.__name__}; choose another name for {cls.__name__}.")
    POLICIES[cls.name] = cls
    return cls


@dataclass
class ScoringPolicy:
    """Base class. `threshold=None` means "the model's SP-KV threshold" (only SP-KV uses that)."""

    threshold: float | None = 0.0
    name: ClassVar[str] = "base"
    # True when the score depends on attention received after writing: such a score is final only
    # when the pair leaves the window, so it is exact token by token and approximate in prefill chunks.
    needs_attention: ClassVar[bool] = False
    # True when the score depends on the recent queries (observe_queries); final when the pair leaves.
    needs_queries: ClassVar[bool] = False

    def score_new(self, keys: torch.Tensor, values: torch.Tensor, gate_logits: torch.Tensor | None) -> torch.Tensor:
        """keys, values [B, Hkv, n, D]; gate_logits [B, n, Hkv] or None -> scores [B, Hkv, n]."""
        raise NotImplementedError

    def observe(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """scores [B, Hkv, R] of the window's pairs; probs [B, Hkv, G, n, R]: the attention they just
        received from the G query heads of each KV head's group and the n newest queries -> new scores."""
        return scores

    def observe_queries(self, scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                        scaling: float) -> torch.Tensor:
        """keys, values [B, Hkv, R, D] of the window's pairs; queries [B, Hkv, G, Q, D]: the last Q <= window
        queries of each KV head's group; scaling: the attention's 1/sqrt(D) -> new scores [B, Hkv, R]."""
        return scores

"""Which cache a method decodes with: `dense` (keep every pair), `spkv` (the model's predictor),
`lkv` (an LKV model's learned budgets and scorer) or a scoring policy by name (spkv.policies). The
one mapping the evaluations and benchmarks share."""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from spkv.cache import SPKVCache


@dataclass
class Method:
    """`dense` (keep every pair), `spkv` (the model's predictor), `lkv` (an LKV model) or a policy name
    from spkv.policies."""

    name: str
    threshold: float | None = None  # None: spkv follows the model's tau; policies their default; lkv: its budget r
    sinks: int | None = None  # None: spkv the model's (0), policies 4, dense 0
    display: str | None = None  # a label of its own (e.g. a hybrid's layout run as `spkv`)

    @property
    def label(self) -> str:
        if self.display is not None:
            return self.display
        if self.threshold is None:
            return self.name
        return f"{self.name} ({'r' if self.name == 'lkv' else 'tau'}={self.threshold:g})"


def cache_factory(model: torch.nn.Module, method: Method) -> Callable[[], Cache | None]:
    """A fresh cache per sample (policies with state, e.g. random, restart each time)."""
    from spkv.convert import is_converted
    from spkv.policies import POLICIES, KeepAll, SPKVPolicy

    if not is_converted(model):
        if method.name != "dense":
            raise ValueError(f"Method {method.name!r} needs an SP-KV model (spkv.convert or spkv.load_adapter).")
        return lambda: None
    is_lkv = model.spkv_config.lkv is not None
    if method.name == "dense":  # an LKV model's cache evicts under a budget: at r = 1 every head keeps all
        budget = 1.0 if is_lkv else None
        return lambda: SPKVCache(model, policy=KeepAll(), sinks=method.sinks or 0, budget=budget)
    if method.name == "lkv" or (is_lkv and method.name == "spkv"):
        if not is_lkv:
            raise ValueError("Method 'lkv' needs an LKV model (an adapter of spkv train --method lkv).")
        if method.name == "spkv":
            raise ValueError("This is an LKV model: it has no threshold. Use method 'lkv' (its learned budgets; a number "
                             "given for it is the budget r).")
        return lambda: SPKVCache(model, budget=method.threshold, sinks=method.sinks)
    if method.name == "spkv":
        return lambda: SPKVCache(model, policy=SPKVPolicy(threshold=method.threshold), sinks=method.sinks)
    if method.name not in POLICIES:
        raise ValueError(f"Unknown method {method.name!r}: use dense, spkv, lkv or one of {', '.join(sorted(POLICIES))}")
    if is_lkv:
        raise ValueError(f"An LKV model evicts under its budget, so the {method.name!r} policy's threshold would be ignored: "
                         "run the post-hoc policies on an SP-KV model or the dense control.")
    cls = POLICIES[method.name]
    kwargs = {} if method.threshold is None else {"threshold": method.threshold}
    sinks = 4 if method.sinks is None else method.sinks
    return lambda: SPKVCache(model, policy=cls(**kwargs), sinks=sinks)

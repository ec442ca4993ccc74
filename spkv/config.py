"""SP-KV configuration: one small JSON-serialisable dataclass, validated on creation."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

PHASES = ("soft", "anneal", "hard")


@dataclass
class LKVConfig:
    """LKV: learned per-head budgets and a learned token scorer, evicting under budget (spkv.lkv).

    budget: r, the fraction of out-of-window pairs the whole model keeps, in (0, 1]; chosen at
        training, changeable at deployment (spkv.lkv.set_budget), like SP-KV's tau.
    uniform: every head gets the share r (the ablation) instead of its learned share.
    temperature: of the soft top-k in the soft and anneal phases (training anneals it).
    exit_every: E; a head is cut back to its budget each time E more pairs have left the window
        (bytes held <= budget + E per head), so prefill needs one cut per E tokens, not per token.
    """

    budget: float = 0.25
    uniform: bool = False
    temperature: float = 1.0
    exit_every: int = 32

    def __post_init__(self) -> None:
        ok = _is_number(self.budget) and 0.0 < self.budget <= 1.0
        _check(ok, "budget", "a number in (0, 1] (the fraction of out-of-window pairs kept)", self.budget, "LKVConfig")
        _check(isinstance(self.uniform, bool), "uniform", "True or False", self.uniform, "LKVConfig")
        _check(_is_number(self.temperature) and self.temperature > 0, "temperature", "a number > 0", self.temperature, "LKVConfig")
        _check(isinstance(self.exit_every, int) and self.exit_every >= 1, "exit_every", "an integer >= 1", self.exit_every, "LKVConfig")
        self.budget, self.temperature = float(self.budget), float(self.temperature)

    def replace(self, **changes: Any) -> LKVConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class SPKVConfig:
    """How attention is gated.

    window: recent pairs always visible (never gated), in tokens.
    threshold: tau; a pair leaving the window is kept iff its utility u >= tau.
    phase: "soft" adds log u to out-of-window logits (training), "anneal" blends u with the hard
        decision by `anneal_alpha`, "hard" is the exact inference rule (0 or -inf).
    predictor_hidden: width of the predictor's hidden layer.
    bias_init: initial output bias; +5 opens every gate (u ~ 0.993) so training starts from the
        pretrained model's behaviour.
    layers: indices of gated layers; None means every full-attention layer.
    sinks: number of first tokens always kept (0 for SP-KV; the post-hoc baselines use 4).
    auto_cache: in eval mode, swap the empty cache generate() (or a plain forward) would use for an
        SPKVCache. False: only an SPKVCache passed explicitly (`cache=SPKVCache(model)`) compresses.
    lkv: set for an LKV model (spkv.lkv): pairs are scored by a token scorer and evicted under
        per-head budgets instead of admitted by tau; `threshold` and `bias_init` are then unused.
    """

    window: int = 128
    threshold: float = 0.5
    phase: str = "hard"
    anneal_alpha: float = 0.0
    predictor_hidden: int = 128
    bias_init: float = 5.0
    layers: list[int] | None = None
    sinks: int = 0
    auto_cache: bool = True
    lkv: LKVConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lkv, dict):
            self.lkv = LKVConfig(**self.lkv)
        _check(self.lkv is None or isinstance(self.lkv, LKVConfig), "lkv", "None or an LKVConfig", self.lkv)
        _check(isinstance(self.window, int) and self.window >= 1, "window", "an integer >= 1", self.window)
        _check(_is_number(self.threshold) and 0.0 <= self.threshold <= 1.0, "threshold", "a number in [0, 1]", self.threshold)
        _check(self.phase in PHASES, "phase", f"one of {PHASES}", self.phase)
        _check(_is_number(self.anneal_alpha) and 0.0 <= self.anneal_alpha <= 1.0, "anneal_alpha", "a number in [0, 1]", self.anneal_alpha)
        _check(isinstance(self.predictor_hidden, int) and self.predictor_hidden >= 1, "predictor_hidden", "an integer >= 1", self.predictor_hidden)
        _check(_is_number(self.bias_init) and abs(self.bias_init) < 1e4, "bias_init", "a finite number", self.bias_init)
        _check(isinstance(self.sinks, int) and self.sinks >= 0, "sinks", "an integer >= 0", self.sinks)
        _check(isinstance(self.auto_cache, bool), "auto_cache", "True or False", self.auto_cache)
        if self.layers is not None:
            ok = all(isinstance(i, int) and i >= 0 for i in self.layers) and len(set(self.layers)) == len(self.layers)
            _check(ok and len(self.layers) > 0, "layers", "None or a non-empty list of distinct layer indices >= 0", self.layers)
            self.layers = sorted(self.layers)
        self.threshold = float(self.threshold)
        self.anneal_alpha = float(self.anneal_alpha)
        self.bias_init = float(self.bias_init)

    def replace(self, **changes: Any) -> SPKVConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SPKVConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Unknown SPKVConfig field(s) {sorted(unknown)}; known fields are {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SPKVConfig:
        return cls.from_dict(json.loads(text))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _check(ok: bool, field: str, allowed: str, value: Any, owner: str = "SPKVConfig") -> None:
    if not ok:
        raise ValueError(f"{owner}.{field} must be {allowed}, got {value!r}")

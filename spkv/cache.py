"""The compressed KV cache for a converted model (transformers' Cache interface).

SPKVCache puts an SPKVLayer (cache_layer.py: window + global store, physically compact) on every
gated layer and transformers' own layers elsewhere (e.g. Gemma 3's sliding ones);
default_cache_hook hands one to inference and generate() without extra arguments.
"""

from __future__ import annotations

import torch

from spkv.cache_layer import SPKVLayer
from spkv.compat import Cache, cache_argument, default_layers, is_generate_default_cache
from spkv.config import SPKVConfig
from spkv.lkv import model_shares
from spkv.policies import LKVPolicy, ScoringPolicy, SPKVPolicy

EXIT_BATCH = 16  # decode steps between window exits (SPKVCache's exit_batch)


class SPKVCache(Cache):
    """transformers Cache for a converted model: SPKVLayer for gated layers, the usual layers elsewhere.

    policy: which pairs leaving the window are kept (default: the model's own predictor, tau from
    the model's SPKVConfig; for an LKV model its token scorer). sinks: first tokens always kept
    (default: the config's). budget: evict under a budget instead of admitting by threshold: each head
    keeps at most share x the pairs that have left its window, its lowest-scored pairs evicted; an
    LKV model uses its learned shares at this r (default: its own), any other model with a
    write-time policy the uniform share r (every head the same). exit_batch: decode moves pairs out
    of the window every this many steps, not every step (exact: a waiting pair is shown or hidden by
    the same rule), so the steps between need no host transfer; write-time policies without a
    budget only, the others exit every step. page: pairs per page of the stores (default: window / 4,
    at most 32): larger pages make decode attention over long stores cheaper per byte and waste up
    to a page per (sequence, KV head).
    """

    def __init__(self, model: torch.nn.Module, policy: ScoringPolicy | None = None, sinks: int | None = None,
                 budget: float | None = None, exit_batch: int = EXIT_BATCH, page: int | None = None) -> None:
        config = getattr(model, "spkv_config", None)
        if not isinstance(config, SPKVConfig):
            raise ValueError("SPKVCache needs a model converted with spkv.convert() (or spkv.load_adapter()).")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0):
            raise ValueError(f"budget must be a number in (0, 1] (the fraction of out-of-window pairs kept), got {budget!r}")
        if isinstance(exit_batch, bool) or not isinstance(exit_batch, int) or exit_batch < 1:
            raise ValueError(f"exit_batch must be an integer >= 1 (decode steps between window exits), got {exit_batch!r}")
        if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 1):
            raise ValueError(f"page must be an integer >= 1 (pairs per page of the store), got {page!r}")
        lkv = config.lkv
        self.policy = policy if policy is not None else LKVPolicy() if lkv is not None else SPKVPolicy()
        if lkv is None and isinstance(self.policy, LKVPolicy):
            raise ValueError("The 'lkv' policy needs an LKV model (an LKV adapter, or spkv.convert with SPKVConfig(lkv=...)).")
        shares, every = None, 1
        if lkv is not None or budget is not None:
            if self.policy.needs_attention or self.policy.needs_queries:
                raise ValueError(f"Eviction under a budget needs a write-time policy; {self.policy.name!r} re-scores pairs by "
                                 "later attention. Use it without a budget, or use spkv, lkv, key_norm, random or kvzap.")
            every = lkv.exit_every if lkv is not None else 32
            if lkv is not None and not lkv.uniform:
                shares = {i: s.detach() for i, s in model_shares(model, budget).items()}
            else:
                r = budget if budget is not None else lkv.budget
                shares = {i: torch.full((model.config.get_text_config(decoder=True).num_key_value_heads,), float(r)) for i in config.layers}
        self.window = config.window
        self.sinks = config.sinks if sinks is None else sinks
        text_config = model.config.get_text_config(decoder=True)
        layers = [
            SPKVLayer(i, config.window, self.policy, self.sinks, None if shares is None else shares[i], every, exit_batch, page)
            if i in config.layers else make()
            for i, make in enumerate(default_layers(text_config))
        ]
        super().__init__(layers=layers)
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self.tokens_seen = 0
        self.num_sequences: int | None = None

    def begin_forward(self, num_tokens: int, batch_size: int, attention_mask: torch.Tensor | None) -> None:
        """Called before each forward: checks limits and records which new tokens are padding."""
        if self.num_sequences is None:
            self.num_sequences = batch_size
        elif batch_size != self.num_sequences:
            raise ValueError(f"This SP-KV cache holds {self.num_sequences} sequences but got {batch_size}: use a new cache for a new batch.")
        total = self.tokens_seen + num_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(
                f"Sequence of {total} tokens exceeds the model's {self.max_positions} positions: "
                "shorten the prompt or lower max_new_tokens."
            )
        valid = attention_mask[:, -num_tokens:].bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        for layer in self.spkv_layers():
            layer.pending_valid = valid
        self.tokens_seen = total

    def spkv_stage_gates(self, layer_idx: int, gate_logits: torch.Tensor, config: SPKVConfig) -> SPKVLayer:
        """Called by the predictor hook: the new tokens' gates, just before this layer's update."""
        layer = self.layers[layer_idx]
        layer.staged_logits = gate_logits.detach()
        layer.spkv_config = config
        return layer

    def spkv_stage_scorer(self, layer_idx: int, scorer: torch.nn.Module, config: SPKVConfig) -> SPKVLayer:
        """Called by an LKV model's hook: the layer's token scorer, which scores the new keys and
        values in this layer's update()."""
        layer = self.layers[layer_idx]
        layer.staged_scorer = scorer
        layer.spkv_config = config
        return layer

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest -tokens_to_remove tokens from every layer (see SPKVLayer.crop)."""
        super().crop(tokens_to_remove)
        self.tokens_seen = max(0, self.tokens_seen + min(0, tokens_to_remove))

    def spkv_layers(self) -> list[SPKVLayer]:
        return [layer for layer in self.layers if isinstance(layer, SPKVLayer)]

    def take_exits(self) -> None:
        """Decide the batched window exits still waiting (e.g. before changing tau mid-sequence)."""
        for layer in self.spkv_layers():
            layer.take_exits()


def default_cache_hook(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Model-level pre-hook: inference (and generate) get an SPKVCache without extra arguments.

    Replaces a missing cache, or the empty DynamicCache that generate() makes, when the model is in
    eval mode and the hard (inference) phase; a cache the user passed is left alone. Off with
    SPKVConfig.auto_cache=False: then only an SPKVCache passed explicitly compresses (the robust path).
    """
    name, cache = cache_argument(kwargs)
    use_cache = kwargs.get("use_cache")
    use_cache = model.config.use_cache if use_cache is None else use_cache
    fresh = cache is None or is_generate_default_cache(cache)
    config = model.spkv_config
    if fresh and use_cache and config.auto_cache and not model.training and config.phase == "hard":
        cache = SPKVCache(model)
        kwargs[name] = cache
    if isinstance(cache, SPKVCache):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        cache.begin_forward(tokens.shape[1], tokens.shape[0], kwargs.get("attention_mask"))
    return args, kwargs

"""The compressed KV cache: it physically holds only the local window and the pairs that were kept.

Per gated layer and sequence:
  * the window: the last `window` pairs (plus, during a forward, the chunk being processed), with
    their positions, scores and padding flags: [B, Hkv, R, D];
  * the global store: for every (sequence, KV head) its own buffer of kept pairs, [L_bh, D], grown
    in place by ~3% (at least 64 pairs) when full, so appends never copy the whole cache and every
    head holds exactly what it kept (different lengths per head).
When a pair leaves the window, the scoring policy's score decides (keep iff score >= threshold).
Attention of new queries runs over (global store + window) under the same rule as training
(see attention.py). Ungated layers (e.g. Gemma 3's sliding ones) use transformers' own layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, DynamicCache, get_layer_types_and_kwargs

from .attention import window_bias
from .config import SPKVConfig
from .policies import ScoringPolicy, SPKVPolicy

_MIN_GROWTH = 64  # pairs
_GROWTH_FRACTION = 32  # grow by 1/32 of the current capacity


class SPKVLayer(CacheLayerMixin):
    """One gated layer's cache. `update` appends; `attend` computes attention then evicts."""

    is_sliding = False

    def __init__(self, layer_idx: int, window: int, policy: ScoringPolicy, sinks: int) -> None:
        super().__init__()
        self.layer_idx, self.window, self.policy, self.sinks = layer_idx, window, policy, sinks
        self.seen = 0  # tokens processed (the logical sequence length)
        self.spkv_config: SPKVConfig | None = None
        self.staged_logits: torch.Tensor | None = None  # [B, n, Hkv] gates of the incoming tokens
        self.pending_valid: torch.Tensor | None = None  # [B, n] False for padding
        self.recent_q: torch.Tensor | None = None  # [B, Hkv, G, <=window, D], only if the policy needs_queries

    # -- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        self.batch_size, self.num_kv_heads, self.head_dim = b, hkv, d
        self.dtype, self.device = key_states.dtype, key_states.device
        self.recent_k = key_states.new_empty(b, hkv, 0, d)
        self.recent_v = value_states.new_empty(b, hkv, 0, d)
        self.recent_pos = torch.empty(0, dtype=torch.long, device=self.device)
        self.recent_score = torch.empty(b, hkv, 0, device=self.device)
        self.recent_valid = torch.empty(b, 0, dtype=torch.bool, device=self.device)
        self.recent_sink = torch.empty(b, 0, dtype=torch.bool, device=self.device)
        self.valid_seen = torch.zeros(b, dtype=torch.long, device=self.device)
        self.store_k = [[key_states.new_empty(0, d) for _ in range(hkv)] for _ in range(b)]
        self.store_v = [[value_states.new_empty(0, d) for _ in range(hkv)] for _ in range(b)]
        self.store_len = [[0] * hkv for _ in range(b)]
        self.decided = torch.zeros(b, hkv, dtype=torch.long)  # out-of-window, non-sink, real pairs
        self.kept = torch.zeros(b, hkv, dtype=torch.long)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new pairs [B, Hkv, n, D] to the window; the decision waits for them to leave it."""
        if self.staged_logits is None:
            raise RuntimeError(
                f"SP-KV cache layer {self.layer_idx} got keys without gate logits: an SPKVCache only works "
                "with the model converted by spkv.convert() that it was made for."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, n, _ = key_states.shape
        valid = self.pending_valid if self.pending_valid is not None else torch.ones(b, n, dtype=torch.bool)
        valid = valid.to(self.device)
        rank = self.valid_seen.unsqueeze(1) + valid.long().cumsum(1) - 1
        scores = self.policy.score_new(key_states, value_states, self.staged_logits).float()
        self.recent_k = torch.cat([self.recent_k, key_states], dim=2)
        self.recent_v = torch.cat([self.recent_v, value_states], dim=2)
        self.recent_pos = torch.cat([self.recent_pos, torch.arange(self.seen, self.seen + n, device=self.device)])
        self.recent_score = torch.cat([self.recent_score, scores], dim=2)
        self.recent_valid = torch.cat([self.recent_valid, valid], dim=1)
        self.recent_sink = torch.cat([self.recent_sink, valid & (rank < self.sinks)], dim=1)
        self.valid_seen += valid.long().sum(1)
        self.seen += n
        self.staged_logits = None
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.window, self.policy, self.sinks)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("Beam search is not supported with the SP-KV cache; use greedy or sampling.")

    # -- SP-KV ---------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        if self.policy.threshold is not None:
            return self.policy.threshold
        return self.spkv_config.threshold

    def _keep(self, scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        """scores [B, Hkv, m], sink [B, m] -> the write decision [B, Hkv, m]."""
        return (scores >= self.threshold) | sink.unsqueeze(1)

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the newest n queries [B, H, n, D] over global store + window -> [B, n, H, D]."""
        b, h, n, d = query.shape
        hkv, groups = self.num_kv_heads, h // self.num_kv_heads
        q = query.view(b, hkv, groups, n, d)
        q_pos = torch.arange(self.seen - n, self.seen, device=self.device)
        dist = q_pos.view(n, 1) - self.recent_pos.view(1, -1)  # [n, R]
        if self.policy.needs_attention or self.policy.needs_queries:  # undecided until they leave: visible (exact when n == 1)
            gate = torch.zeros_like(self.recent_score)
        else:
            keep = self._keep(self.recent_score, self.recent_sink)
            gate = torch.zeros_like(self.recent_score).masked_fill(~keep, float("-inf"))
        visible = self.recent_valid.view(b, 1, 1, -1)
        bias = window_bias(dist.view(1, 1, n, -1), self.window, gate.unsqueeze(2), visible)  # [B, Hkv, n, R]
        # A query that sees nothing (left padding, before any real token) gets a finite, unused result.
        blind = torch.isneginf(bias).all(-1, keepdim=True)
        if blind.any():
            has_store = torch.tensor(self.store_len, device=self.device).view(b, hkv, 1, 1) > 0
            bias = bias.masked_fill(blind & ~has_store, 0.0)
        recent_scores = (q @ self.recent_k.unsqueeze(2).transpose(-1, -2)) * scaling + bias.unsqueeze(2).to(q.dtype)

        out = torch.empty(b, hkv, groups, n, d, dtype=query.dtype, device=query.device)
        probs_recent = [] if self.policy.needs_attention else None
        for bi in range(b):
            for hi in range(hkv):
                length = self.store_len[bi][hi]
                k_g, v_g = self.store_k[bi][hi][:length], self.store_v[bi][hi][:length]
                scores = torch.cat([(q[bi, hi] @ k_g.T) * scaling, recent_scores[bi, hi]], dim=-1)  # [G, n, L+R]
                p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
                out[bi, hi] = p[..., :length] @ v_g + p[..., length:] @ self.recent_v[bi, hi]
                if probs_recent is not None:
                    probs_recent.append(p[..., length:].float())
        if probs_recent is not None:
            probs = torch.stack(probs_recent).view(b, hkv, groups, n, -1)
            self.recent_score = self.policy.observe(self.recent_score, probs)
        if self.policy.needs_queries:  # the last `window` queries, for policies that model them
            self.recent_q = q if self.recent_q is None else torch.cat([self.recent_q, q], dim=3)[:, :, :, -self.window :]
            self.recent_score = self.policy.observe_queries(self.recent_score, self.recent_k, self.recent_v, self.recent_q, scaling)
        self._evict(self.seen - self.window)
        return out.view(b, h, n, d).transpose(1, 2)

    def _evict(self, upto: int) -> None:
        """Decide every window pair at position <= upto: it moves to the global store or is gone."""
        m = int((self.recent_pos <= upto).sum())
        if m == 0:
            return
        valid, sink = self.recent_valid[:, :m], self.recent_sink[:, :m]
        keep = self._keep(self.recent_score[:, :, :m], sink) & valid.unsqueeze(1)  # [B, Hkv, m]
        # One transfer per eviction (a sync on GPU); the bookkeeping below runs on the host.
        keep, counted = keep.cpu(), (valid & ~sink).cpu().unsqueeze(1)
        self.decided += counted.sum(-1).expand_as(self.decided)
        self.kept += (keep & counted).sum(-1)
        for bi, hi in keep.any(-1).nonzero().tolist():
            idx = keep[bi, hi].nonzero().squeeze(1).to(self.device)
            self._append(bi, hi, self.recent_k[bi, hi, idx], self.recent_v[bi, hi, idx])
        self.recent_k, self.recent_v = self.recent_k[:, :, m:], self.recent_v[:, :, m:]
        self.recent_pos, self.recent_score = self.recent_pos[m:], self.recent_score[:, :, m:]
        self.recent_valid, self.recent_sink = self.recent_valid[:, m:], self.recent_sink[:, m:]

    def _append(self, bi: int, hi: int, k: torch.Tensor, v: torch.Tensor) -> None:
        length, cap = self.store_len[bi][hi], self.store_k[bi][hi].shape[0]
        need = length + k.shape[0]
        if need > cap:
            new_cap = max(need, cap + max(_MIN_GROWTH, cap // _GROWTH_FRACTION))
            for store in (self.store_k, self.store_v):
                grown = store[bi][hi].new_empty(new_cap, self.head_dim)
                grown[:length] = store[bi][hi][:length]
                store[bi][hi] = grown
        self.store_k[bi][hi][length:need] = k
        self.store_v[bi][hi][length:need] = v
        self.store_len[bi][hi] = need

    def nbytes(self) -> tuple[int, int]:
        """(bytes held, bytes in use) of this layer's keys and values."""
        if not self.is_initialized:
            return 0, 0
        per = self.head_dim * self.recent_k.element_size() * 2
        window = self.recent_k.shape[2] * self.batch_size * self.num_kv_heads * per
        held = sum(t.shape[0] for row in self.store_k for t in row) * per
        used = sum(sum(row) for row in self.store_len) * per
        return held + window, used + window


class SPKVCache(Cache):
    """transformers Cache for a converted model: SPKVLayer for gated layers, the usual layers elsewhere.

    policy: which pairs leaving the window are kept (default: the model's own predictor, tau from
    the model's SPKVConfig). sinks: first tokens always kept (default: the config's).
    """

    def __init__(self, model: torch.nn.Module, policy: ScoringPolicy | None = None, sinks: int | None = None) -> None:
        config = getattr(model, "spkv_config", None)
        if not isinstance(config, SPKVConfig):
            raise ValueError("SPKVCache needs a model converted with spkv.convert() (or spkv.load_adapter()).")
        self.policy = policy if policy is not None else SPKVPolicy()
        self.window = config.window
        self.sinks = config.sinks if sinks is None else sinks
        text_config = model.config.get_text_config(decoder=True)
        types, kwargs = get_layer_types_and_kwargs(text_config)
        layers = [
            SPKVLayer(i, config.window, self.policy, self.sinks) if i in config.layers else DYNAMIC_LAYER_TYPE_MAPPING[t](**kw)
            for i, (t, kw) in enumerate(zip(types, kwargs))
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

    def spkv_layers(self) -> list[SPKVLayer]:
        return [layer for layer in self.layers if isinstance(layer, SPKVLayer)]


def default_cache_hook(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Model-level pre-hook: inference (and generate) get an SPKVCache without extra arguments.

    Replaces a missing cache, or the empty DynamicCache that generate() makes, when the model is in
    eval mode and the hard (inference) phase; a cache the user passed is left alone.
    """
    cache = kwargs.get("past_key_values")
    use_cache = kwargs.get("use_cache")
    use_cache = model.config.use_cache if use_cache is None else use_cache
    fresh = cache is None or (
        type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and cache.get_seq_length() == 0
    )
    if fresh and use_cache and not model.training and model.spkv_config.phase == "hard":
        cache = SPKVCache(model)
        kwargs["past_key_values"] = cache
    if isinstance(cache, SPKVCache):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        cache.begin_forward(tokens.shape[1], tokens.shape[0], kwargs.get("attention_mask"))
    return args, kwargs


@dataclass
class CacheStats:
    """Density per protocols.md: kept / decided out-of-window pairs (window and sinks not counted)."""

    kept: torch.Tensor  # [layers, B, Hkv] (gated layers, in order)
    decided: torch.Tensor  # [layers, B, Hkv]
    layers: list[int]
    bytes_held: int  # gated layers' K/V tensors, capacity included
    bytes_used: int  # gated layers' K/V pairs actually stored
    bytes_full: int  # what a full cache would hold for the same tokens in the same layers

    @property
    def density_per_head(self) -> torch.Tensor:
        """[layers, Hkv], pooled over the batch; NaN where no pair has left the window yet."""
        decided = self.decided.sum(1).double()
        return torch.where(decided > 0, self.kept.sum(1) / decided, torch.nan)

    @property
    def density(self) -> float:
        """Mean over layers and heads (the paper's number)."""
        return float(self.density_per_head.nanmean())

    @property
    def density_token_weighted(self) -> float:
        decided = int(self.decided.sum())
        return float(self.kept.sum()) / decided if decided else float("nan")

    @property
    def compression(self) -> float:
        """Full-cache bytes / bytes held, window included."""
        return self.bytes_full / max(1, self.bytes_held)

    def to_dict(self) -> dict:
        return {
            "layers": self.layers, "density": self.density, "density_token_weighted": self.density_token_weighted,
            "density_per_layer_head": self.density_per_head.tolist(), "kept": int(self.kept.sum()),
            "decided": int(self.decided.sum()), "bytes_held": self.bytes_held, "bytes_used": self.bytes_used,
            "bytes_full": self.bytes_full, "compression": self.compression,
        }


def cache_stats(cache: SPKVCache) -> CacheStats:
    layers = [l for l in cache.spkv_layers() if l.is_initialized]
    if not layers:
        raise ValueError("This SP-KV cache is empty: run a forward pass with it first.")
    held = used = full = 0
    for layer in layers:
        h, u = layer.nbytes()
        held, used = held + h, used + u
        full += layer.seen * layer.batch_size * layer.num_kv_heads * layer.head_dim * layer.recent_k.element_size() * 2
    return CacheStats(
        kept=torch.stack([l.kept for l in layers]), decided=torch.stack([l.decided for l in layers]),
        layers=[l.layer_idx for l in layers], bytes_held=held, bytes_used=used, bytes_full=full,
    )

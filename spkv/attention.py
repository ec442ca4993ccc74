"""Gated attention: the SP-KV rule as a transformers attention function.

One rule serves every phase and every caller. For query position t and key position s:

    visible(t, s) = s <= t and not padding
    logit(t, s)  += 0                 if t - s < window   (local window, never gated)
                    log_gate[s]       otherwise

where log_gate is log u (soft), log((1 - a) u + a 1[u >= tau]) (anneal), or 0 / -inf (hard).
Sink tokens get log_gate = 0. The compressed cache feeds the same function with the pairs it holds
(positions and per-pair log gates), so training and decoding cannot drift apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import SPKVConfig

ATTN_IMPLEMENTATION = "spkv"

def keep_decision(gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """The write rule, u >= tau, in one place so training, cache and stats agree bit for bit."""
    return torch.sigmoid(gate_logits.float()) >= threshold


def log_gate(gate_logits: torch.Tensor, config: SPKVConfig) -> torch.Tensor:
    """Per-pair additive bias for out-of-window logits, following the configured phase."""
    if config.phase == "soft":
        return F.logsigmoid(gate_logits)
    keep = keep_decision(gate_logits, config.threshold)
    if config.phase == "hard":  # no gradient reaches the predictor: it is frozen
        zero = torch.zeros((), dtype=gate_logits.dtype, device=gate_logits.device)
        return torch.where(keep, zero, torch.full_like(zero, float("-inf")))
    a = config.anneal_alpha
    return torch.log((1.0 - a) * torch.sigmoid(gate_logits) + a * keep.to(gate_logits.dtype))


def window_bias(dist: torch.Tensor, window: int, gate: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """The SP-KV rule as an additive bias, built in one pass over the output.

    dist = query position - key position; gate: the keys' log gates; visible: optional extra
    visibility (padding). All arguments broadcast together. Returns 0 inside the window, the key's
    log gate outside it, -inf for future or invisible keys.
    """
    causal = torch.zeros(dist.shape, dtype=gate.dtype, device=gate.device).masked_fill(dist < 0, float("-inf"))
    bias = torch.where(dist >= window, gate, causal)
    return bias if visible is None else bias.masked_fill(~visible, float("-inf"))


def gated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_log_gate: torch.Tensor,
    window: int,
    scaling: float | None,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    block_size: int = 512,
) -> torch.Tensor:
    """Full-sequence attention under the SP-KV rule, in query blocks.

    query [B, H, Tq, D] are the last Tq of the Tk tokens; key, value [B, Hkv, Tk, D];
    key_log_gate [B, Hkv, Tk]; mask: optional bool [B, 1, Tq, Tk] (True = may attend), e.g. padding.
    Each block scores only the keys up to its last query (the rest are in the future), so the work
    is close to the causal triangle and one block's bias is alive at a time. The bias is per KV
    head; the query heads of a group ride in the batch dimension of the sdpa call, so that one bias
    serves the whole group without being copied. Returns [B, Tq, H, D].
    """
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    groups, offset = h // hkv, tk - tq
    gate = key_log_gate.to(query.dtype).unsqueeze(2)  # [B, Hkv, 1, Tk]
    positions = torch.arange(tk, device=query.device)
    out = query.new_empty(b, tq, h, d)
    for start in range(0, tq, block_size):
        stop = min(tq, start + block_size)
        n, end = stop - start, offset + stop  # keys [0, end) can be visible to this block
        dist = positions[offset + start : end].view(n, 1) - positions[:end].view(1, end)  # [n, end]
        visible = None if mask is None else mask[:, :, start:stop, :end]
        bias = window_bias(dist, window, gate[..., :end], visible)  # [B, Hkv, n, end]
        if visible is not None:  # padding queries see nothing: give them a finite, unused result
            bias = bias.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
        for bi in range(b):
            q = query[bi, :, start:stop].view(hkv, groups, n, d).transpose(0, 1)  # [G, Hkv, n, D]
            k = key[bi : bi + 1, :, :end].expand(groups, hkv, end, d)
            v = value[bi : bi + 1, :, :end].expand(groups, hkv, end, d)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[bi : bi + 1], dropout_p=dropout, scale=scaling)
            out[bi, start:stop] = o.transpose(0, 1).reshape(h, n, d).transpose(0, 1)
    return out


def sink_mask(valid_keys: torch.Tensor, sinks: int) -> torch.Tensor:
    """valid_keys [B, Tk] bool -> [B, Tk] True for the first `sinks` real tokens of each row."""
    rank = valid_keys.long().cumsum(dim=-1) - 1
    return valid_keys & (rank < sinks)


def spkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    spkv_gate_logits: torch.Tensor | None = None,
    spkv_cache_layer=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for converted models (registered as "spkv").

    Ungated layers (no predictor, e.g. Gemma 3's sliding ones) run plain sdpa. Gated layers get
    their gate logits [B, Tk, Hkv] from the predictor hook (see convert.py); with the compressed
    cache, attention runs over what the cache holds (cache.py), otherwise over the full sequence.
    """
    predictor = getattr(module, "spkv_predictor", None)
    if predictor is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if spkv_cache_layer is not None:
        return spkv_cache_layer.attend(query, scaling), None
    if spkv_gate_logits is None:
        raise RuntimeError("SP-KV gated layer called without gate logits: was the model converted with spkv.convert()?")
    config: SPKVConfig = predictor.config
    tk = key.shape[2]
    if spkv_gate_logits.shape[1] != tk:
        raise RuntimeError(
            f"SP-KV layer {module.layer_idx}: {tk} keys but gates for {spkv_gate_logits.shape[1]} tokens. "
            "A converted model must decode with spkv's compressed cache, not a plain transformers cache."
        )
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    gate = log_gate(spkv_gate_logits, config).transpose(1, 2)  # [B, Hkv, Tk]
    if config.sinks:
        valid = attention_mask[:, 0, -1, :] if attention_mask is not None else torch.ones_like(gate[:, 0], dtype=torch.bool)
        gate = gate.masked_fill(sink_mask(valid, config.sinks).unsqueeze(1), 0.0)
    out = gated_attention(query, key, value, gate, config.window, scaling, attention_mask, dropout)
    return out, None


def register() -> None:
    """Make "spkv" a valid attn_implementation (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, spkv_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)

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

# Scores held at once per query block: bounds memory on long sequences (one layer, one block).
_BLOCK_ELEMENTS = 2**25


def keep_decision(gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """The write rule, u >= tau, in one place so training, cache and stats agree bit for bit."""
    return torch.sigmoid(gate_logits.float()) >= threshold


def log_gate(gate_logits: torch.Tensor, config: SPKVConfig) -> torch.Tensor:
    """Per-pair additive bias for out-of-window logits, following the configured phase."""
    if config.phase == "soft":
        return F.logsigmoid(gate_logits)
    keep = keep_decision(gate_logits, config.threshold)
    if config.phase == "hard":
        zero = torch.zeros((), dtype=gate_logits.dtype, device=gate_logits.device)
        return torch.where(keep, zero, torch.full_like(zero, float("-inf")))
    a = config.anneal_alpha
    return torch.log((1.0 - a) * torch.sigmoid(gate_logits) + a * keep.to(gate_logits.dtype))


def window_bias(dist: torch.Tensor, window: int, gate: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The SP-KV rule as an additive bias: 0 inside the window, the pair's log gate outside, -inf
    where not visible. dist = query position - key position; all arguments broadcast together."""
    inside = torch.zeros((), dtype=gate.dtype, device=gate.device)
    bias = torch.where(dist < window, inside, gate)
    return bias.masked_fill(~visible, float("-inf"))


def gated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_log_gate: torch.Tensor,
    window: int,
    scaling: float | None,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention under the SP-KV rule, computed in query blocks.

    query [B, H, Tq, D]; key, value [B, Hkv, Tk, D]; q_pos [Tq]; k_pos broadcastable to
    [B, Hkv, Tk] (an empty slot can carry a huge position: it is then never visible);
    key_log_gate [B, Hkv, Tk]; mask: optional bool [B, 1, Tq, Tk] (True = may attend), e.g. padding.
    Returns [B, Tq, H, D].
    """
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    groups = h // hkv
    q = query.view(b, hkv, groups, tq, d)
    k_pos = k_pos.expand(b, hkv, tk)
    gate = key_log_gate.to(query.dtype).unsqueeze(2)

    block = max(1, min(tq, _BLOCK_ELEMENTS // max(1, b * h * tk)))
    outputs = []
    for start in range(0, tq, block):
        stop = min(tq, start + block)
        n = stop - start
        dist = q_pos[start:stop].view(1, 1, n, 1) - k_pos.unsqueeze(2)  # [B, Hkv, n, Tk]
        visible = dist >= 0
        if mask is not None:
            visible = visible & mask[:, :, start:stop]
        bias = window_bias(dist, window, gate, visible)
        # Rows with nothing visible are padding queries: give them a finite (unused) result.
        empty = ~visible.any(dim=-1, keepdim=True)
        bias = bias.masked_fill(empty, 0.0)
        qb = q[:, :, :, start:stop].reshape(b, hkv, groups * n, d)
        bias = bias.unsqueeze(2).expand(b, hkv, groups, n, tk).reshape(b, hkv, groups * n, tk)
        out = F.scaled_dot_product_attention(qb, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
        outputs.append(out.view(b, hkv, groups, n, d).reshape(b, h, n, d))
    return torch.cat(outputs, dim=2).transpose(1, 2)


def _sink_mask(valid_keys: torch.Tensor, sinks: int) -> torch.Tensor:
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
    tq, tk = query.shape[2], key.shape[2]
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
        gate = gate.masked_fill(_sink_mask(valid, config.sinks).unsqueeze(1), 0.0)
    k_pos = torch.arange(tk, device=query.device).view(1, 1, tk)
    q_pos = torch.arange(tk - tq, tk, device=query.device)
    out = gated_attention(query, key, value, q_pos, k_pos, gate, config.window, scaling, attention_mask, dropout)
    return out, None


def register() -> None:
    """Make "spkv" a valid attn_implementation (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, spkv_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)

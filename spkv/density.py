"""Density from a full-sequence forward's gates, as protocols.md defines it.

After T tokens, a pair is out of window when the next query's window no longer holds it (s <= T - W):
that is when the cache has decided it. The density is the kept fraction of those pairs per (layer,
KV head), then averaged over layers and heads. Padding and sink tokens are not counted. The cache's
own counters (cache.cache_stats) count exactly the same pairs during real decoding.
"""

from __future__ import annotations

import torch

from spkv.attention import keep_decision, sink_mask


def out_of_window_mask(length: int, window: int, attention_mask: torch.Tensor | None, sinks: int = 0) -> torch.Tensor:
    """[B or 1, T] bool: real, non-sink tokens already decided after `length` tokens."""
    positions = torch.arange(length)
    out = (positions <= length - window).unsqueeze(0)
    valid = attention_mask.bool().cpu() if attention_mask is not None else torch.ones(1, length, dtype=torch.bool)
    return out & valid & ~sink_mask(valid, sinks)


def gate_density(
    gates: dict[int, torch.Tensor],
    threshold: float,
    window: int,
    attention_mask: torch.Tensor | None = None,
    sinks: int = 0,
    soft: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gates: layer -> logits [B, T, Hkv] (from spkv.record_gates).

    Returns (kept, counted) per [layer, Hkv], summed over the batch; density = kept / counted.
    soft=True counts the expected number kept (sum of u) instead of u >= tau: the differentiable
    estimate a density regulariser needs (it keeps the autograd graph).
    """
    kept_rows, counted_rows = [], []
    for logits in gates.values():
        b, t, _ = logits.shape
        counted = out_of_window_mask(t, window, attention_mask, sinks).to(logits.device).expand(b, t)
        weight = torch.sigmoid(logits.float()) if soft else keep_decision(logits, threshold).float()
        kept_rows.append((weight * counted.unsqueeze(-1)).sum(dim=(0, 1)))
        counted_rows.append(counted.sum().expand(logits.shape[-1]).float())
    return torch.stack(kept_rows), torch.stack(counted_rows)

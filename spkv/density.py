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


def mean_density(kept: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """The paper's density: kept / counted per (layer, KV head), then the mean over layers and heads."""
    return (kept / counted.clamp(min=1)).mean()


def forward_with_density(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> tuple[object, torch.Tensor, torch.Tensor]:
    """One full-sequence forward of a converted model (no cache) and its gates' (kept, counted) per
    [layer, Hkv] at the model's tau, window and sinks: the one way every evaluation measures the
    density of a forward. A padded batch would count padding as decided pairs: use batch size 1."""
    from spkv.convert import record_gates

    cfg = model.spkv_config
    with record_gates(model) as gates:
        output = model(input_ids=input_ids, use_cache=False, **kwargs)
    kept, counted = gate_density(gates, cfg.threshold, cfg.window, sinks=cfg.sinks)
    return output, kept, counted

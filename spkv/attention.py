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

from spkv.compat import register_attention, sdpa_attention_forward
from spkv.config import SPKVConfig

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
    key_death: torch.Tensor | None = None,
    dead_log_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-sequence attention under the SP-KV rule, in query blocks.

    query [B, H, Tq, D] are the last Tq of the Tk tokens; key, value [B, Hkv, Tk, D];
    key_log_gate [B, Hkv, Tk]; mask: optional bool [B, 1, Tq, Tk] (True = may attend), e.g. padding;
    key_death: optional [B, Hkv, Tk] long, the first query position that no longer sees each key out
    of the window (LKV's evictions, spkv.lkv.eviction_times); dead_log_gate: optional [B, Hkv, Tk], the
    log gate from that query on (default -inf: gone; LKV's anneal phase gives the soft remainder).
    Each block scores only the keys up to its last query (the rest are in the future), so the work
    is close to the causal triangle and one block's bias is alive at a time. The bias is per KV
    head; the query heads of a group ride in the batch dimension of the sdpa call, so that one bias
    serves the whole group without being copied. Returns [B, Tq, H, D].
    """
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    groups, offset = h // hkv, tk - tq
    gate = key_log_gate.to(query.dtype).unsqueeze(2)  # [B, Hkv, 1, Tk]
    dead = None if dead_log_gate is None else dead_log_gate.to(query.dtype).unsqueeze(2)
    positions = torch.arange(tk, device=query.device)
    out = query.new_empty(b, tq, h, d)
    for start in range(0, tq, block_size):
        stop = min(tq, start + block_size)
        n, end = stop - start, offset + stop  # keys [0, end) can be visible to this block
        dist = positions[offset + start : end].view(n, 1) - positions[:end].view(1, end)  # [n, end]
        visible = None if mask is None else mask[:, :, start:stop, :end]
        g = gate[..., :end]
        if key_death is not None:  # evicted keys: gone out of the window from their eviction on
            q_pos = positions[offset + start : end].view(1, 1, n, 1)
            gone = q_pos >= key_death[..., :end].unsqueeze(2)
            g = g.masked_fill(gone, float("-inf")) if dead is None else torch.where(gone, dead[..., :end], g)
        bias = window_bias(dist, window, g, visible)  # [B, Hkv, n, end]
        if visible is not None:  # padding queries see nothing: give them a finite, unused result
            bias = bias.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
        for bi in range(b):
            q = query[bi, :, start:stop].view(hkv, groups, n, d).transpose(0, 1)  # [G, Hkv, n, D]
            k = key[bi : bi + 1, :, :end].expand(groups, hkv, end, d)
            v = value[bi : bi + 1, :, :end].expand(groups, hkv, end, d)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[bi : bi + 1], dropout_p=dropout, scale=scaling)
            out[bi, start:stop] = o.transpose(0, 1).reshape(h, n, d).transpose(0, 1)
    return out


class _CausalFlash(torch.autograd.Function):
    """CPU flash attention, causal -> (out, lse), differentiable in both (the aten op's own
    backward ignores a gradient on lse). q, k [N, H, T, E]; v [N, H, T, D] with D = E - 1."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        vv = F.pad(v, (0, 1))  # one head size for the kernel; the zero column carries lse's gradient
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, vv, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, vv, out, lse)
        ctx.scale = scale
        return out[..., :-1], lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, vv, out, lse = ctx.saved_tensors
        # d lse / d score = p, so a gradient on lse shifts the backward's row term rowsum(g_out * out)
        # by -g_lse: pass it through the zero value column (g_out 1 there, out -g_lse there).
        g_out = torch.cat([g_out, torch.ones_like(g_out[..., :1])], -1)
        out = torch.cat([out[..., :-1], -g_lse.to(out.dtype).unsqueeze(-1)], -1)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g_out, q, k, vv, out, lse, 0.0, True, scale=ctx.scale)
        return dq, dk, dv[..., :-1], None


def _band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float):
    """Each query over the `window` keys ending at itself -> (out [B, H, T, D], lse [B, H, T], at least float32).

    Queries go in blocks of `window`, each against the 2 x window keys before and in it."""
    b, h, t, d = q.shape
    groups, nb = h // k.shape[1], -(-t // window)
    tp = nb * window

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, Hkv, T, D] -> [B, H, nb, 2W, D]
        x = F.pad(x, (0, 0, window, tp - t)).unfold(2, 2 * window, window).transpose(-1, -2)
        return x.repeat_interleave(groups, dim=1)

    i = torch.arange(window, device=q.device).view(window, 1)
    c = torch.arange(2 * window, device=q.device).view(1, 2 * window)
    band = ((c > i) & (c <= window + i)).expand(nb, window, 2 * window).clone()  # [nb, W, 2W]
    band[0, :, :window] = False  # before position 0
    scores = F.pad(q, (0, 0, 0, tp - t)).view(b, h, nb, window, d) @ blocks(k).transpose(-1, -2)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    scores = scores.masked_fill(~band, float("-inf"))
    lse = scores.logsumexp(-1)  # [B, H, nb, W]
    out = (scores - lse.unsqueeze(-1)).exp().to(v.dtype) @ blocks(v)
    return out.reshape(b, h, tp, d)[:, :, :t], lse.reshape(b, h, tp)[:, :, :t]


def flash_gated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_log_gate: torch.Tensor,
                          window: int, scaling: float | None) -> torch.Tensor:
    """`gated_attention` without padding, for a whole sequence on CPU (training, full-sequence NLL).

    The same softmax, split in two parts merged by their log-sum-exps: the window (exact, small)
    and the keys beyond it. A key s is beyond the window of query t iff s <= t - window: a causal
    mask between queries [window, T) and keys [0, T - window), so that part runs in the flash
    kernel (no T x T scores). The key's log gate rides in an extra dimension (query 1, key
    gate / scale), so it stays differentiable. Shapes as gated_attention; returns [B, T, H, D].
    """
    b, h, t, d = query.shape
    scale = scaling if scaling is not None else d ** -0.5
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    out, lse = _band_attention(q, k, v, window, scale)
    if t <= window:
        return out.transpose(1, 2)
    groups, far = h // key.shape[1], t - window
    gate = (key_log_gate[..., :far].to(dtype).clamp_min(-1e4) / scale).unsqueeze(-1)  # -inf (hard drop) -> finite
    qf = torch.cat([q[:, :, window:], torch.ones_like(q[:, :, window:, :1])], -1)  # [B, H, far, D + 1]
    kf = torch.cat([k[:, :, :far], gate], -1).repeat_interleave(groups, dim=1)
    of, lf = _CausalFlash.apply(qf, kf, v[:, :, :far].repeat_interleave(groups, dim=1), scale)
    ln = lse[:, :, window:]
    m = torch.maximum(ln, lf).detach()
    wn, wf = (ln - m).exp().unsqueeze(-1), (lf - m).exp().unsqueeze(-1)
    tail = (out[:, :, window:] * wn + of * wf) / (wn + wf)
    return torch.cat([out[:, :, :window], tail.to(out.dtype)], 2).transpose(1, 2)


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
    unsupported = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if unsupported:
        raise NotImplementedError(f"SP-KV gated layer {module.layer_idx} got {', '.join(unsupported)}, which the gated "
                                  "attention does not implement; gate only plain full-attention layers (SPKVConfig.layers).")
    if spkv_cache_layer is not None:
        return spkv_cache_layer.attend(query, scaling), None
    config: SPKVConfig = predictor.config
    if config.lkv is not None:
        return _lkv_attention(predictor, query, key, value, attention_mask, dropout, scaling), None
    if spkv_gate_logits is None:
        raise RuntimeError("SP-KV gated layer called without gate logits: was the model converted with spkv.convert()?")
    tk = key.shape[2]
    if spkv_gate_logits.shape[1] != tk:
        raise RuntimeError(
            f"SP-KV layer {module.layer_idx}: {tk} keys but gates for {spkv_gate_logits.shape[1]} tokens. "
            "A converted model must decode with spkv's compressed cache, not a plain transformers cache: pass "
            "cache=spkv.SPKVCache(model) (or leave SPKVConfig.auto_cache on)."
        )
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    gate = log_gate(spkv_gate_logits, config).transpose(1, 2)  # [B, Hkv, Tk]
    if config.sinks:
        valid = attention_mask[:, 0, -1, :] if attention_mask is not None else torch.ones_like(gate[:, 0], dtype=torch.bool)
        gate = gate.masked_fill(sink_mask(valid, config.sinks).unsqueeze(1), 0.0)
    if attention_mask is None and dropout == 0.0 and query.shape[2] == tk and query.device.type == "cpu":
        return flash_gated_attention(query, key, value, gate, config.window, scaling), None
    out = gated_attention(query, key, value, gate, config.window, scaling, attention_mask, dropout)
    return out, None


def _lkv_attention(scorer, query, key, value, attention_mask, dropout, scaling) -> torch.Tensor:
    """Full-sequence attention of an LKV model (training, full-sequence evaluation): the scorer
    scores every key, spkv.lkv.sequence_gate turns the scores into a log-mask (soft, anneal) or
    eviction times (hard), and the same gated attention applies them."""
    from spkv.lkv import sequence_gate

    config: SPKVConfig = scorer.config
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("An LKV model must decode with spkv's compressed cache, not a plain transformers cache: pass "
                           "cache=spkv.SPKVCache(model) (or leave SPKVConfig.auto_cache on).")
    if scorer.shares is None:
        raise RuntimeError("LKV scorer has no shares: call the model itself (its pre-hook solves the budgets), not a layer.")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    valid = attention_mask[:, 0, -1, :] if attention_mask is not None else None
    scores = scorer(key, value).transpose(1, 2)  # [B, Hkv, T]
    gate, death, dead = sequence_gate(scores, scorer.shares, config, valid)
    if death is None and attention_mask is None and dropout == 0.0 and query.device.type == "cpu":
        return flash_gated_attention(query, key, value, gate, config.window, scaling)
    return gated_attention(query, key, value, gate, config.window, scaling, attention_mask, dropout, key_death=death,
                           dead_log_gate=dead)


# Attention variants some families pass to the attention function; the gated rule implements none of
# them, so a gated layer receiving one raises instead of silently computing something else.
UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux")


def register() -> None:
    """Make "spkv" a valid attn_implementation (idempotent)."""
    register_attention(ATTN_IMPLEMENTATION, spkv_attention_forward)

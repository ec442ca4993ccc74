"""LKV: learned head-wise budgets (LKV-H) and a learned token scorer (LKV-T), evicting under budget.

After Zhou et al., "End-to-End Learning of Head-wise Budgets and Token Selection for LLM KV Cache
Eviction" (arXiv 2605.06676). Its body is not public: everything below is our design, built on the
same compact cache as SP-KV (docs/design.md, "LKV").

* Budgets: each (gated layer, KV head) has a learned logit e; its share of the out-of-window pairs
  is s = sigmoid(e + b), with the one shift b solved so that the shares average to the global budget
  r. Shares stay in [0, 1], r can change at deployment (b is re-solved), and gradients reach e
  through the solve (implicit differentiation, `solve_shift`).
* Token scores: a small MLP per KV head on the pair's key and value, computed once when the pair is
  written: no query, no attention matrix. Keys arrive rotated (post-rotary: the attention function
  sees no other keys, and families fuse or norm their projections differently); the scorer reads the
  magnitude of each rotary pair of dimensions (i, i + D/2), which rotate-half RoPE leaves unchanged,
  so the score does not depend on the position.
* Inference (cache.py): a head keeps at most floor(s x pairs that have left its window); every E
  (`LKVConfig.exit_every`) exits of a sequence's real pairs, each of its heads over budget drops its
  lowest-scored pairs (ties: the newer goes). `eviction_times` is the same rule on a whole sequence.
* Training: a soft top-k per (sequence, head), a sigmoid mask whose threshold is solved so the mask
  sums to the head's budget over the sequence's out-of-window pairs, added as log-mask to the
  out-of-window logits (the same gated attention as SP-KV); its temperature anneals toward hard,
  and the anneal phase blends it with the causal eviction rule itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spkv.config import SPKVConfig

NEVER = torch.iinfo(torch.long).max  # eviction time of a pair that is never evicted


def solve_shift(x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, iters: int = 50) -> torch.Tensor:
    """theta [...] with sum_i mask_i sigmoid(x_i - theta) = target, for x [..., N], target [...].

    Bisection without gradient, then one Newton step that carries the implicit gradient:
    d theta / d x_i = sigmoid'(x_i - theta) / D and d theta / d target = -1 / D, D = sum sigmoid'."""
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    with torch.no_grad():
        xd = x.detach().float()
        big = xd.masked_fill(~mask, float("-inf")).amax(-1).clamp_min(-1e4) + 40
        small = xd.masked_fill(~mask, float("inf")).amin(-1).clamp_max(1e4) - 40
        lo, hi = small, big
        for _ in range(iters):
            mid = (lo + hi) / 2
            total = (torch.sigmoid(xd - mid.unsqueeze(-1)) * mask).sum(-1)
            too_many = total > target.detach()
            lo, hi = torch.where(too_many, mid, lo), torch.where(too_many, hi, mid)
        theta = (lo + hi) / 2
    s = torch.sigmoid(x.float() - theta.unsqueeze(-1)) * mask
    slope = (s * (1 - s)).sum(-1).detach().clamp_min(1e-12)
    return theta + (s.sum(-1) - target) / slope


def head_shares(logits: torch.Tensor, budget: float, uniform: bool = False) -> torch.Tensor:
    """Shares [N] in [0, 1] with mean `budget`, from the budget logits [N] of all gated heads."""
    if uniform or budget >= 1.0:
        return torch.full_like(logits, budget)
    target = torch.tensor(budget * logits.numel(), dtype=torch.float32, device=logits.device)
    return torch.sigmoid(logits.float() - solve_shift(logits, target))


def soft_topk(scores: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft keep-mask [..., N] in (0, 1) summing to k [...] over `mask`: sigmoid((score - theta) / T).
    As T -> 0 it tends to the hard top-k (the k highest scores get 1)."""
    x = scores.float() / temperature
    k = torch.minimum(k, mask.sum(-1).float() - 1e-3).clamp_min(1e-3)  # a strictly feasible target
    return torch.sigmoid(x - solve_shift(x, k, mask).unsqueeze(-1)) * mask


def budget_limits(shares: torch.Tensor, decided: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Pairs a head may hold: floor(share x decided) + its sinks. shares [Hkv]; decided [B, Hkv] (pairs
    that left the window, not sinks or padding); sinks [B] -> [B, Hkv] long. One formula for the
    cache and for `eviction_times`, in float64 so both round alike."""
    return torch.floor(shares.double().cpu() * decided.double().cpu()).long() + sinks.cpu().long().unsqueeze(1)


RESOLUTION = 2.0 ** -10  # scores are compared on this grid


def keep_order(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[..., N] rank of each pair in keep order: higher score first, the older first among equal scores.

    Scores are compared at RESOLUTION: the same pair scored by a prefill and by a decode step differs
    by rounding (~1e-7), and a repeated token in the first layer scores the same as its earlier copy
    up to that rounding (its key differs only by rotation), so without the grid such near-ties would
    rank differently in different code paths."""
    scores = torch.round(scores.float() / RESOLUTION)
    by_pos = positions.argsort(dim=-1, stable=True)
    order = by_pos.gather(-1, (-scores.gather(-1, by_pos)).argsort(dim=-1, stable=True))
    return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


_KEY_SPAN = 2 ** 30  # |score / RESOLUTION| and positions below this fit one int64 key (worst_pairs)


def worst_pairs(scores: torch.Tensor, positions: torch.Tensor, held: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[n, W] bool: the count[i] last pairs of row i in keep_order among its held ones (what a cut
    evicts). scores, positions [n, W] (+inf: a sink, never evicted); held [n, W]; count [n] long.

    One topk over an int64 key (score grid, then the older first) instead of keep_order's two full
    sorts: a cut evicts a few pairs of a head holding thousands. Keys out of range use keep_order."""
    grid = torch.round(scores.float() / RESOLUTION)
    finite = torch.isfinite(grid) & held
    if bool((grid[finite].abs() >= _KEY_SPAN).any()) or bool((positions[held] >= _KEY_SPAN).any()):
        rank = keep_order(scores.masked_fill(~held, float("-inf")), positions)
        return held & (rank >= (held.sum(-1) - count).unsqueeze(-1))
    top = torch.iinfo(torch.long).max
    key = grid.clamp(-_KEY_SPAN, _KEY_SPAN).long() * (2 * _KEY_SPAN) + (_KEY_SPAN - 1 - positions)  # higher: kept first
    key = key.masked_fill(torch.isposinf(grid), top - 1).masked_fill(~held, top)
    k = int(count.max()) if len(count) else 0
    if k == 0:
        return torch.zeros_like(held)
    lowest = key.topk(k, dim=-1, largest=False).indices  # [n, k], the worst first
    take = torch.arange(k, device=held.device).unsqueeze(0) < count.unsqueeze(1)
    return torch.zeros_like(held).scatter_(-1, lowest, take)


def eviction_times(scores: torch.Tensor, shares: torch.Tensor, window: int, every: int, sinks: int = 0,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """The cache's eviction rule on a whole sequence: [B, Hkv, T] the first query that no longer sees
    each pair (NEVER if none does). scores [B, Hkv, T]; shares [Hkv]; valid [B, T] (False: padding).

    Pair p leaves the window for query p + window. Each time a sequence's count of real pairs that
    have left reaches a multiple of `every`, each of its heads keeps its budget_limits() best pairs
    among those it holds; the rest are gone for the queries from p + window on (counting real pairs,
    not positions, makes a left-padded sequence evict as it would alone). Padding is never held;
    sinks (the first `sinks` real tokens) always are."""
    b, hkv, t = scores.shape
    device = scores.device
    valid = torch.ones(b, t, dtype=torch.bool, device=device) if valid is None else valid.to(device)
    real_count = valid.long().cumsum(-1)  # [B, T] real pairs up to each position
    sink = valid & (real_count <= sinks)
    counted = (valid & ~sink).long().cumsum(-1)  # [B, T] decided after each exit
    sink_count = sink.long().cumsum(-1)
    pos = torch.arange(t, device=device)
    rank = keep_order(scores.float().masked_fill(sink.unsqueeze(1), float("inf")), pos.expand(b, hkv, t))
    order = rank.argsort(-1)  # pairs in keep order
    death = torch.full((b, hkv, t), NEVER, dtype=torch.long, device=device)
    death.masked_fill_(~valid.unsqueeze(1), 0)  # padding: invisible anyway
    held = torch.zeros(b, hkv, t, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)
    for j in range(1, t // every + 1):  # the j-th cut of each sequence, after its (j x every)-th real exit
        hit = valid & (real_count == j * every)
        at = torch.where(hit.any(-1), hit.long().argmax(-1), t)  # [B] position of the cut (t: none)
        live = at < t - window  # a cut some query sees
        if not live.any():
            break
        p = at.clamp_max(t - 1)
        exited = (pos.view(1, t) <= p.view(b, 1)).unsqueeze(1)
        held |= exited & (death == NEVER) & live.view(b, 1, 1)
        limit = budget_limits(shares, counted[rows, p].unsqueeze(1).expand(b, hkv), sink_count[rows, p]).to(device)
        in_order = held.gather(-1, order)
        keep_sorted = in_order & (in_order.long().cumsum(-1) <= limit.unsqueeze(-1))
        keep = torch.zeros_like(held).scatter_(-1, order, keep_sorted)
        cut = live.view(b, 1, 1)
        death = torch.where(cut & held & ~keep, (p + window).view(b, 1, 1), death)
        held = torch.where(cut, keep, held)
    return death


def rotary_invariant_features(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """keys, values [..., D] -> [..., D/2 + D]: |(k_i, k_{i+D/2})| for each rotary pair, then v."""
    k = keys.float()
    d = k.shape[-1] // 2
    # sqrt(a^2 + b^2) on the two halves: a norm over an unflattened middle dimension is ~15x slower on
    # CPU (a strided reduction), and the clamp keeps the gradient finite at a zero pair.
    half = (k[..., :d].square() + k[..., d:].square()).clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    return torch.cat([half, values.float()], -1)


class TokenScorer(nn.Module):
    """LKV-T for one layer: a two-layer SiLU MLP per KV head on each pair's key and value -> one score,
    plus LKV-H's budget logits of the layer's KV heads (all of one layer's LKV parameters in one place,
    so adapters and optimizers treat them like SP-KV's predictors)."""

    def __init__(self, head_dim: int, num_kv_heads: int, config: SPKVConfig) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"LKV's scorer needs an even head_dim (rotary pairs), got {head_dim}.")
        features, hidden = head_dim // 2 + head_dim, config.predictor_hidden
        self.num_kv_heads = num_kv_heads
        self.w1 = nn.Parameter(torch.randn(num_kv_heads, features, hidden) * features ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(num_kv_heads, hidden))
        self.w2 = nn.Parameter(torch.randn(num_kv_heads, hidden) * hidden ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(num_kv_heads))
        self.budget_logits = nn.Parameter(torch.zeros(num_kv_heads))
        self.config = config  # shared with the model; swapped by spkv.update_config
        self.shares: torch.Tensor | None = None  # [Hkv], set before each forward by shares_hook

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """keys, values [B, Hkv, n, D] -> scores [B, n, Hkv] (the layout of SP-KV's gate logits)."""
        x = rotary_invariant_features(keys, values).to(self.w1.dtype)  # [B, Hkv, n, F]
        h = F.silu(torch.matmul(x, self.w1).add_(self.b1[:, None]))  # [B, Hkv, n, hidden]: one batched GEMM
        return (torch.matmul(h, self.w2.unsqueeze(-1)).squeeze(-1) + self.b2[:, None]).transpose(1, 2)


def scorers(model: nn.Module) -> dict[int, TokenScorer]:
    from spkv.convert import predictors

    return {i: p for i, p in predictors(model).items() if isinstance(p, TokenScorer)}


def model_shares(model: nn.Module, budget: float | None = None) -> dict[int, torch.Tensor]:
    """layer -> shares [Hkv] of an LKV model at `budget` (default: its LKVConfig's)."""
    cfg = model.spkv_config.lkv
    layers = scorers(model)
    logits = torch.cat([s.budget_logits for s in layers.values()])
    shares = head_shares(logits, cfg.budget if budget is None else budget, cfg.uniform)
    return dict(zip(layers, shares.split([s.num_kv_heads for s in layers.values()])))


def shares_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Model-level pre-hook: every scorer gets its layer's shares for this forward (with gradient)."""
    from spkv.cache import SPKVCache
    from spkv.compat import cache_argument

    if isinstance(cache_argument(kwargs)[1], SPKVCache):  # the cache holds its own shares
        return args, kwargs
    layers = scorers(model)
    for i, shares in model_shares(model).items():
        layers[i].shares = shares
    return args, kwargs


def sequence_gate(scores: torch.Tensor, shares: torch.Tensor, config: SPKVConfig, valid: torch.Tensor | None):
    """Training and full-sequence forward: scores [B, Hkv, T] -> (log gate [B, Hkv, T], eviction times
    [B, Hkv, T] or None, log gate after eviction [B, Hkv, T] or None: -inf if None).

    Soft: log of the soft top-k mask (sums to share x the sequence's out-of-window pairs). Hard: the
    exact eviction rule, as eviction times (the log gate is 0). Anneal: the blend (1 - a) soft + a hard
    with the hard part the same causal eviction rule, so a pair weighs (1 - a) soft + a until its
    eviction and (1 - a) soft after it; at a = 1 it is the hard rule exactly."""
    lkv = config.lkv
    b, hkv, t = scores.shape
    valid = torch.ones(b, t, dtype=torch.bool, device=scores.device) if valid is None else valid
    death = None
    if config.phase != "soft":
        death = eviction_times(scores.detach(), shares.detach(), config.window, lkv.exit_every, config.sinks, valid)
    if config.phase == "hard":
        return torch.zeros_like(scores), death, None
    real_rank = valid.long().cumsum(-1) - 1
    sink = valid & (real_rank < config.sinks)
    far = valid & ~sink & (torch.arange(t, device=scores.device) < t - config.window)  # out of window for some query
    mask = far.unsqueeze(1).expand(b, hkv, t)
    k = shares.float().view(1, hkv) * far.sum(-1, keepdim=True).float()
    soft = soft_topk(scores, k, mask, lkv.temperature) if far.any() else scores.new_zeros(b, hkv, t).float()
    if config.phase == "soft":
        return torch.log(soft.clamp_min(1e-30)).masked_fill(~mask, 0.0).to(scores.dtype), None, None
    a = config.anneal_alpha
    alive = torch.log(((1 - a) * soft + a).clamp_min(1e-30)).masked_fill(~mask, 0.0)
    dead = torch.log(((1 - a) * soft).clamp_min(1e-30)).to(scores.dtype) if a < 1 else None  # None: gone
    return alive.to(scores.dtype), death, dead


def set_budget(model: nn.Module, budget: float) -> SPKVConfig:
    """Deploy-time r of an LKV model: the shares are re-solved, no retraining."""
    from spkv.convert import update_config

    cfg = getattr(model, "spkv_config", None)
    if cfg is None or cfg.lkv is None:
        raise ValueError("set_budget needs an LKV model (spkv.convert with SPKVConfig(lkv=LKVConfig()) or an LKV adapter); "
                         "an SP-KV model is tuned with spkv.set_threshold.")
    return update_config(model, lkv=cfg.lkv.replace(budget=budget))

"""One gated layer of the compressed KV cache: it physically holds only the local window and the
pairs that were kept.

  * the window (window.py): the last `window` pairs of every sequence and KV head (plus, during a
    forward, the chunk being processed), with their positions, scores and padding flags, in a ring
    [B, Hkv, C, D] that decode steps update in place;
  * the global store (store.py): the kept pairs of every (sequence, KV head), a different number
    per head, in pages of a shared pool, so bytes held track the kept pairs and decode attention
    covers every head in a few batched ops.
When a pair leaves the window, the scoring policy's score decides (keep iff score >= threshold), or,
under a budget, each head evicts its lowest-scored pairs. Attention of new queries runs over
(global store + window) under the same rule as training (see attention.py).
"""


from __future__ import annotations

import torch
import torch.nn.functional as F

from spkv.attention import window_bias
from spkv.compat import (
    CacheLayerMixin,
)
from spkv.config import SPKVConfig
from spkv.lkv import NEVER, budget_limits
from spkv.policies import ScoringPolicy
from spkv.store import PagedStore, page_size
from spkv.window import Window


class SPKVLayer(CacheLayerMixin):
    """One gated layer's cache. `update` appends; `attend` computes attention then evicts."""

    is_sliding = False

    def __init__(self, layer_idx: int, window: int, policy: ScoringPolicy, sinks: int,
                 shares: torch.Tensor | None = None, exit_every: int = 1, exit_batch: int = 1, page: int | None = None) -> None:
        super().__init__()
        self.layer_idx, self.window, self.policy, self.sinks = layer_idx, window, policy, sinks
        self.page = page_size(window) if page is None else page  # pairs per page of the store
        # Decode takes window exits every `exit_batch` steps (one host transfer then, none between):
        # pairs past the window wait in the ring, shown or hidden by the same rule, so it is exact.
        # Only write-time policies without a budget can wait: the others decide on exit.
        batchable = not (policy.needs_attention or policy.needs_queries or shares is not None)
        self.exit_batch = exit_batch if batchable else 1
        # Eviction under budget (LKV, or any write-time policy with a budget): [Hkv] each head's share
        # of the pairs that left its window; every `exit_every` exits a head over it drops its worst.
        self.shares, self.exit_every = shares, exit_every
        self.seen = 0  # tokens processed (the logical sequence length)
        self.spkv_config: SPKVConfig | None = None
        self.staged_logits: torch.Tensor | None = None  # [B, n, Hkv] gates of the incoming tokens
        self.staged_scorer: torch.nn.Module | None = None  # LKV: scores the incoming keys and values
        self.pending_valid: torch.Tensor | None = None  # [B, n] False for padding
        self.recent_q: torch.Tensor | None = None  # [B, Hkv, G, <=window, D], only if the policy needs_queries
        self.record_past = False  # transformers' protocol for caches that can be cropped (assisted decoding)

    # -- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        self.batch_size, self.num_kv_heads, self.head_dim = b, hkv, d
        self.dtype, self.device = key_states.dtype, key_states.device
        self.recent = Window(b, hkv, d, self.dtype, self.device, self.window, slack=self.exit_batch - 1)
        self.store = PagedStore(b * hkv, d, self.dtype, self.device, self.page)
        self.valid_seen = torch.zeros(b, dtype=torch.long, device=self.device)
        self.decided = torch.zeros(b, hkv, dtype=torch.long)  # out-of-window, non-sink, real pairs
        self.kept = torch.zeros(b, hkv, dtype=torch.long)
        self.sinks_stored = torch.zeros(b, dtype=torch.long)
        self.exited_real = torch.zeros(b, dtype=torch.long)  # real pairs (sinks too) that left the window
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new pairs [B, Hkv, n, D] to the window; the decision waits for them to leave it."""
        if self.staged_scorer is not None:
            self.staged_logits = self.staged_scorer(key_states, value_states).detach()
            self.staged_scorer = None
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
        self.recent.append(key_states, value_states, scores, valid, valid & (rank < self.sinks), self.seen)
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
        self.__init__(self.layer_idx, self.window, self.policy, self.sinks, self.shares, self.exit_every, self.exit_batch)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence b continues old sequence beam_idx[b] (window, store and counters)."""
        if not self.is_initialized:
            return
        rows = beam_idx.to(torch.long).cpu()
        self.recent.reorder(rows)
        heads = (rows.view(-1, 1) * self.num_kv_heads + torch.arange(self.num_kv_heads)).flatten()
        self.store.reorder(heads)
        self.valid_seen = self.valid_seen.index_select(0, rows.to(self.valid_seen.device))
        self.decided, self.kept = self.decided.index_select(0, rows), self.kept.index_select(0, rows)
        self.sinks_stored, self.exited_real = self.sinks_stored.index_select(0, rows), self.exited_real.index_select(0, rows)
        if self.recent_q is not None:
            self.recent_q = self.recent_q.index_select(0, rows.to(self.recent_q.device))

    @property
    def is_croppable(self) -> bool:
        """Write-time policies (SP-KV's included) can roll back: a decision never depends on later
        tokens. Attention-based ones re-score pairs by what later queries do, so they cannot."""
        return not (self.policy.needs_attention or self.policy.needs_queries or self.shares is not None)

    def activate_past_recording(self) -> None:
        """Defer window exits until `crop`: pairs past the window stay in the ring, hidden or shown by
        the same rule (exact), so the newest tokens can still be removed."""
        if self.shares is not None:
            raise ValueError("A cache that evicts under a budget (LKV) cannot be cropped: an evicted pair cannot come "
                             "back. Assisted and prompt-lookup decoding need cropping; decode without them.")
        if not self.is_croppable:
            raise ValueError(f"The {self.policy.name!r} policy scores pairs by later attention, so its cache cannot be "
                             "cropped (assisted and prompt-lookup decoding need that): use SP-KV or a write-time policy.")
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest -tokens_to_remove tokens (a rejected draft), then take the window exits
        deferred since the last crop. crop(0) only takes the deferred exits."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number: how many of the newest tokens to remove.")
        if not self.is_initialized:
            return
        k = -tokens_to_remove
        if k:
            oldest_needed = max(0, self.seen - k - self.window + 1)  # the next query's window starts there
            if self.seen - self.recent.size > oldest_needed:
                raise ValueError(f"Cannot remove {k} tokens: their window exits were already taken. For assisted or "
                                 "prompt-lookup decoding pass generate(..., cache=spkv.SPKVCache(model)): generate then "
                                 "calls its activate_past_recording() before decoding, which the implicit cache misses.")
            gone = self.recent.drop_newest(k)
            self.valid_seen -= gone.long().sum(1).to(self.valid_seen.device)
            self.seen -= k
        self._evict(self.seen - self.window)

    # -- SP-KV ---------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        if self.policy.threshold is not None:
            return self.policy.threshold
        return self.spkv_config.threshold

    def _keep(self, scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        """scores [B, Hkv, m], sink [B, m] -> the write decision [B, Hkv, m] (under a budget every pair
        is stored when it leaves the window; eviction decides later)."""
        if self.shares is not None:
            return torch.ones_like(scores, dtype=torch.bool)
        return (scores >= self.threshold) | sink.unsqueeze(1)

    def stored(self, bi: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs kept for sequence bi, KV head hi, in order: (keys, values) [L, D]."""
        return self.store.get(bi * self.num_kv_heads + hi)

    def kept_positions(self, bi: int, hi: int) -> torch.Tensor:
        """[n] token indices a query after the last token can attend to for sequence bi, KV head hi:
        the stored pairs, then the window's real pairs (what the cache physically holds and shows)."""
        recent, live = self.recent, self.recent.live_slots()
        pos, valid = recent.pos[live], recent.valid[bi, live]
        past = self.seen - pos >= self.window  # exits deferred (batched, or until crop): the rule decides
        keep = self._keep(recent.score[bi : bi + 1, hi : hi + 1, live], recent.sink[bi : bi + 1, live])[0, 0]
        window = pos[valid & (~past | keep)]
        return torch.cat([self.store.positions(bi * self.num_kv_heads + hi).cpu(), window.cpu()])

    def store_lengths(self) -> torch.Tensor:
        """[B, Hkv] pairs kept per sequence and KV head."""
        return self.store.lengths.view(self.batch_size, self.num_kv_heads)

    def _window_bias(self, n: int, end: int | None = None) -> torch.Tensor:
        """The SP-KV rule over the window's slots for the n queries before `end` (default: the newest n): [B, Hkv, n, C]."""
        recent = self.recent
        end = self.seen if end is None else end
        q_pos = torch.arange(end - n, end, device=self.device)
        dist = q_pos.view(n, 1) - recent.pos.view(1, -1)  # [n, C]
        if self.policy.needs_attention or self.policy.needs_queries:  # undecided until they leave: visible (exact when n == 1)
            gate = torch.zeros_like(recent.score)
        else:
            gate = torch.zeros_like(recent.score).masked_fill(~self._keep(recent.score, recent.sink), float("-inf"))
        bias = window_bias(dist.view(1, 1, n, -1), self.window, gate.unsqueeze(2), recent.valid.view(self.batch_size, 1, 1, -1))
        # A query that sees nothing (left padding, before any real token) gets a finite, unused result.
        blind = torch.isneginf(bias).all(-1, keepdim=True) & self.store.empty_heads().view(self.batch_size, -1, 1, 1)
        return bias.masked_fill(blind, 0.0)

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the newest n queries [B, H, n, D] over global store + window -> [B, n, H, D]."""
        b, h, n, d = query.shape
        q = query.view(b, self.num_kv_heads, h // self.num_kv_heads, n, d)
        if self.shares is not None and n > 1:
            return self._attend_budgeted(q, scaling).view(b, h, n, d).transpose(1, 2)
        bias = self._window_bias(n).to(query.dtype)
        want_probs = self.policy.needs_attention
        attend = self._attend_one if n == 1 else self._attend_per_head
        out, probs = attend(q, bias, scaling, want_probs)
        if want_probs or self.policy.needs_queries:
            self._observe(q, probs, scaling)
        if n > 1 or self._exits_up_to(self.seen - self.window) >= self.exit_batch:
            self.take_exits()
        return out.view(b, h, n, d).transpose(1, 2)

    def take_exits(self) -> None:
        """Decide now the pairs whose batched exit is still waiting (before reading counts or bytes)."""
        if self.is_initialized and not self.record_past:
            self._evict(self.seen - self.window)

    def _attend_budgeted(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """A prefill chunk under a budget, exact, in one attention per head: the chunk's exits and cuts
        (every exit_every exits of a sequence, its heads cut back to budget) run first, noting for each
        evicted pair the first query that no longer sees it; each query then attends over the pairs
        stored before the chunk and the window's, each visible until its cut.
        q [B, Hkv, G, n, D] -> same shape."""
        b, hkv, _, n, _ = q.shape
        recent, first = self.recent, self.seen - q.shape[3]
        before = [(*self.store.get(h), self.store.positions(h)) for h in range(b * hkv)]  # the store at the chunk's start
        win_k, win_v, win_pos, win_valid = recent.k, recent.v, recent.pos, recent.valid.clone()  # exits only drop slots
        oldest = self.seen - recent.size
        leaving = max(0, self._exits_up_to(self.seen - self.window))
        cuts = sorted({oldest + j + self.window for j in self._cuts(leaving).any(0).nonzero().flatten().tolist()})
        death = torch.full((b * hkv, self.seen), NEVER, dtype=torch.long, device=self.device)  # [heads, positions]
        for a in [first, *(a for a in cuts if first < a < self.seen)]:  # the queries from a on see the cut
            evicted: list[tuple[torch.Tensor, torch.Tensor]] = []
            self._evict(a - self.window, evicted)
            for heads, pos in evicted:
                death[heads, pos] = a
        self._evict(self.seen - self.window)  # cuts no query of this chunk sees
        q_pos = torch.arange(first, self.seen, device=self.device).view(n, 1)
        dist = q_pos - win_pos.view(1, -1)  # [n, C]
        in_window = (dist >= 0) & (dist < self.window)
        exited = (dist >= self.window).unsqueeze(0) & (q_pos < death[:, win_pos.clamp(0, self.seen - 1)].unsqueeze(1))
        sees = (in_window | exited).view(b, hkv, n, -1) & win_valid.view(b, 1, 1, -1)
        bias = torch.zeros(sees.shape, dtype=q.dtype, device=self.device).masked_fill_(~sees, float("-inf"))
        stored = []
        for h, (k, v, pos) in enumerate(before):
            seen_by = q_pos < death[h, pos].view(1, -1)  # [n, L]
            stored.append((k, v, torch.zeros(seen_by.shape, dtype=q.dtype, device=self.device).masked_fill_(~seen_by, float("-inf"))))
        return self._attend_per_head(q, bias, scaling, False, stored, (win_k, win_v))[0]

    def _cuts(self, m: int) -> torch.Tensor:
        """[B, m] (host) True where the i-th oldest window pair, on leaving, completes a multiple of
        exit_every real exits of its sequence: its heads are cut back to budget then."""
        valid = self.recent.oldest(m)[4].cpu() if m else torch.zeros(self.batch_size, 0, dtype=torch.bool)
        count = self.exited_real.unsqueeze(1) + valid.long().cumsum(1)
        return valid & (count % self.exit_every == 0)

    def _attend_one(self, q: torch.Tensor, bias: torch.Tensor, scaling: float, want_probs: bool):
        """Decode (one query per sequence): every head at once. The softmax over store + window is
        split in two and merged: the window part here, the store part in PagedStore.attend.

        q [B, Hkv, G, 1, D], bias [B, Hkv, 1, C] -> (out [B, Hkv, G, 1, D], probs [B, Hkv, G, 1, C] or None)."""
        b, hkv, g, _, d = q.shape
        heads, recent = b * hkv, self.recent
        q2 = q.reshape(heads, g, d)
        scores = torch.baddbmm(bias.reshape(heads, 1, -1), q2, recent.k.view(heads, -1, d).transpose(1, 2),
                               alpha=scaling).float()  # [heads, G, C]
        m_store, l_store, o_store = self.store.attend(q2, scaling)
        m = torch.maximum(scores.amax(-1), m_store)  # finite: every query sees a window or a stored pair
        e = scores.sub_(m.unsqueeze(-1)).exp_()
        rescale = (m_store - m).exp_()  # 0 for a head with an empty store
        total = e.sum(-1) + l_store * rescale
        o = torch.bmm(e.to(q.dtype), recent.v.view(heads, -1, d)).float() + o_store * rescale.unsqueeze(-1)
        out = (o / total.unsqueeze(-1)).to(q.dtype).view(b, hkv, g, 1, d)
        probs = (e / total.unsqueeze(-1)).view(b, hkv, g, 1, -1) if want_probs else None
        return out, probs

    def _attend_per_head(self, q: torch.Tensor, bias: torch.Tensor, scaling: float, want_probs: bool,
                         stored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
                         window: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Prefill chunks (n > 1 queries): per (sequence, KV head), sdpa over [its stored pairs, window]
        (explicit softmax when the policy needs the window's attention probabilities). The per-head
        calls cost little next to n queries' work. By default every stored pair is visible to every
        new query; `stored` gives per head (keys, values [L, D], bias [n, L]) instead, and `window`
        the window's (keys, values [B, Hkv, C, D]) (eviction under a budget: a snapshot).

        q [B, Hkv, G, n, D], bias [B, Hkv, n, C] -> (out [B, Hkv, G, n, D], probs [B, Hkv, G, n, C] or None)."""
        b, hkv, g, n, d = q.shape
        win_k, win_v = window if window is not None else (self.recent.k, self.recent.v)
        out = torch.empty_like(q)
        probs = [] if want_probs else None
        for bi in range(b):
            for hi in range(hkv):
                if stored is None:
                    k_store, v_store = self.stored(bi, hi)
                    store_bias = bias.new_zeros(n, k_store.shape[0])
                else:
                    k_store, v_store, store_bias = stored[bi * hkv + hi]
                length = k_store.shape[0]
                k = torch.cat([k_store, win_k[bi, hi]]) if length else win_k[bi, hi]  # [L + C, D]
                v = torch.cat([v_store, win_v[bi, hi]]) if length else win_v[bi, hi]
                mask = torch.cat([store_bias, bias[bi, hi]], -1) if length else bias[bi, hi]  # [n, L + C]
                if stored is not None:  # a query that sees nothing (left padding): a finite, unused result
                    mask = mask.masked_fill(torch.isneginf(mask).all(-1, keepdim=True), 0.0)
                if probs is None:
                    out[bi, hi] = F.scaled_dot_product_attention(
                        q[bi, hi].unsqueeze(0), k.expand(1, g, -1, d), v.expand(1, g, -1, d), attn_mask=mask, scale=scaling)[0]
                else:
                    p = torch.softmax(((q[bi, hi] @ k.T) * scaling + mask).float(), dim=-1)  # [G, n, L + C]
                    out[bi, hi] = p.to(q.dtype) @ v
                    probs.append(p[..., length:])
        return out, None if probs is None else torch.stack(probs).view(b, hkv, g, n, -1)

    def _observe(self, q: torch.Tensor, probs: torch.Tensor | None, scaling: float) -> None:
        """Re-score the window's pairs from the attention they received (probs [B, Hkv, G, n, C], by
        slot) or from the recent queries (q [B, Hkv, G, n, D]). Policies see the live pairs in order."""
        recent = self.recent
        live = recent.live_slots()  # [R] slots, oldest first
        score = recent.score[..., live]
        if probs is not None:
            score = self.policy.observe(score, probs[..., live])
        if self.policy.needs_queries:  # the last `window` queries, for policies that model them
            self.recent_q = q if self.recent_q is None else torch.cat([self.recent_q, q], dim=3)[:, :, :, -self.window :]
            score = self.policy.observe_queries(score, recent.k[:, :, live], recent.v[:, :, live], self.recent_q, scaling)
        recent.score[..., live] = score

    def _evict(self, upto: int, evicted: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Decide every window pair at position <= upto: it moves to the global store or is gone.
        Under a budget, `evicted` collects the (heads, positions) its cuts evicted."""
        recent = self.recent
        m = self._exits_up_to(upto)
        if m <= 0:
            return
        if self.shares is not None:
            return self._evict_budgeted(m, evicted)
        keys, values, score, pos, valid, sink = recent.oldest(m)
        keep = self._keep(score, sink) & valid.unsqueeze(1)  # [B, Hkv, m]
        # One transfer per eviction (a sync on GPU); the bookkeeping below runs on the host.
        keep, counted = keep.cpu(), (valid & ~sink).cpu().unsqueeze(1)
        self.decided += counted.sum(-1).expand_as(self.decided)
        self.kept += (keep & counted).sum(-1)
        heads = self.batch_size * self.num_kv_heads
        self.store.append(keep.view(heads, m), keys.reshape(heads, m, -1), values.reshape(heads, m, -1), pos)
        recent.drop(m)

    def _exits_up_to(self, upto: int) -> int:
        """How many of the window's oldest pairs are at positions <= upto (it holds seen - size ..)."""
        return min(self.recent.size, upto - (self.seen - self.recent.size) + 1)

    def _evict_budgeted(self, m: int, evicted: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """The m oldest window pairs leave: every real one is stored, with its score (sinks: +inf,
        never evicted); each time a sequence's real exits reach a multiple of exit_every, each of its
        heads over budget_limits() drops its worst pairs (spkv.lkv.eviction_times is the same rule)."""
        recent, heads = self.recent, self.batch_size * self.num_kv_heads
        cuts = self._cuts(m)
        while m > 0:
            any_cut = cuts.any(0).nonzero().flatten()
            seg = int(any_cut[0]) + 1 if len(any_cut) else m  # up to the next cut of any sequence
            keys, values, score, pos, valid, sink = recent.oldest(seg)
            real, sink_h = valid.cpu(), sink.cpu()  # one transfer each per segment
            keep = real.unsqueeze(1).expand(-1, self.num_kv_heads, -1)
            self.decided += (real & ~sink_h).sum(-1, keepdim=True)
            self.sinks_stored += (real & sink_h).sum(-1)
            self.exited_real += real.sum(-1)
            score = score.masked_fill(sink.unsqueeze(1), float("inf"))
            self.store.append(keep.reshape(heads, seg), keys.reshape(heads, seg, -1), values.reshape(heads, seg, -1), pos,
                              scores=score.reshape(heads, seg))
            recent.drop(seg)
            if len(any_cut):
                limits = budget_limits(self.shares, self.decided, self.sinks_stored)
                cut = cuts[:, seg - 1].unsqueeze(1).expand_as(limits)  # sequences cut now; others keep all they hold
                gone = self.store.shrink(torch.where(cut, limits, self.store_lengths()).reshape(-1))
                if evicted is not None:
                    evicted.append(gone)
            self.kept = self.store_lengths() - self.sinks_stored.unsqueeze(1)
            cuts, m = cuts[:, seg:], m - seg

    @property
    def bytes_per_pair(self) -> int:
        return 2 * self.head_dim * self.recent.k.element_size()

    def nbytes(self) -> tuple[int, int]:
        """(bytes held, bytes in use) of this layer's keys and values: the window counts whole."""
        if not self.is_initialized:
            return 0, 0
        per = self.bytes_per_pair
        return self.recent.nbytes() + self.store.capacity_pairs() * per, self.recent.nbytes() + self.store.stored_pairs() * per

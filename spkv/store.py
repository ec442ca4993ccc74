"""The kept pairs of one gated layer: a paged store shared by all (sequence, KV head) of the layer.

Every (sequence, KV head) keeps a different number of pairs. Per-head buffers hold exactly what each
head kept but cost one attention call per head: B x Hkv x layers small ops per decode step, which
dominated SP-KV decode time (results/bench/decode_profile.md). One padded [B, Hkv, L_max, D] tensor
would be one call, but would hold the longest head's length for every head. So the store is a pool
of fixed-size pages: each head's pairs fill its own pages in order (only its last page is partly
empty), bytes held track the kept pairs, and decode attention over every head of the layer is a few
batched ops over the whole pool (`attend`: one bmm for the scores, a softmax segmented by the pages'
owners, one bmm for the values).

Heads are numbered b * Hkv + h. Page bookkeeping (lengths, page table) lives on the host; the pool
and the pages' owners live on the model's device.
"""

from __future__ import annotations

import torch

from spkv.lkv import worst_pairs

PAGE = 32  # pairs per page (at most): bmm over 32-pair pages runs about as fast as over contiguous pairs


def page_size(window: int) -> int:
    """Pages of at most window / 4 pairs: a head's partly empty last page then wastes less than a
    quarter of the window it holds anyway (small windows get small pages)."""
    return max(1, min(PAGE, window // 4))
_MIN_GROWTH = 2  # pages
_GROWTH_FRACTION = 32  # the pool grows by 1/32 of its capacity when full (appends never copy it per pair)


class PagedStore:
    """Kept pairs of `heads` (sequence, KV head) rows: a pool of pages plus a page table."""

    def __init__(self, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, page: int = PAGE) -> None:
        self.heads, self.head_dim, self.page = heads, head_dim, page
        # Keys transposed per page, [capacity, D, page], values not, [capacity, page, D]: both decode bmms
        # (query @ keys, probs @ values) then read their right operand untransposed. On the Xeon of
        # results/bench/store_layout that ran the keys' pass 1.6-1.9x and the values' up to 1.3x faster
        # than the transposed layouts. BLAS speed per layout depends on the CPU: rerun
        # scripts/bench_store_layout.py before changing it.
        self.k = torch.zeros(0, head_dim, page, dtype=dtype, device=device)
        self.v = torch.zeros(0, page, head_dim, dtype=dtype, device=device)
        # Additive score bias [capacity, page]: 0 where a pair is stored, -inf in a page's free slots.
        self.free_bias = torch.zeros(0, page, dtype=dtype, device=device)
        self.owner = torch.zeros(0, dtype=torch.long, device=device)  # [capacity] head of each page
        self.pos = torch.zeros(0, page, dtype=torch.long, device=device)  # [capacity, page] token index of each pair
        self.score: torch.Tensor | None = None  # [capacity, page] each pair's score, once `append` got scores
        self.pages = 0  # pages in use: pool[:pages]
        self.lengths = torch.zeros(heads, dtype=torch.long)  # host: pairs kept per head
        self._empty: torch.Tensor | None = None  # [heads] device copy of lengths == 0, None after a change
        self.owned = torch.zeros(heads, dtype=torch.long)  # host: pages in each head's row of the table
        self.table = torch.zeros(heads, 0, dtype=torch.long)  # host: [heads, width] each head's pages, in order

    def _pages_of(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + self.page - 1) // self.page

    def _reserve(self, pages: int) -> None:
        """Room for `pages` pages; when full, one copy of the pool into room for ~3% more than asked.
        The slack goes on top of what is asked, not of the old capacity: after a prefill chunk larger
        than 3% of the pool the pool is otherwise exactly full, and the first decode exit copies it again
        (one copy per layer in one step: results/bench/decode_steps/decode_steps_16k_before.md)."""
        capacity = self.k.shape[0]
        if pages <= capacity:
            return
        capacity = max(pages, capacity)
        capacity += max(_MIN_GROWTH, capacity // _GROWTH_FRACTION)
        grown = []
        for old, fill in ((self.k, 0.0), (self.v, 0.0), (self.free_bias, float("-inf")), (self.owner, 0), (self.pos, -1),
                          (self.score, 0.0)):
            if old is None:
                grown.append(None)
                continue
            new = old.new_empty(capacity, *old.shape[1:])
            new[: self.pages] = old[: self.pages]
            new[self.pages :] = fill  # free slots must hold finite keys: they meet real queries in `attend`
            grown.append(new)
        self.k, self.v, self.free_bias, self.owner, self.pos, self.score = grown

    def append(self, keep: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor | None = None) -> None:
        """Store the selected pairs. keep [heads, m] bool (host); keys, values [heads, m, D] (device);
        positions [m]: their token indices; scores [heads, m]: kept per pair for `shrink` (eviction).

        Each head's selected pairs go after its stored ones, in their order along m."""
        counts = keep.sum(1)
        if int(counts.sum()) == 0:
            return
        if scores is not None and self.score is None:
            self.score = torch.zeros(self.k.shape[0], self.page, dtype=torch.float32, device=self.k.device)
        have = self.owned
        new_lengths = self.lengths + counts
        need = (self._pages_of(new_lengths) - have).clamp_min(0)  # [heads] new pages per head
        total = int(need.sum())
        if total:
            self._reserve(self.pages + total)
            owners = torch.repeat_interleave(torch.arange(self.heads), need)  # [total]
            first = torch.cumsum(need, 0) - need  # each head's first new page, as an index into the new ones
            columns = have[owners] + torch.arange(total) - first[owners]
            width = int((have + need).max())
            if width > self.table.shape[1]:
                table = self.table.new_zeros(self.heads, max(width, 2 * self.table.shape[1]))
                table[:, : self.table.shape[1]] = self.table
                self.table = table
            self.table[owners, columns] = torch.arange(self.pages, self.pages + total)
            self.owner[self.pages : self.pages + total] = owners.to(self.owner.device)
            self.pages += total
            self.owned = have + need
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: each head's pairs in order
        slot = self.lengths[rows] + keep.long().cumsum(1)[rows, cols] - 1  # index within the head's pairs
        flat = (self.table[rows, slot // self.page] * self.page + slot % self.page).to(self.k.device)
        rows, cols = rows.to(keys.device), cols.to(keys.device)
        self.k.transpose(1, 2)[flat // self.page, flat % self.page] = keys[rows, cols]
        self.v.view(-1, self.head_dim).index_copy_(0, flat, values[rows, cols])
        self.free_bias.view(-1).index_fill_(0, flat, 0.0)
        self.pos.view(-1)[flat] = positions.to(self.pos.device)[cols]
        if self.score is not None:
            self.score.view(-1)[flat] = scores.float().to(self.score.device)[rows, cols]
        self.lengths, self._empty = new_lengths, None

    def shrink(self, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evict: every head holding more than limits[head] pairs (host, long) keeps its limits[head]
        best by score (higher first; the older first among equal scores). Survivors from the tail
        move into the evicted slots, so each head's pairs stay in its first pages and the freed tail
        slots are reused by its next appends: bytes held follow the limits, not the context.

        Returns the evicted pairs as (heads [k], token positions [k]), on the device."""
        over = (self.lengths > limits).nonzero().flatten()
        if not len(over):
            none = torch.zeros(0, dtype=torch.long, device=self.k.device)
            return none, none
        lengths, new = self.lengths[over], limits[over]
        width = int(lengths.max())
        s = torch.arange(width)
        held = s.unsqueeze(0) < lengths.unsqueeze(1)  # [n, width]
        flat = self.table[over.unsqueeze(1), (s // self.page).unsqueeze(0)] * self.page + s % self.page
        flat = flat.to(self.k.device)
        held_d = held.to(self.k.device)
        pos = self.pos.view(-1)[flat]
        evicted = worst_pairs(self.score.view(-1)[flat], pos, held_d, (lengths - new).to(self.k.device))
        keep = held_d & ~evicted
        evicted_heads = over.to(self.k.device).unsqueeze(1).expand_as(evicted)[evicted]
        evicted_pos = pos[evicted]
        inside = s.unsqueeze(0).to(self.k.device) < new.to(self.k.device).unsqueeze(1)
        dst, src = flat[~keep & inside], flat[keep & ~inside]  # row-major: equal counts per head, paired in order
        self.v.view(-1, self.head_dim)[dst] = self.v.view(-1, self.head_dim)[src]
        k = self.k.transpose(1, 2)
        k[dst // self.page, dst % self.page] = k[src // self.page, src % self.page]
        self.pos.view(-1)[dst] = self.pos.view(-1)[src]
        self.score.view(-1)[dst] = self.score.view(-1)[src]
        gone = flat[held_d & ~inside]
        self.free_bias.view(-1)[gone] = float("-inf")
        self.pos.view(-1)[gone] = -1
        self.lengths[over], self._empty = new, None
        return evicted_heads, evicted_pos

    def attend(self, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unnormalised attention of each head's queries over its stored pairs, for every head at once.

        query [heads, Q, D] -> (m [heads, Q]: the max score, -inf for an empty head;
        denom [heads, Q]: sum of exp(score - m); o [heads, Q, D]: sum of exp(score - m) * value), float32,
        so the caller can merge them with the window's part (a softmax split in two)."""
        heads, nq, d = query.shape
        m = torch.full((heads, nq), float("-inf"), device=query.device)
        denom, o = torch.zeros(heads, nq, device=query.device), torch.zeros(heads, nq, d, device=query.device)
        if self.pages == 0:
            return m, denom, o
        owner = self.owner[: self.pages]
        scores = torch.baddbmm(self.free_bias[: self.pages].unsqueeze(1), query[owner], self.k[: self.pages],
                               alpha=scaling).float()  # [pages, Q, page]
        m.scatter_reduce_(0, owner.unsqueeze(1).expand(-1, nq), scores.amax(-1), "amax")
        if self.score is not None:  # eviction can leave a head pages with no pair: exp(-inf - 0) = 0, not NaN
            m = m.masked_fill(torch.isneginf(m), 0.0)
        e = scores.sub_(m[owner].unsqueeze(-1)).exp_()
        denom.index_add_(0, owner, e.sum(-1))
        o.index_add_(0, owner, torch.bmm(e.to(self.v.dtype), self.v[: self.pages]).float())
        return m, denom, o

    def reorder(self, rows: torch.Tensor) -> None:
        """Head j takes old head rows[j]'s pairs (beam search). Pages are copied, not shared: two beams
        from one parent then append to pages of their own. Costs one gather of the kept pairs, as
        transformers' own layers copy their whole cache on a reorder."""
        rows = rows.cpu()
        lengths = self.lengths[rows]
        counts = self._pages_of(lengths)
        width = int(counts.max()) if len(counts) else 0
        taken = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)  # [heads, width]
        old_pages = self.table[rows, :width][taken]  # row-major: each new head's pages in order
        total = int(counts.sum())
        src = old_pages.to(self.k.device)
        self.k, self.v = self.k[src].clone(), self.v[src].clone()
        self.free_bias, self.pos = self.free_bias[src].clone(), self.pos[src].clone()
        self.score = None if self.score is None else self.score[src].clone()
        self.owner = torch.repeat_interleave(torch.arange(self.heads), counts).to(self.k.device)
        self.pages = total
        table = torch.zeros(self.heads, max(1, width), dtype=torch.long)
        table[taken] = torch.arange(total)
        self.table, self.lengths, self.owned, self._empty = table, lengths.clone(), counts.clone(), None

    def empty_heads(self) -> torch.Tensor:
        """[heads] bool on the device: heads holding no pair. Copied from the host lengths once per
        change of the store, not once per decode step."""
        if self._empty is None:
            self._empty = (self.lengths == 0).to(self.k.device)
        return self._empty

    def get(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One head's stored pairs, in order: (keys, values) [L, D] (a copy: its pages are scattered)."""
        length = int(self.lengths[head])
        pages = self.table[head, : int(self._pages_of(self.lengths[head]))].to(self.k.device)
        return (self.k[pages].transpose(1, 2).reshape(-1, self.head_dim)[:length],
                self.v[pages].view(-1, self.head_dim)[:length])

    def positions(self, head: int) -> torch.Tensor:
        """[L] token indices of one head's stored pairs, in order."""
        length = int(self.lengths[head])
        pages = self.table[head, : int(self._pages_of(self.lengths[head]))].to(self.pos.device)
        return self.pos[pages].flatten()[:length]

    def capacity_pairs(self) -> int:
        return self.k.shape[0] * self.page

    def stored_pairs(self) -> int:
        return int(self.lengths.sum())

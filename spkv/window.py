"""The local window of one gated layer: the newest pairs of every (sequence, KV head), as a ring.

Pairs enter and leave the window in position order, at the same time for every sequence and head,
so one ring of slots serves them all: [B, Hkv, capacity, D] plus per-slot metadata. A decode step
writes its pair into the slot the oldest pair just left; nothing else is copied (appending with
torch.cat copied the whole window every step). In steady decoding capacity == window + slack, the
slack holding pairs past the window whose exit is batched (SPKVCache's exit_batch). A prefill chunk
of n tokens grows it to window - 1 + n until the chunk's eviction, and it then shrinks back.
Free slots are marked invalid (the attention bias hides them) and hold finite values.
"""

from __future__ import annotations

import torch


class Window:
    """Ring of pairs; logical index 0 is the oldest pair (physical slot `start`)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, window: int,
                 slack: int = 0) -> None:
        self.floor = window + slack  # the fewest slots it keeps; slack: pairs whose exit is batched
        self.capacity = self.start = self.size = 0
        self.k = torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)  # [B, Hkv, C, D]
        self.v = torch.zeros_like(self.k)
        self.score = torch.zeros(batch, kv_heads, 0, device=device)  # [B, Hkv, C] the policy's scores
        self.pos = torch.zeros(0, dtype=torch.long, device=device)  # [C] token index of each slot
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # [B, C] False: padding or free
        self.sink = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # [B, C] always-kept first tokens

    def _tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.score, self.pos, self.valid, self.sink]

    @staticmethod
    def _slots(t: torch.Tensor, k: torch.Tensor, span: slice) -> torch.Tensor:
        """t's slots in `span`; the slot dimension is 2 for [B, Hkv, C, D] (like `k`), else the last."""
        return t[:, :, span] if t.dim() == k.dim() else t[..., span]

    def _spans(self, offset: int, n: int) -> list[tuple[slice, slice]]:
        """Physical slot ranges of logical [offset, offset + n), each with its range in 0..n (at most two)."""
        first = (self.start + offset) % self.capacity
        head = min(n, self.capacity - first)
        spans = [(slice(first, first + head), slice(0, head))]
        if head < n:
            spans.append((slice(0, n - head), slice(head, n)))
        return spans

    def _resize(self, capacity: int) -> None:
        """Copy the live pairs, in order, into fresh buffers of `capacity` slots."""
        fresh = []
        for t in self._tensors():
            shape = list(t.shape)
            shape[2 if t.dim() == self.k.dim() else -1] = capacity
            new = t.new_zeros(shape)
            if self.size:
                for src, dst in self._spans(0, self.size):
                    self._slots(new, self.k, dst).copy_(self._slots(t, self.k, src))
            fresh.append(new)
        self.k, self.v, self.score, self.pos, self.valid, self.sink = fresh
        self.capacity, self.start = capacity, 0

    def append(self, keys: torch.Tensor, values: torch.Tensor, score: torch.Tensor, valid: torch.Tensor,
               sink: torch.Tensor, first_pos: int) -> None:
        """keys, values [B, Hkv, n, D]; score [B, Hkv, n]; valid, sink [B, n]; positions first_pos.."""
        n = keys.shape[2]
        if self.size + n > self.capacity:
            self._resize(max(self.floor, self.size + n))
        pos = torch.arange(first_pos, first_pos + n, device=self.pos.device)
        for dst, src in self._spans(self.size, n):
            for t, new in zip(self._tensors(), (keys, values, score, pos, valid, sink)):
                self._slots(t, self.k, dst).copy_(self._slots(new, keys, src))
        self.size += n

    def live_slots(self) -> torch.Tensor:
        """[size] physical slots of the live pairs, oldest first."""
        return (self.start + torch.arange(self.size, device=self.pos.device)) % max(1, self.capacity)

    def oldest(self, m: int) -> list[torch.Tensor]:
        """The m oldest pairs, in order: [keys, values [B, Hkv, m, D], score [B, Hkv, m], pos [m], valid, sink [B, m]]."""
        spans = self._spans(0, m)
        if len(spans) == 1:  # no wrap: views
            return [self._slots(t, self.k, spans[0][0]) for t in self._tensors()]
        return [torch.cat([self._slots(t, self.k, src) for src, _ in spans], dim=2 if t.dim() == self.k.dim() else -1)
                for t in self._tensors()]

    def drop(self, m: int) -> None:
        """Free the m oldest slots; shrink back to window + slack slots after a prefill chunk."""
        for src, _ in self._spans(0, m):
            self.valid[:, src] = False
        self.start, self.size = (self.start + m) % self.capacity, self.size - m
        if self.capacity > max(self.floor, self.size):
            self._resize(max(self.floor, self.size))

    def drop_newest(self, k: int) -> torch.Tensor:
        """Forget the k newest pairs (a rejected draft); returns their valid flags [B, k]."""
        if k > self.size:
            raise ValueError(f"Cannot remove {k} pairs from a window holding {self.size}.")
        gone = [self.valid[:, src].clone() for src, _ in self._spans(self.size - k, k)]
        for src, _ in self._spans(self.size - k, k):
            self.valid[:, src] = False
        self.size -= k
        return torch.cat(gone, dim=1) if gone else self.valid.new_zeros(self.valid.shape[0], 0)

    def reorder(self, rows: torch.Tensor) -> None:
        """Sequence b takes old sequence rows[b]'s pairs (beam search); positions are shared."""
        rows = rows.to(self.k.device)
        self.k, self.v, self.score = self.k.index_select(0, rows), self.v.index_select(0, rows), self.score.index_select(0, rows)
        self.valid, self.sink = self.valid.index_select(0, rows), self.sink.index_select(0, rows)

    def nbytes(self) -> int:
        """Bytes of the key and value buffers (capacity, free slots included)."""
        return self.k.nbytes + self.v.nbytes

"""What a compressed cache holds: density as protocols.md defines it, and bytes held against a full cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spkv.cache import SPKVCache


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
    layers = [layer for layer in cache.spkv_layers() if layer.is_initialized]
    if not layers:
        raise ValueError("This SP-KV cache is empty: run a forward pass with it first.")
    held = used = full = 0
    for layer in layers:
        layer.take_exits()  # batched exits still waiting are decided now (the same decisions, made early)
        h, u = layer.nbytes()
        held, used = held + h, used + u
        full += layer.seen * layer.batch_size * layer.num_kv_heads * layer.bytes_per_pair
    return CacheStats(
        kept=torch.stack([x.kept for x in layers]), decided=torch.stack([x.decided for x in layers]),
        layers=[x.layer_idx for x in layers], bytes_held=held, bytes_used=used, bytes_full=full,
    )

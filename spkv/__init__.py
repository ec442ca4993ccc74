"""spkv: Self-Pruned KV attention for Hugging Face causal language models."""

from .adapter import load_adapter, save_adapter
from .cache import CacheStats, SPKVCache, cache_stats
from .config import SPKVConfig
from .convert import convert, is_converted, record_gates, set_threshold, update_config
from .models import load_model

__all__ = [
    "CacheStats", "SPKVCache", "SPKVConfig", "cache_stats", "convert", "is_converted", "load_adapter",
    "load_model", "record_gates", "save_adapter", "set_threshold", "update_config",
]

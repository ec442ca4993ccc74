"""spkv: Self-Pruned KV attention for Hugging Face causal language models."""

from spkv.adapter import load_adapter, save_adapter
from spkv.budget import BudgetResult, calibrate
from spkv.cache import SPKVCache
from spkv.config import SPKVConfig
from spkv.convert import (
    convert,
    is_converted,
    record_gates,
    set_threshold,
    update_config,
)
from spkv.models import load_model
from spkv.stats import CacheStats, cache_stats

__all__ = [
    "BudgetResult", "CacheStats", "SPKVCache", "calibrate", "SPKVConfig", "cache_stats", "convert", "is_converted", "load_adapter",
    "load_model", "record_gates", "save_adapter", "set_threshold", "update_config",
]

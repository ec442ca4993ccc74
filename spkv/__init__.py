"""spkv: Self-Pruned KV attention for Hugging Face causal language models."""

from spkv.adapter import load_adapter, save_adapter
from spkv.budget import BudgetResult, calibrate
from spkv.cache import SPKVCache
from spkv.checkpoint import save_pretrained
from spkv.config import LKVConfig, SPKVConfig
from spkv.convert import convert, is_converted, record_gates, set_threshold, update_config
from spkv.models import load_model
from spkv.stats import CacheStats, cache_stats

from_pretrained = load_model  # the name transformers users look for

__all__ = [
    "BudgetResult", "CacheStats", "LKVConfig", "SPKVCache", "SPKVConfig", "cache_stats", "calibrate", "convert", "from_pretrained",
    "is_converted", "load_adapter", "load_model", "record_gates", "save_adapter", "save_pretrained", "set_threshold",
    "update_config",
]

"""Scoring policies: which pairs leaving the window the cache keeps. One small module per method,
each registered in POLICIES by its `name` with @register_policy."""

from spkv.policies.base import POLICIES, ScoringPolicy, register_policy
from spkv.policies.expected_attention import ExpectedAttention
from spkv.policies.h2o import H2O
from spkv.policies.keep_all import KeepAll
from spkv.policies.key_norm import KeyNorm
from spkv.policies.kvzap import KVzap
from spkv.policies.lkv import LKVPolicy
from spkv.policies.random import RandomPolicy
from spkv.policies.spkv import SPKVPolicy
from spkv.policies.streaming import StreamingLLM
from spkv.policies.tova import TOVA

__all__ = ["ExpectedAttention", "H2O", "KVzap", "KeepAll", "KeyNorm", "LKVPolicy", "POLICIES", "RandomPolicy", "SPKVPolicy", "ScoringPolicy",
           "StreamingLLM", "TOVA", "register_policy"]

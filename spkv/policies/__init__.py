"""Scoring policies: which pairs leaving the window the cache keeps. One small module per method;
a new module in this package registers itself by its `name`."""

import importlib
import pkgutil

from .base import POLICIES, ScoringPolicy

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .expected_attention import ExpectedAttention  # noqa: E402
from .h2o import H2O  # noqa: E402
from .keep_all import KeepAll  # noqa: E402
from .key_norm import KeyNorm  # noqa: E402
from .kvzap import KVzap  # noqa: E402
from .random import RandomPolicy  # noqa: E402
from .spkv import SPKVPolicy  # noqa: E402
from .streaming import StreamingLLM  # noqa: E402
from .tova import TOVA  # noqa: E402

__all__ = ["ExpectedAttention", "H2O", "KVzap", "KeepAll", "KeyNorm", "POLICIES", "RandomPolicy", "SPKVPolicy", "ScoringPolicy", "StreamingLLM", "TOVA"]

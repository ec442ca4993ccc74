"""Every assumption spkv makes about transformers internals, in one place.

Each name here is checked by tests/test_compat.py against the installed transformers, so a
release that changes one of them fails a test that names it instead of breaking decoding quietly.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version
from transformers.cache_utils import Cache

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the old
# argument name is accepted, with a warning, until 5.40). spkv reads whichever name a call used.
CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


def cache_argument(kwargs: dict[str, Any]) -> tuple[str, Any]:
    """(name, cache) of a forward call's cache argument; a missing one is named as this version wants."""
    names = [n for n in ("cache", "past_key_values") if n in kwargs]
    name = next((n for n in names if kwargs[n] is not None), names[0] if names else CACHE_ARG)
    return name, kwargs.get(name)


def output_cache(output: Any) -> Cache | None:
    """The cache a forward or generate() returned (`.cache` from transformers 5.24, `.past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return None


def cache_kwarg(cache: Cache | None) -> dict[str, Cache]:
    """`model(ids, **cache_kwarg(cache))`: the cache under the name this transformers wants (`cache=`
    from 5.24, `past_key_values=` before); {} for None."""
    return {} if cache is None else {CACHE_ARG: cache}

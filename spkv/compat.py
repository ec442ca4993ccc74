"""Every assumption spkv makes about transformers internals, in one place.

spkv plugs into transformers through its public extension points (attention and mask interfaces,
cache layers, forward pre-hooks) and patches no model class. Those points still carry assumptions
about names and call conventions; each is written here once and checked by tests/test_compat.py
against the installed transformers, so a release that moves one fails a test that names it.

1. The cache argument and output field: `past_key_values` until 5.23, `cache` from 5.24 (the old
   argument is accepted with a warning until 5.40).
2. generate() hands the model a fresh, empty DynamicCache that the user did not make
   (`_is_user_defined` false); spkv's pre-hook swaps it for an SPKVCache (SPKVConfig.auto_cache).
3. A Cache is built from per-layer CacheLayerMixin objects; transformers calls the methods in
   CACHE_LAYER_METHODS on them, and builds its own layers from get_layer_types_and_kwargs.
4. Attention functions and their masks register by name (AttentionInterface,
   AttentionMaskInterface); sdpa's function is the fallback for ungated layers.
5. A causal LM keeps its decoder layers at `model.model.layers`; a softmax-attention layer's module
   is `self_attn` (linear-attention layers of hybrid families have none) with `layer_idx`, called
   with `hidden_states`; per-layer attention kinds are `config.layer_types`; the KV head count is
   the text config's `num_key_value_heads`.
6. The "eager" attention implementation is the one that computes the probabilities, and an
   attention module returns them as the second item of its output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicCache,
    get_layer_types_and_kwargs,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = [
    "CACHE_ARG", "CACHE_LAYER_METHODS", "Cache", "CacheLayerMixin", "cache_argument", "cache_kwarg", "decoder_layers",
    "attention_module", "attention_probabilities", "default_layers",
    "is_generate_default_cache", "output_cache", "register_attention", "sdpa_attention_forward",
]

# 1. the cache argument's name
CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(kwargs: dict[str, Any]) -> tuple[str, Any]:
    """(name, cache) of a forward call's cache argument; a missing one is named as this version wants."""
    names = [n for n in CACHE_NAMES if n in kwargs]
    name = next((n for n in names if kwargs[n] is not None), names[0] if names else CACHE_ARG)
    return name, kwargs.get(name)


def output_cache(output: Any) -> Cache | None:
    """The cache a forward or generate() returned (`.cache` from transformers 5.24, `.past_key_values` before)."""
    for name in CACHE_NAMES:
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return None


def cache_kwarg(cache: Cache | None) -> dict[str, Cache]:
    """`model(ids, **cache_kwarg(cache))`: the cache under the name this transformers wants (`cache=`
    from 5.24, `past_key_values=` before); {} for None."""
    return {} if cache is None else {CACHE_ARG: cache}


# 2. generate()'s own cache
def is_generate_default_cache(cache: Any) -> bool:
    """True for the empty DynamicCache generate() makes when the user passed none (generate marks
    a cache the user passed with `_is_user_defined`)."""
    return type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and cache.get_seq_length() == 0


# 3. cache layers
CACHE_LAYER_METHODS = ("lazy_initialization", "update", "get_mask_sizes", "get_seq_length", "get_max_length", "reset",
                       "reorder_cache")


def default_layers(text_config: Any) -> list[Callable[[], CacheLayerMixin]]:
    """One constructor per decoder layer for the cache layer transformers itself would use there
    (a dynamic or a sliding-window layer)."""
    types, kwargs = get_layer_types_and_kwargs(text_config)
    return [lambda t=t, kw=kw: DYNAMIC_LAYER_TYPE_MAPPING[t](**kw) for t, kw in zip(types, kwargs)]


# 4. attention functions
def register_attention(name: str, fn: Callable[..., tuple[torch.Tensor, Any]]) -> None:
    """Make `name` a valid attn_implementation with sdpa's mask format (idempotent)."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


# 5. where the decoder layers are
def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """A causal LM's decoder layers (`model.model.layers`), or None if it keeps them elsewhere."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def attention_module(layer: torch.nn.Module) -> torch.nn.Module | None:
    """A decoder layer's softmax-attention module, or None (a linear-attention or recurrent layer)."""
    return getattr(layer, "self_attn", None)


# 6. attention probabilities
@contextmanager
def attention_probabilities(model: torch.nn.Module, modules: list[torch.nn.Module],
                            on_probs: Callable[[torch.nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Inside the block the model runs eager attention, and each of `modules` (attention modules)
    hands its probabilities [B, H, Tq, Tk] to on_probs(module, probs) as it runs."""
    handles = [m.register_forward_hook(lambda module, args, output: on_probs(module, output[1])) for m in modules]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        for handle in handles:
            handle.remove()

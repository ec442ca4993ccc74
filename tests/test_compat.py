"""Each transformers assumption in spkv/compat.py, checked against the installed transformers: if a
release moves one of them, the test that names it fails here instead of decoding going wrong."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

import spkv
from spkv import compat

from .tiny_models import FAMILIES, tiny_model


def test_cache_argument_name_is_the_forward_parameter():
    """1. The name spkv passes the cache under is a parameter of the causal LMs' forward."""
    expected = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"
    assert compat.CACHE_ARG == expected
    for family in FAMILIES:
        model = tiny_model(family)
        assert compat.CACHE_ARG in inspect.signature(type(model).forward).parameters, family
        out = model(torch.tensor([[3, 4, 5]]), use_cache=True)
        assert isinstance(compat.output_cache(out), transformers.cache_utils.Cache), family
        assert getattr(out, compat.CACHE_ARG) is compat.output_cache(out)  # the output field has the same name


def test_cache_argument_reads_either_name():
    cache = object()
    assert compat.cache_argument({"past_key_values": cache}) == ("past_key_values", cache)
    assert compat.cache_argument({"cache": cache, "past_key_values": None}) == ("cache", cache)
    assert compat.cache_argument({}) == (compat.CACHE_ARG, None)
    assert compat.cache_kwarg(None) == {} and compat.cache_kwarg(cache) == {compat.CACHE_ARG: cache}


def test_generate_hands_the_model_its_own_empty_dynamic_cache():
    """2. What spkv's pre-hook swaps: generate() calls forward with a fresh DynamicCache it made."""
    model = tiny_model("llama")
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(compat.is_generate_default_cache(compat.cache_argument(kw)[1])),
                                    with_kwargs=True)  # judged when the hook runs: the cache then fills in place
    model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert seen == [True, False]  # first call: empty, made by generate; then it holds the prompt
    seen.clear()
    model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, do_sample=False, pad_token_id=0,
                   **compat.cache_kwarg(DynamicCache(config=model.config)))
    assert seen == [False, False]  # generate marks a cache the user passed (_is_user_defined): left alone


def test_auto_cache_switch():
    """The implicit swap is on by default and off with SPKVConfig(auto_cache=False)."""
    prompt = torch.tensor([[3, 4, 5, 6]])
    model = spkv.convert(tiny_model("llama"), spkv.SPKVConfig(window=2))
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(compat.output_cache(out), spkv.SPKVCache)
    spkv.update_config(model, auto_cache=False)
    explicit = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                              **compat.cache_kwarg(spkv.SPKVCache(model)))
    assert torch.equal(explicit.sequences, out.sequences)  # an explicit SPKVCache is the robust path
    with pytest.raises(RuntimeError, match="auto_cache"):  # a plain cache cannot decode a converted model
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="auto_cache"):
        spkv.SPKVConfig(auto_cache="yes")


def test_cache_layer_interface():
    """3. The methods transformers calls on cache layers exist on CacheLayerMixin and on spkv's layer,
    and default_layers builds transformers' own layers (sliding ones where the config says so)."""
    from spkv.cache_layer import SPKVLayer

    for name in compat.CACHE_LAYER_METHODS:
        assert callable(getattr(compat.CacheLayerMixin, name, None)), name
        ours, theirs = inspect.signature(getattr(SPKVLayer, name)), inspect.signature(getattr(compat.CacheLayerMixin, name))
        assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters) or "args" in str(ours), name
    config = tiny_model("gemma3").config
    layers = [make() for make in compat.default_layers(config)]
    assert len(layers) == config.num_hidden_layers
    assert all(isinstance(layer, compat.CacheLayerMixin) for layer in layers)
    assert [bool(getattr(layer, "is_sliding", False)) for layer in layers] == [t == "sliding_attention" for t in config.layer_types]


def test_attention_registration():
    """4. A registered name becomes a valid attn_implementation with sdpa's mask."""
    spkv.convert(tiny_model("llama"))
    assert "spkv" in AttentionInterface._global_mapping and "spkv" in AttentionMaskInterface._global_mapping
    assert callable(compat.sdpa_attention_forward)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_and_their_attention(family):
    """5. Decoder layers sit at model.model.layers, each self_attn with k_proj, head_dim and layer_idx."""
    model = tiny_model(family)
    layers = compat.decoder_layers(model)
    assert layers is not None and len(layers) == model.config.num_hidden_layers
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        assert attn.layer_idx == i and attn.head_dim > 0 and isinstance(attn.k_proj, torch.nn.Linear)
    assert compat.decoder_layers(model.model) is None  # the backbone alone has no .model


def test_attention_probabilities_are_eager_and_causal():
    """6. Eager attention hands each module its probabilities [B, H, T, T] (causal rows summing to 1),
    and the model's own implementation comes back after the block."""
    model = tiny_model("llama")
    before = model.config._attn_implementation
    seen: dict[int, torch.Tensor] = {}
    modules = [layer.self_attn for layer in compat.decoder_layers(model)]
    ids = torch.randint(3, 50, (1, 12))
    with torch.no_grad(), compat.attention_probabilities(model, modules, lambda m, p: seen.__setitem__(m.layer_idx, p)):
        model(input_ids=ids, use_cache=False)
    assert sorted(seen) == list(range(model.config.num_hidden_layers)) and model.config._attn_implementation == before
    for p in seen.values():
        assert p.shape == (1, model.config.num_attention_heads, 12, 12)
        assert torch.allclose(p.sum(-1), torch.ones(())) and torch.all(p.triu(1) == 0)

"""The families added after the first five, on tiny random configs: tau = 0 equals the unconverted
model, and chunked prefill + decode (with left padding) equal the full-sequence forward under real
gating. Only full-attention layers are gated; sliding and linear-attention layers stay as they are."""

from __future__ import annotations

import pytest
import torch

import spkv
from spkv.compat import cache_kwarg
from spkv.convert import SUPPORTED_MODEL_TYPES, full_attention_layers

from .tiny_models import FAMILIES, MORE_FAMILIES, assert_close_on_real_tokens, batch, logits, randomize_gates, tiny_model


def test_every_supported_family_is_tested():
    tested = {"gemma3_text" if f == "gemma3" else f for f in FAMILIES} | set(MORE_FAMILIES)
    assert tested == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_tau_zero_is_the_base_model_and_decode_is_the_full_forward(family):
    ids, mask = batch(length=36, left_pad=3)
    base = tiny_model(family)
    model = spkv.convert(tiny_model(family), spkv.SPKVConfig(window=4, threshold=0.0))
    assert model.spkv_config.layers == full_attention_layers(model.config)
    assert_close_on_real_tokens(logits(model, ids, mask), logits(base, ids, mask), mask)
    randomize_gates(model)
    spkv.set_threshold(model, 0.5)
    full = logits(model, ids, mask)
    assert (full - logits(base, ids, mask)).abs().max() > 1e-3  # the gates matter here
    cache = spkv.SPKVCache(model)
    with torch.no_grad():
        parts = [model(input_ids=ids[:, :20], attention_mask=mask[:, :20], **cache_kwarg(cache)).logits]
        for t in range(20, ids.shape[1]):
            parts.append(model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwarg(cache)).logits)
    assert_close_on_real_tokens(torch.cat(parts, 1), full, mask, tol=1e-4)


def test_unsupported_family_lists_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="Supported: llama"):
        spkv.convert(model)

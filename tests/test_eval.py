"""Evaluation: the fast full-sequence measurement equals what real decoding with the cache gives."""

from __future__ import annotations

import math

import pytest
import torch

import spkv
from spkv.data.heldout import HeldoutSet
from spkv.eval.nll import nll_full_sequence, nll_with_policy
from spkv.policies import KeepAll, SPKVPolicy

from .tiny_models import randomize_gates, tiny_model


def tiny_heldout(n=3, length=40, seed=0) -> HeldoutSet:
    g = torch.Generator().manual_seed(seed)
    return HeldoutSet(torch.randint(3, 97, (n, length), generator=g), [f"doc{i}" for i in range(n)], ["synthetic"] * n)


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 16])  # chunk 1: token by token, ~20 s
def test_full_sequence_nll_and_density_equal_real_decoding(chunk):
    model = tiny_model("llama")
    spkv.convert(model, spkv.SPKVConfig(window=6, threshold=0.5))
    randomize_gates(model, seed=5)
    data = tiny_heldout()
    fast = nll_full_sequence(model, data)
    real = nll_with_policy(model, data, SPKVPolicy(), sinks=0, chunk=chunk)
    assert fast.nll == pytest.approx(real.nll, abs=1e-5)
    assert fast.density == pytest.approx(real.density, abs=1e-9)
    assert fast.density_per_sequence == pytest.approx(real.density_per_sequence, abs=1e-6)  # float32 vs float64 ratios
    assert 0.2 < fast.density < 0.8
    density_only = nll_with_policy(model, data, SPKVPolicy(), sinks=0, chunk=chunk, score=False)
    assert density_only.density_per_layer_head == real.density_per_layer_head and math.isnan(density_only.nll)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_nll_with_the_lm_head_in_chunks_equals_the_full_logits(family, monkeypatch):
    """Brute force: cross-entropy of the model's own full logits (Gemma 3 with its soft-capping on),
    against the chunked LM head, for the plain and the converted model."""
    import torch.nn.functional as F

    from spkv.eval import nll as nll_module

    monkeypatch.setattr(nll_module, "HEAD_CHUNK", 7)  # several chunks, the last one partial
    model = tiny_model(family, **({"final_logit_softcapping": 5.0} if family == "gemma3" else {}))
    data = tiny_heldout()
    with torch.no_grad():
        want = [float(F.cross_entropy(model(input_ids=row[None], use_cache=False).logits[0, :-1].float(), row[1:]))
                for row in data.input_ids]
    assert nll_full_sequence(model, data).nll_per_sequence == pytest.approx(want, abs=1e-5)
    spkv.convert(model, spkv.SPKVConfig(window=6, threshold=0.5))
    randomize_gates(model, seed=5)
    with torch.no_grad():
        want = [float(F.cross_entropy(model(input_ids=row[None], use_cache=False).logits[0, :-1].float(), row[1:]))
                for row in data.input_ids]
    assert nll_full_sequence(model, data).nll_per_sequence == pytest.approx(want, abs=1e-5)


def test_keep_all_equals_the_unconverted_model():
    base = tiny_model("qwen2")
    data = tiny_heldout()
    dense = nll_full_sequence(base, data)
    assert dense.density is None
    spkv.convert(base, spkv.SPKVConfig(window=6))
    kept = nll_with_policy(base, data, KeepAll(), sinks=4, chunk=8)
    assert kept.nll == pytest.approx(dense.nll, abs=1e-5)
    assert kept.density == 1.0

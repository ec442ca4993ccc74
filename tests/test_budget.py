"""Deploy-time budgets: spkv.calibrate picks tau for a density or a KV size, and the real cache then
keeps exactly what the calibration predicted on that text."""

from __future__ import annotations

import pytest
import torch

import spkv
from spkv.budget import model_kv_bytes
from spkv.compat import cache_kwarg
from spkv.stats import cache_stats

from .tiny_models import VOCAB, randomize_gates, tiny_model


@pytest.fixture()
def model():
    m = spkv.convert(tiny_model("llama"), spkv.SPKVConfig(window=8))
    randomize_gates(m)
    return m


def _ids(seed: int = 0, n: int = 200) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _cache_run(model, ids):
    cache = spkv.SPKVCache(model)
    with torch.no_grad():
        for s in range(0, len(ids), 64):
            model(input_ids=ids[s : s + 64].unsqueeze(0), **cache_kwarg(cache))
    return cache_stats(cache)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_density_budget_matches_the_real_cache(model, target):
    ids = _ids()
    result = spkv.calibrate(model, input_ids=[ids], density=target)
    assert model.spkv_config.threshold == result.threshold
    assert abs(result.density - target) < 0.05  # tau moves the density in steps of one pair per head
    stats = _cache_run(model, ids)
    # at the end of the sequence the cache has decided exactly the pairs the calibration counted
    assert stats.density == pytest.approx(result.density, abs=1e-9)
    assert stats.density_token_weighted == pytest.approx(result.density_token_weighted, abs=1e-9)


def test_kv_bytes_budget(model):
    ids = _ids(1)
    full = model_kv_bytes(model, 200, 1, 1.0)[1]  # a full cache of the same tokens
    floor = model_kv_bytes(model, 200, 1, 0.0)[0]  # the window, its spare slots and the ungated layers
    limit = (full + floor) // 2
    result = spkv.calibrate(model, input_ids=[ids], kv_bytes_limit=limit)
    assert result.kv_bytes <= limit and result.kv_bytes_full == full
    looser = spkv.calibrate(model, input_ids=[ids], kv_bytes_limit=full, apply=False)
    assert looser.threshold <= result.threshold and looser.density >= result.density
    # bytes follow the kept pairs, and the real cache keeps exactly the share the calibration measured
    stats = _cache_run(model, ids)
    assert int(stats.kept.sum()) == round(result.density_token_weighted * int(stats.decided.sum()))


def test_budget_errors(model):
    with pytest.raises(ValueError, match="exactly one budget"):
        spkv.calibrate(model, input_ids=[_ids()])
    with pytest.raises(ValueError, match="density must be"):
        spkv.calibrate(model, input_ids=[_ids()], density=0.0)
    with pytest.raises(ValueError, match="below the smallest cache"):
        spkv.calibrate(model, input_ids=[_ids()], kv_bytes_limit=10)
    with pytest.raises(ValueError, match="too short"):
        spkv.calibrate(model, input_ids=[_ids(n=5)], density=0.5)
    with pytest.raises(ValueError, match="SP-KV model"):
        spkv.calibrate(tiny_model("llama"), input_ids=[_ids()], density=0.5)

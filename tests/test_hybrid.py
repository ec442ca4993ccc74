"""Hybrid layouts: designs keep their budget, a hybrid runs exactly through the compact cache, and a
per-layer hybrid exports to a plain transformers model with the same logits (no spkv needed)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import spkv
from spkv import hybrid
from spkv.compat import cache_kwarg

from .tiny_models import VOCAB, tiny_model

DENSITY = [[0.9, 0.1], [0.2, 0.3], [0.05, 0.8], [0.4, 0.6]]  # 4 layers x 2 KV heads


def _ids(length: int = 48) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))


def test_designs_keep_their_budget_and_pick_the_densest():
    layers = [0, 1, 2, 3]
    head = hybrid.design(DENSITY, layers, 0.25, "learned-head")
    assert head.units == [[True, False], [False, False], [False, True], [False, False]]
    layer = hybrid.design(DENSITY, layers, 0.5, "learned-layer")
    assert layer.units == [[True, True], [False, False], [False, False], [True, True]] and layer.per_layer
    inter = hybrid.design(DENSITY, layers, 0.25, "interleave")
    assert [row[0] for row in inter.units] == [False, False, False, True]  # 3:1 local:global
    rand = [hybrid.design(DENSITY, layers, 0.5, "random-head", seed=s) for s in range(3)]
    assert all(r.global_share == 0.5 for r in rand) and len({str(r.units) for r in rand}) > 1
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            hybrid.design(DENSITY, layers, bad)


def test_layout_round_trips_through_json(tmp_path):
    layout = hybrid.design(DENSITY, [0, 1, 2, 3], 0.5, "learned-layer", model="tiny", window=4)
    path = tmp_path / "layout.json"
    path.write_text(layout.to_json())
    assert hybrid.HybridLayout.load(path) == layout


def test_hybrid_runs_exactly_through_the_cache():
    model = tiny_model("llama", num_hidden_layers=4)
    layout = hybrid.design(DENSITY, [0, 1, 2, 3], 0.25, "learned-head", window=4)
    hybrid.apply_layout(model, layout)
    ids = _ids()
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = spkv.SPKVCache(model)
        parts = [model(input_ids=ids[:, :20], **cache_kwarg(cache)).logits]
        parts += [model(input_ids=ids[:, t : t + 1], **cache_kwarg(cache)).logits for t in range(20, ids.shape[1])]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    density = spkv.cache_stats(cache).density_per_head  # global units keep all, local ones nothing
    assert torch.equal(density == 1.0, torch.tensor(layout.units))
    assert torch.all((density == 0.0) | (density == 1.0))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_per_layer_hybrid_exports_to_a_plain_transformers_model(tmp_path, family):
    model = tiny_model(family, num_hidden_layers=4)
    layout = hybrid.design(DENSITY, [0, 1, 2, 3], 0.5, "learned-layer", window=6)
    hybrid.apply_layout(model, layout)
    path = hybrid.export(model, layout, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    assert not hasattr(plain, "spkv_config")
    assert plain.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    ids = _ids(40)
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=False).logits
        theirs = plain(input_ids=ids).logits
        assert (ours - theirs).abs().max() < 1e-4
        # and transformers' own caches decode it: generate matches spkv's hybrid token for token
        kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(plain.generate(ids, **kw), model.generate(ids, **kw, **cache_kwarg(spkv.SPKVCache(model))))


def test_export_errors(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    per_head = hybrid.design(DENSITY, [0, 1, 2, 3], 0.25, "learned-head", window=4)
    hybrid.apply_layout(model, per_head)
    with pytest.raises(ValueError, match="per-layer"):
        hybrid.export(model, per_head, tmp_path / "x")
    gemma = tiny_model("gemma3")
    with pytest.raises(ValueError, match="exportable families"):
        hybrid.export_config(gemma.config, per_head)
    other = hybrid.design([[0.5, 0.5]] * 2, [0, 1], 0.5, "learned-layer", window=4)
    with pytest.raises(ValueError, match="design the layout for this model"):
        hybrid.apply_layout(model, other)

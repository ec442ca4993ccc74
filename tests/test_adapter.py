"""Adapters: round trip, LLM weight changes (full and low-rank), refusing the wrong base."""

from __future__ import annotations

import json

import pytest
import torch

import spkv
from spkv.adapter import CONFIG_FILE

from .tiny_models import batch, logits, randomize_gates, tiny_model


def trained_model(seed=0):
    """A converted model whose predictors and LLM weights both moved away from the base."""
    model = tiny_model("llama", seed=seed)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    spkv.convert(model, spkv.SPKVConfig(window=4, threshold=0.5))
    randomize_gates(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        q = model.model.layers[0].self_attn.q_proj.weight
        a, b = torch.randn(2, q.shape[1], generator=g), torch.randn(q.shape[0], 2, generator=g)
        q.add_(0.1 * b @ a)  # a rank-2 change, like LoRA
        model.model.norm.weight.add_(0.05)  # a 1-D change
    return model, base_state


@pytest.mark.parametrize("rank", [None, 2])
def test_round_trip_gives_identical_logits(tmp_path, rank):
    model, base_state = trained_model()
    ids, mask = batch(length=24)
    expected = logits(model, ids, mask)
    spkv.save_adapter(model, tmp_path / "ad", base_state=base_state, delta_rank=rank, metadata={"steps": 3})
    meta = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    assert meta["metadata"] == {"steps": 3}
    assert ("model.layers.0.self_attn.q_proj.weight" in meta["contents"]["lowrank" if rank else "delta"])

    fresh = tiny_model("llama")
    spkv.load_adapter(fresh, tmp_path / "ad")
    assert fresh.spkv_config == model.spkv_config
    assert torch.allclose(logits(fresh, ids, mask), expected, atol=1e-5)


def test_predictor_only_adapter_and_overwrite(tmp_path):
    model, _ = trained_model()
    spkv.save_adapter(model, tmp_path / "ad")
    spkv.set_threshold(model, 0.7)
    spkv.save_adapter(model, tmp_path / "ad")  # overwrites atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    fresh = spkv.load_adapter(tiny_model("llama"), tmp_path / "ad")
    assert fresh.spkv_config.threshold == 0.7


def test_wrong_base_is_refused(tmp_path):
    model, base_state = trained_model()
    spkv.save_adapter(model, tmp_path / "ad", base_state=base_state)
    with pytest.raises(ValueError, match="different architecture"):
        spkv.load_adapter(tiny_model("llama", num_hidden_layers=3), tmp_path / "ad")
    with pytest.raises(ValueError, match="same architecture but different weights"):
        spkv.load_adapter(tiny_model("llama", seed=5), tmp_path / "ad")
    twice = spkv.load_adapter(tiny_model("llama"), tmp_path / "ad")
    with pytest.raises(ValueError, match="already loaded"):
        spkv.load_adapter(twice, tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="No SP-KV adapter"):
        spkv.load_adapter(tiny_model("llama"), tmp_path / "nothing")

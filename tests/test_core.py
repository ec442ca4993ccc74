"""SP-KV core: conversion, gated attention in all phases, exactness, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import spkv
from spkv.attention import flash_gated_attention, gated_attention, log_gate
from spkv.convert import predictors

from .tiny_models import FAMILIES, assert_close_on_real_tokens, batch, logits, randomize_gates, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("left_pad", [0, 7])
def test_threshold_zero_hard_equals_base(family, left_pad):
    base = tiny_model(family)
    ids, mask = batch(length=48, left_pad=left_pad)
    ref = logits(base, ids, mask)
    spkv.convert(base, spkv.SPKVConfig(window=8, threshold=0.0, phase="hard"))
    randomize_gates(base)
    assert_close_on_real_tokens(logits(base, ids, mask), ref, mask)
    assert_close_on_real_tokens(logits(base, ids, mask, use_cache=True), ref, mask)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("phase", ["soft", "anneal", "hard"])
def test_window_covering_sequence_equals_base_in_every_phase(family, phase):
    base = tiny_model(family)
    ids, mask = batch(length=32, left_pad=5)
    ref = logits(base, ids, mask)
    spkv.convert(base, spkv.SPKVConfig(window=32, threshold=0.9, phase=phase, anneal_alpha=0.5))
    randomize_gates(base)
    assert_close_on_real_tokens(logits(base, ids, mask), ref, mask)


def test_gates_change_the_output_when_they_should():
    """Guards the two tests above against passing vacuously."""
    model = tiny_model("llama")
    ids, mask = batch(length=48)
    ref = logits(model, ids, mask)
    spkv.convert(model, spkv.SPKVConfig(window=8, threshold=0.5, phase="hard"))
    randomize_gates(model)
    assert (logits(model, ids, mask) - ref).abs().max() > 1e-3


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, spkv_gate_logits=None, **kw):
    """Brute force: for each query, an explicit list of the keys the SP-KV rule allows."""
    predictor = getattr(module, "spkv_predictor", None)
    if predictor is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    cfg = predictor.config
    b, h, t, d = query.shape
    groups = h // key.shape[1]
    u = torch.sigmoid(spkv_gate_logits.float())
    out = torch.zeros_like(query)
    for bi in range(b):
        for hi in range(h):
            kh = hi // groups
            for ti in range(t):
                allowed = [
                    s for s in range(ti + 1)
                    if (attention_mask is None or attention_mask[bi, 0, ti, s])
                    and (ti - s < cfg.window or u[bi, s, kh] >= cfg.threshold)
                ]
                if not allowed:  # a padding query
                    continue
                scores = key[bi, kh, allowed] @ query[bi, hi, ti] * scaling
                out[bi, hi, ti] = torch.softmax(scores, dim=0) @ value[bi, kh, allowed]
    return out.transpose(1, 2), None


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hard_phase_matches_brute_force(family):
    model = tiny_model(family)
    spkv.convert(model, spkv.SPKVConfig(window=6, threshold=0.5, phase="hard"))
    randomize_gates(model, seed=3)
    ids, mask = batch(length=30, left_pad=4)
    full_sequence = logits(model, ids, mask)
    with_cache = logits(model, ids, mask, use_cache=True)
    AttentionInterface.register("spkv_reference", reference_attention)
    AttentionMaskInterface.register("spkv_reference", sdpa_mask)
    model.set_attn_implementation("spkv_reference")
    ref = logits(model, ids, mask)
    assert_close_on_real_tokens(full_sequence, ref, mask)
    assert_close_on_real_tokens(with_cache, ref, mask)
    with spkv.record_gates(model) as gates:
        logits(model, ids, mask)
    kept = torch.cat([spkv.attention.keep_decision(g, 0.5).flatten() for g in gates.values()]).float().mean()
    assert 0.2 < kept < 0.8, "random gates should keep a real fraction, or the comparison is vacuous"


def test_soft_gate_path_gradcheck():
    torch.manual_seed(0)
    b, hkv, groups, t, d = 1, 2, 2, 7, 3
    q = torch.randn(b, hkv * groups, t, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, t, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, t, d, dtype=torch.float64, requires_grad=True)
    gate_logits = torch.randn(b, t, hkv, dtype=torch.float64, requires_grad=True)
    cfg = spkv.SPKVConfig(window=2, phase="soft")

    def f(q, k, v, gl):
        gate = log_gate(gl, cfg).transpose(1, 2)
        return gated_attention(q, k, v, gate, cfg.window, 1 / math.sqrt(d))

    assert torch.autograd.gradcheck(f, (q, k, v, gate_logits))


@pytest.mark.parametrize("t", [5, 8, 9, 21])  # within the window, one window block, just past it, ragged
@pytest.mark.parametrize("phase", ["soft", "hard"])
def test_flash_path_matches_general_path(t, phase):
    """The CPU flash path (no padding) gives gated_attention's outputs and gradients."""
    torch.manual_seed(t)
    b, hkv, groups, d = 2, 2, 3, 4
    q = torch.randn(b, hkv * groups, t, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, t, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, t, d, dtype=torch.float64, requires_grad=True)
    gate_logits = (3 * torch.randn(b, t, hkv, dtype=torch.float64)).requires_grad_()
    cfg = spkv.SPKVConfig(window=8, phase=phase)
    weights = torch.randn(b, t, hkv * groups, d, dtype=torch.float64)
    results = []
    for fn in (gated_attention, flash_gated_attention):
        for x in (q, k, v, gate_logits):
            x.grad = None
        out = fn(q, k, v, log_gate(gate_logits, cfg).transpose(1, 2), cfg.window, 0.7)
        (out * weights).sum().backward()
        results.append([out] + [torch.zeros_like(x) if x.grad is None else x.grad for x in (q, k, v, gate_logits)])
    for general, flash in zip(*results):
        torch.testing.assert_close(flash, general)
    if phase == "soft" and t > cfg.window:
        assert results[1][4].abs().sum() > 0, "gates beyond the window must get a gradient"


def test_anneal_interpolates_between_soft_and_hard():
    gl = torch.tensor([-2.0, 0.0, 0.3, 3.0])
    cfg = spkv.SPKVConfig(threshold=0.55, phase="anneal")
    assert torch.allclose(log_gate(gl, cfg.replace(anneal_alpha=0.0)), log_gate(gl, cfg.replace(phase="soft")))
    assert torch.equal(log_gate(gl, cfg.replace(anneal_alpha=1.0)), log_gate(gl, cfg.replace(phase="hard")))
    assert torch.equal(log_gate(gl, cfg.replace(phase="hard")), torch.tensor([float("-inf"), float("-inf"), 0.0, 0.0]))


def test_predictor_learns_from_lm_loss():
    model = tiny_model("qwen3").train()
    spkv.convert(model, spkv.SPKVConfig(window=4, phase="soft"))
    ids, mask = batch(length=24)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    for p in predictors(model).values():
        assert p.fc1.weight.grad is not None and p.fc1.weight.grad.abs().sum() > 0
        assert p.fc2.bias.grad.abs().sum() > 0


def test_predictors_are_real_submodules():
    model = tiny_model("gemma3")
    spkv.convert(model)
    preds = predictors(model)
    assert list(preds) == [3], "only Gemma 3's full-attention layer is gated"
    names = [n for n in model.state_dict() if "spkv_predictor" in n]
    assert names == [f"model.layers.3.self_attn.spkv_predictor.{x}" for x in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    assert sum(1 for n, _ in model.named_parameters() if "spkv_predictor" in n) == 4
    model.to(torch.float64)
    assert preds[3].fc1.weight.dtype == torch.float64
    assert torch.allclose(torch.sigmoid(preds[3].fc2.bias).float(), torch.tensor(0.9933), atol=1e-4)


def test_conversion_errors():
    model = tiny_model("llama")
    spkv.convert(model)
    with pytest.raises(ValueError, match="already converted"):
        spkv.convert(model)
    with pytest.raises(ValueError, match="not support model_type 'gpt2'.*llama"):
        spkv.convert(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
    with pytest.raises(ValueError, match="not full-attention layers"):
        spkv.convert(tiny_model("gemma3"), spkv.SPKVConfig(layers=[0]))
    with pytest.raises(ValueError, match="threshold"):
        spkv.set_threshold(model, 1.5)
    with pytest.raises(ValueError, match="not an SP-KV model"):
        spkv.set_threshold(tiny_model("llama"), 0.5)


@pytest.mark.parametrize(
    "field,value",
    [("window", 0), ("threshold", -0.1), ("threshold", 1.01), ("phase", "medium"), ("anneal_alpha", 2.0),
     ("predictor_hidden", 0), ("sinks", -1), ("layers", []), ("layers", [1, 1])],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SPKVConfig.{field} must be"):
        spkv.SPKVConfig(**{field: value})


def test_config_json_round_trip():
    cfg = spkv.SPKVConfig(window=64, threshold=0.7, phase="soft", layers=[3, 1], sinks=4)
    assert spkv.SPKVConfig.from_json(cfg.to_json()) == cfg
    assert cfg.layers == [1, 3]
    with pytest.raises(ValueError, match="Unknown SPKVConfig field"):
        spkv.SPKVConfig.from_dict({"windw": 3})


def test_set_threshold_changes_decisions_without_retraining():
    model = tiny_model("llama")
    spkv.convert(model, spkv.SPKVConfig(window=4))
    randomize_gates(model)
    ids, mask = batch(length=32)
    a = logits(model, ids, mask)
    spkv.set_threshold(model, 0.9)
    assert all(p.config.threshold == 0.9 for p in predictors(model).values())
    assert (logits(model, ids, mask) - a).abs().max() > 1e-4

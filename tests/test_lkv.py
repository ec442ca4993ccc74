"""LKV: budget allocation, the soft top-k, eviction exactness against a token-by-token reference,
memory accounting, training end to end, and the errors users meet."""

from __future__ import annotations

import math

import pytest
import torch

import spkv
from spkv.compat import cache_kwarg
from spkv.config import LKVConfig, SPKVConfig
from spkv.lkv import (
    NEVER,
    RESOLUTION,
    eviction_times,
    head_shares,
    keep_order,
    rotary_invariant_features,
    scorers,
    set_budget,
    soft_topk,
    worst_pairs,
)
from spkv.policies import KeyNorm, LKVPolicy
from spkv.train.config import TrainConfig

from .tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_visibility(scores, shares, window, every, sinks, valid):
    """The eviction rule applied token by token, with Python lists: visible[b][h][t] = set of key
    positions query t attends to."""
    b, hkv, t = scores.shape
    out = []
    for bi in range(b):
        rows = []
        real = [int(x) for x in valid[bi]]
        rank = [sum(real[: i + 1]) - 1 for i in range(t)]
        for hi in range(hkv):
            held, decided, sink_count, exits, seen = [], 0, 0, 0, []
            for q in range(t):
                visible = {s for s in range(max(0, q - window + 1), q + 1) if real[s]} | {p for _, p in held}
                seen.append(visible)
                p = q + 1 - window  # leaves the window for query q + 1
                if p < 0:
                    continue
                if not real[p]:
                    continue
                is_sink = rank[p] < sinks
                held.append((math.inf if is_sink else float(scores[bi, hi, p]), p))
                decided += 0 if is_sink else 1
                sink_count += 1 if is_sink else 0
                exits += 1
                if exits % every == 0:
                    limit = math.floor(float(shares[hi]) * decided) + sink_count
                    held = sorted(held, key=lambda x: (-round(x[0] / RESOLUTION) if x[0] < math.inf else -math.inf, x[1]))[:limit]
            rows.append(seen)
        out.append(rows)
    return out


def visibility_from_times(death, window, valid):
    b, hkv, t = death.shape
    return [[[{s for s in range(q + 1) if valid[bi, s] and (q - s < window or q < death[bi, hi, s])} for q in range(t)]
             for hi in range(hkv)] for bi in range(b)]


def test_scorer_features_are_rotary_pair_norms_and_ignore_the_position():
    """Brute force: |(k_i, k_{i+D/2})| one pair at a time; a rotate-half rotation leaves them unchanged;
    a zero pair keeps a finite gradient."""
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    feats = rotary_invariant_features(keys, values)
    ref = torch.stack([torch.tensor([keys[b, h, n, i].hypot(keys[b, h, n, i + 4]) for i in range(4)])
                       for b in range(2) for h in range(3) for n in range(5)]).view(2, 3, 5, 4)
    torch.testing.assert_close(feats[..., :4], ref)
    torch.testing.assert_close(feats[..., 4:], values)
    angle = torch.rand(4) * 6.28  # one rotation per pair of dimensions, as RoPE applies at some position
    a, b = keys[..., :4], keys[..., 4:]
    rotated = torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1)
    torch.testing.assert_close(rotary_invariant_features(rotated, values), feats)
    zero = torch.zeros(1, 1, 1, 8, requires_grad=True)
    rotary_invariant_features(zero, values[:1, :1, :1]).sum().backward()
    assert torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("scale", [1.0, 1e9])  # 1e9: scores beyond the int64 key's range (the keep_order path)
def test_worst_pairs_are_the_last_in_keep_order(scale):
    """A cut's evictions by topk equal the last `count` held pairs of keep_order (ties on the score
    grid: the newer goes; sinks, +inf, never), on rows with unheld slots."""
    torch.manual_seed(0)
    n, w = 6, 40
    scores = torch.randint(-3, 4, (n, w)).float() * scale * RESOLUTION + torch.rand(n, w) * 1e-8  # many ties
    scores[0, :3] = float("inf")
    positions = torch.stack([torch.randperm(1000)[:w] for _ in range(n)])
    held = torch.rand(n, w) < 0.8
    count = torch.tensor([0, 1, 5, 17, 2, 9])
    got = worst_pairs(scores, positions, held, count)
    rank = keep_order(scores.masked_fill(~held, float("-inf")), positions)
    for i in range(n):
        order = [j for j in rank[i].argsort().tolist() if held[i, j]]
        want = set(order[len(order) - int(count[i]):]) if count[i] else set()
        assert set(got[i].nonzero().flatten().tolist()) == want
    assert not got[0, :3].any()


def test_head_shares_average_to_the_budget_and_pass_gradients():
    logits = torch.randn(12, requires_grad=True)
    shares = head_shares(logits, 0.3)
    assert torch.all((shares >= 0) & (shares <= 1))
    assert abs(float(shares.detach().mean()) - 0.3) < 1e-5
    assert torch.argsort(shares).tolist() == torch.argsort(logits.detach()).tolist()  # monotone in the logit
    (shares * torch.arange(12.0)).sum().backward()
    assert logits.grad.abs().sum() > 0
    total = logits.detach().clone().requires_grad_(True)
    head_shares(total, 0.3).sum().backward()  # the sum is pinned at 12 r: no gradient through it
    assert total.grad.abs().max() < 1e-5
    assert torch.equal(head_shares(torch.randn(5), 0.2, uniform=True), torch.full((5,), 0.2))
    # The mean stays r under any logits: moving one logit up moves others' shares down.
    eps = torch.zeros(12)
    eps[0] = 1.0
    moved = head_shares(logits.detach() + eps, 0.3)
    assert moved[0] > shares[0] and torch.all(moved[1:] <= shares[1:].detach() + 1e-7)


def test_soft_topk_sums_to_k_passes_gradients_and_tends_to_the_hard_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 40, generator=g, requires_grad=True)
    mask = torch.ones(2, 3, 40, dtype=torch.bool)
    mask[1, :, 30:] = False
    k = torch.tensor([[5.0, 10.0, 20.0], [3.0, 7.0, 15.0]])
    soft = soft_topk(scores, k, mask, temperature=1.0)
    assert torch.allclose(soft.sum(-1), k, atol=1e-4)
    assert torch.all(soft[1, :, 30:] == 0)
    (soft * torch.randn(2, 3, 40, generator=g)).sum().backward()
    assert scores.grad.abs().sum() > 0
    cold = soft_topk(scores.detach(), k, mask, temperature=1e-3)
    masked = scores.detach().masked_fill(~mask, float("-inf"))
    for bi in range(2):
        for hi in range(3):
            top = set(masked[bi, hi].topk(int(k[bi, hi])).indices.tolist())
            assert set((cold[bi, hi] > 0.5).nonzero().flatten().tolist()) == top
    errors = [float((soft_topk(scores.detach(), k, mask, t) - (cold > 0.5).float()).abs().sum()) for t in (1.0, 0.3, 0.1, 0.03)]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("sinks", [0, 2])
def test_eviction_times_match_the_token_by_token_rule(sinks):
    g = torch.Generator().manual_seed(sinks)
    b, hkv, t, window, every = 2, 3, 60, 6, 4
    scores = torch.randn(b, hkv, t, generator=g)
    scores[0, 0, 10:14] = 0.5  # ties: the older pair is kept first
    shares = torch.tensor([0.1, 0.45, 1.0])
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :7] = False  # left padding
    death = eviction_times(scores, shares, window, every, sinks, valid)
    assert visibility_from_times(death, window, valid) == reference_visibility(scores, shares, window, every, sinks, valid)
    assert torch.all(death[:, 2][valid] == NEVER)  # share 1 keeps everything


def _lkv_model(family="llama", budget=0.3, every=4, window=8, uniform=False, seed=0, sinks=0):
    model = tiny_model(family, seed=seed)
    spkv.convert(model, SPKVConfig(window=window, predictor_hidden=16, sinks=sinks,
                                   lkv=LKVConfig(budget=budget, exit_every=every, uniform=uniform)))
    with torch.no_grad():  # a trained-looking scorer: spread budgets and scores
        for s in scorers(model).values():
            s.budget_logits.normal_()
            s.w2.mul_(4)
    return model


def _chunked(model, ids, sizes, **cache_kw):
    cache = spkv.SPKVCache(model, **cache_kw)
    out, pos = [], 0
    with torch.no_grad():
        for n in sizes:
            out.append(model(input_ids=ids[:, pos : pos + n], **cache_kwarg(cache), use_cache=True).logits)
            pos += n
    assert pos == ids.shape[1]
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_chunked_prefill_and_decode_equal_the_full_sequence_rule(family):
    model = _lkv_model(family, sinks=1 if family == "llama" else 0)
    ids = torch.randint(3, 90, (2, 75))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    dense, _ = _chunked(model, ids, [75], budget=1.0)
    assert (dense - full).abs().max() > 1e-2  # evictions change the output: the comparison below can fail
    for sizes in ([75], [13, 1, 1, 22, 5, 1, 1, 1, 30], [1] * 75):
        got, cache = _chunked(model, ids, sizes)
        assert torch.allclose(got, full, atol=1e-4), (sizes, (got - full).abs().max())
    # What the cache holds at the end is what the rule says the next query sees.
    layer = cache.spkv_layers()[0]
    i = layer.layer_idx
    cfg = model.spkv_config
    keys = {}

    def grab(module, args, out):  # the layer's keys and values as the scorer sees them
        keys["kv"] = out
    scorer = scorers(model)[i]
    handle = scorer.register_forward_hook(grab)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    t = ids.shape[1]
    scores = torch.nn.functional.pad(keys["kv"].transpose(1, 2), (0, 1))  # one more query: the next token's
    valid = torch.arange(t + 1).expand(2, t + 1) < t
    death = eviction_times(scores, scorer.shares, cfg.window, cfg.lkv.exit_every, cfg.sinks, valid)
    for bi in range(2):
        for hi in range(layer.num_kv_heads):
            expected = {s for s in range(t) if t - s < cfg.window or t < death[bi, hi, s]}
            assert set(layer.kept_positions(bi, hi).tolist()) == expected


def test_anneal_blends_the_soft_mask_with_the_causal_eviction_rule():
    """a = 0 is the soft forward, a = 1 the hard (deployed) rule exactly; in between the scorer gets
    gradients, and near 1 the forward is near the hard rule."""
    model = _lkv_model(sinks=1)
    model.train()
    ids = torch.randint(3, 90, (2, 60))
    lkv = model.spkv_config.lkv.replace(temperature=0.3)

    def logits(**changes):
        spkv.update_config(model, lkv=lkv, **changes)
        return model(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        soft, hard = logits(phase="soft"), logits(phase="hard")
        assert (soft - hard).abs().max() > 1e-2  # the phases differ: the comparisons below can fail
        assert torch.allclose(logits(phase="anneal", anneal_alpha=0.0), soft, atol=1e-5)
        assert torch.allclose(logits(phase="anneal", anneal_alpha=1.0), hard, atol=1e-5)
        near = (logits(phase="anneal", anneal_alpha=0.999) - hard).abs().max()
        assert near < 0.1 * (soft - hard).abs().max()
    logits(phase="anneal", anneal_alpha=0.9).square().mean().backward()
    assert all(s.w1.grad is not None and s.w1.grad.abs().sum() > 0 for s in scorers(model).values())


def test_left_padded_batch_equals_the_full_sequence_rule_and_each_sequence_alone():
    model = _lkv_model(sinks=1)
    ids = torch.randint(3, 90, (2, 50))
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, :9] = 0
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        cache = spkv.SPKVCache(model)
        batch = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **cache_kwarg(cache), use_cache=True).logits
        alone = model(input_ids=ids[1:, 9:], use_cache=True).logits
    real = mask.bool()
    assert torch.allclose(batch[real], full[real], atol=1e-4)
    assert torch.allclose(batch[1, 9:], alone[0], atol=1e-4)


def test_memory_tracks_the_budget_not_the_context():
    model = _lkv_model(budget=0.25, every=4, window=8)
    ids = torch.randint(3, 90, (1, 400))
    _, cache = _chunked(model, ids, [100] + [1] * 300)
    for layer in cache.spkv_layers():
        limits = torch.floor(layer.shares.double() * layer.decided.double()).long().view(-1)
        lengths = layer.store.lengths
        assert torch.all(lengths <= limits + 4)  # at most exit_every pairs over budget between cuts
        assert torch.all(lengths >= limits)
        pages_held = layer.store.owned.sum()
        assert pages_held * layer.store.page <= int((limits + 4 + layer.store.page).sum())  # evicted slots are reused
    stats = spkv.cache_stats(cache)
    assert abs(stats.density - 0.25) < 0.05


def test_a_post_hoc_policy_evicts_under_a_uniform_budget():
    model = tiny_model("llama")
    spkv.convert(model, SPKVConfig(window=8, predictor_hidden=16))
    ids = torch.randint(3, 90, (1, 200))
    got, cache = _chunked(model, ids, [17, 1, 1, 181], policy=KeyNorm(), budget=0.2, sinks=0)
    layer = cache.spkv_layers()[0]
    assert torch.all(layer.shares == 0.2)
    assert spkv.cache_stats(cache).density == pytest.approx(0.2, abs=0.04)
    once, _ = _chunked(model, ids, [200], policy=KeyNorm(), budget=0.2, sinks=0)
    assert torch.allclose(got, once, atol=1e-5)


def test_budget_can_change_at_deployment_and_uniform_ablation():
    model = _lkv_model(budget=0.3)
    ids = torch.randint(3, 90, (1, 120))
    density = {}
    for r in (0.1, 0.5):
        set_budget(model, r)
        _, cache = _chunked(model, ids, [120])
        density[r] = spkv.cache_stats(cache).density
    assert density[0.1] < density[0.5]
    _, cache = _chunked(model, ids, [120], budget=0.2)  # per cache, without touching the model
    assert abs(float(torch.stack([layer.shares for layer in cache.spkv_layers()]).mean()) - 0.2) < 1e-5
    uniform = _lkv_model(budget=0.3, uniform=True)
    _, cache = _chunked(uniform, ids, [120])
    assert all(torch.all(layer.shares == 0.3) for layer in cache.spkv_layers())


def test_errors():
    model = _lkv_model()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        spkv.SPKVCache(model, budget=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        set_budget(model, 1.5)
    with pytest.raises(ValueError, match="set_budget"):
        spkv.set_threshold(model, 0.5)
    sp = tiny_model("llama")
    spkv.convert(sp, SPKVConfig(window=8))
    with pytest.raises(ValueError, match="LKV model"):
        set_budget(sp, 0.3)
    with pytest.raises(ValueError, match="needs an LKV model"):
        spkv.SPKVCache(sp, policy=LKVPolicy())
    with pytest.raises(ValueError, match="LKV options"):
        TrainConfig(budget=0.3)
    with pytest.raises(ValueError, match="hard-fraction 0"):
        TrainConfig(method="lkv", train_llm="none")
    with pytest.raises(ValueError, match="cannot be cropped"):
        spkv.SPKVCache(model).layers[0].activate_past_recording()


def test_lkv_adapter_round_trip_and_wrong_base(tmp_path):
    model = _lkv_model()
    spkv.save_adapter(model, tmp_path / "lkv")
    ids = torch.randint(3, 90, (1, 40))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        fresh = spkv.load_adapter(tiny_model("llama"), tmp_path / "lkv")
        assert fresh.spkv_config.lkv == model.spkv_config.lkv
        assert torch.allclose(fresh(input_ids=ids, use_cache=False).logits, expected, atol=1e-6)
    with pytest.raises(ValueError, match="different weights"):
        spkv.load_adapter(tiny_model("llama", seed=1), tmp_path / "lkv")
    with pytest.raises(ValueError, match="different architecture"):
        spkv.load_adapter(tiny_model("qwen2"), tmp_path / "lkv")


def test_lkv_trains_end_to_end_with_a_frozen_llm_and_its_adapter_reproduces_it(tmp_path):
    """`spkv train --method lkv` with the LLM frozen, by distillation: the scorer and the budget
    logits move, the LLM does not, and the exported adapter loads into a fresh base model."""
    from spkv.cli import main

    from .tiny_models import save_tiny_pretrained

    model_dir = save_tiny_pretrained(tmp_path / "model")
    text = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (3000,), generator=g)))
    out = tmp_path / "run"
    main(["train", "--model", str(model_dir), "--data", str(text), "--out", str(out), "--method", "lkv", "--budget", "0.3",
          "--train-llm", "none", "--hard-fraction", "0", "--distill-weight", "1", "--seq-len", "64", "--batch-size", "1",
          "--max-tokens", "256", "--window", "8", "--exit-every", "4", "--predictor-hidden", "8", "--no-bf16"])
    fresh, _ = spkv.load_model(str(model_dir))
    spkv.load_adapter(fresh, out / "adapter")
    assert fresh.spkv_config.lkv.budget == 0.3 and fresh.spkv_config.phase == "hard"
    logits = torch.stack([s.budget_logits for s in scorers(fresh).values()])
    assert logits.abs().max() > 0  # the budgets moved from their zero init
    base, _ = spkv.load_model(str(model_dir))
    trained = dict(fresh.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in base.named_parameters())  # the LLM stayed frozen
    ids = torch.randint(2, 62, (1, 40))
    with torch.no_grad():
        full = fresh(input_ids=ids, use_cache=False).logits
        decoded, _ = _chunked(fresh, ids, [20] + [1] * 20)
    assert torch.allclose(full, decoded, atol=1e-4)


def test_the_evaluations_decode_an_lkv_model_as_method_lkv():
    """spkv.methods (eval tasks and the benchmarks): 'lkv' decodes with the learned budgets at r (the
    model's own by default), 'spkv' on an LKV model and 'lkv' on an SP-KV model are errors."""
    from spkv.methods import Method, cache_factory

    model = _lkv_model()
    own, at_half = cache_factory(model, Method("lkv"))(), cache_factory(model, Method("lkv", 0.5))()
    for cache, r in ((own, model.spkv_config.lkv.budget), (at_half, 0.5)):
        shares = torch.stack([layer.shares for layer in cache.spkv_layers()])
        assert isinstance(cache.policy, LKVPolicy) and float(shares.mean()) == pytest.approx(r, abs=1e-5)
    assert Method("lkv", 0.5).label == "lkv (r=0.5)"
    dense = cache_factory(model, Method("dense"))()  # on an LKV model too, dense keeps every pair
    with torch.no_grad():
        model(input_ids=torch.randint(3, 90, (1, 60)), **cache_kwarg(dense))
    assert spkv.cache_stats(dense).density == 1.0
    with pytest.raises(ValueError, match="threshold would be ignored"):
        cache_factory(model, Method("h2o", 0.5))
    with pytest.raises(ValueError, match="Use method 'lkv'"):
        cache_factory(model, Method("spkv"))
    sp = tiny_model("llama")
    spkv.convert(sp, SPKVConfig(window=8))
    with pytest.raises(ValueError, match="needs an LKV model"):
        cache_factory(sp, Method("lkv"))

"""Compressed cache: exactness against the full-sequence forward, generate(), memory, policies."""

from __future__ import annotations

import math

import pytest
import torch

import spkv
from spkv.cache import EXIT_BATCH
from spkv.cache_layer import SPKVLayer
from spkv.compat import CACHE_ARG, cache_argument, cache_kwarg, output_cache
from spkv.policies import (
    H2O,
    POLICIES,
    TOVA,
    KeepAll,
    KeyNorm,
    RandomPolicy,
    SPKVPolicy,
    StreamingLLM,
)
from spkv.store import PagedStore

from .tiny_models import FAMILIES, assert_close_on_real_tokens, batch, logits, randomize_gates, tiny_model


def run_with_cache(model, ids, mask, prefill, chunk, cache=None):
    """Chunked prefill of the first `prefill` tokens, then one token at a time. Returns (logits, cache)."""
    cache = cache if cache is not None else spkv.SPKVCache(model)
    outs = []
    with torch.no_grad():
        for start in range(0, ids.shape[1], 1):
            if start < prefill and start % chunk:
                continue
            stop = min(prefill, start + chunk) if start < prefill else start + 1
            out = model(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop], **cache_kwarg(cache))
            outs.append(out.logits)
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_decode_match_full_sequence(family):
    model = tiny_model(family)
    spkv.convert(model, spkv.SPKVConfig(window=8, threshold=0.5))
    randomize_gates(model, seed=1)
    ids, mask = batch(batch_size=3, length=72, left_pad=11)  # 9 windows long
    ref = logits(model, ids, mask)
    got, cache = run_with_cache(model, ids, mask, prefill=40, chunk=12)
    assert_close_on_real_tokens(got, ref, mask, tol=1e-4)
    stats = spkv.cache_stats(cache)
    assert 0.2 < stats.density < 0.8, "gates must drop a real share of pairs for this test to mean anything"
    assert stats.bytes_held < stats.bytes_full


@pytest.mark.parametrize("page", [1, 5, 64])
def test_any_page_size_gives_the_same_logits_and_holds_its_pages(page):
    """Pages are a storage detail: decode over pages of any size equals the full forward; bytes held
    are the pages the heads own."""
    model = tiny_model("llama")
    spkv.convert(model, spkv.SPKVConfig(window=8, threshold=0.5))
    randomize_gates(model, seed=1)
    ids, mask = batch(batch_size=2, length=60, left_pad=5)
    got, cache = run_with_cache(model, ids, mask, prefill=30, chunk=12, cache=spkv.SPKVCache(model, page=page))
    assert_close_on_real_tokens(got, logits(model, ids, mask), mask, tol=1e-4)
    for layer in cache.spkv_layers():
        assert layer.store.page == page
        assert layer.store.capacity_pairs() >= layer.store.pages * page >= layer.store.stored_pairs()
    with pytest.raises(ValueError, match="page must be an integer >= 1"):
        spkv.SPKVCache(model, page=0)


def test_sinks_are_kept_and_not_counted():
    model = tiny_model("llama")
    spkv.convert(model, spkv.SPKVConfig(window=4, threshold=0.5, sinks=2))
    randomize_gates(model, seed=2)
    ids, mask = batch(batch_size=2, length=30, left_pad=5)
    ref = logits(model, ids, mask)
    got, cache = run_with_cache(model, ids, mask, prefill=13, chunk=5)
    assert_close_on_real_tokens(got, ref, mask, tol=1e-4)
    layer = cache.spkv_layers()[0]
    # Row 1 starts with 5 pads: its first two real tokens (positions 5, 6) are sinks, always stored.
    # After 30 tokens the next query's window is positions 27..30, so 0..26 have left it.
    decided_real = (30 - 4 + 1) - 5 - 2  # minus the pads, minus the sinks
    cache.take_exits()  # decode batches its window exits: decide the waiting ones before counting
    assert int(layer.decided[1].max()) == decided_real
    assert int(layer.store_lengths()[1].min()) >= 2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_threshold_zero_is_token_identical(family):
    base = tiny_model(family)
    ids, mask = batch(batch_size=2, length=20, left_pad=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = base.generate(ids, **kwargs)
        spkv.convert(base, spkv.SPKVConfig(window=4, threshold=0.0))
        got = base.generate(ids, **kwargs)
        chunked = base.generate(ids, prefill_chunk_size=7, **kwargs)
    assert torch.equal(got, expected)
    assert torch.equal(chunked, expected)


def test_generate_uses_the_compressed_cache_and_sampling_works():
    model = tiny_model("qwen3")
    spkv.convert(model, spkv.SPKVConfig(window=4, threshold=0.5))
    randomize_gates(model)
    ids, mask = batch(batch_size=2, length=16, left_pad=3)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=5,
                             pad_token_id=0, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 28)
    assert isinstance(output_cache(out), spkv.SPKVCache)
    assert output_cache(out).get_seq_length() == 27  # the last sampled token is never fed back
    spkv.set_threshold(model, 0.9)  # deploy-time change, then generate again
    with torch.no_grad():
        again = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True)
    assert spkv.cache_stats(output_cache(again)).density < spkv.cache_stats(output_cache(out)).density


def test_cache_argument_under_either_name():
    """transformers 5.24 renamed past_key_values to cache: hooks find the cache under either name.
    The old name `past_key_values` is used here on purpose (callers on transformers < 5.24 still pass it)."""
    c = object()
    assert cache_argument({"past_key_values": c}) == ("past_key_values", c)
    assert cache_argument({"cache": c, "past_key_values": None}) == ("cache", c)
    assert cache_argument({"cache": None}) == ("cache", None)
    assert cache_argument({}) == (CACHE_ARG, None)


def test_threshold_one_leaves_only_the_window():
    model = tiny_model("llama")
    window = 16
    spkv.convert(model, spkv.SPKVConfig(window=window, threshold=1.0))
    ids = torch.randint(3, 90, (1, 4096))
    cache = spkv.SPKVCache(model)
    with torch.no_grad():
        for start in range(0, 4096, 512):
            model(input_ids=ids[:, start:start + 512], **cache_kwarg(cache))
    stats = spkv.cache_stats(cache)
    assert stats.kept.sum() == 0 and stats.decided.sum() == 2 * 2 * (4096 - window + 1)
    for layer in cache.spkv_layers():
        assert layer.recent.size == window - 1  # the next query brings the window to `window`
        # the ring it decodes in with no copy per step: the window and the slots of batched exits
        assert layer.recent.capacity == window + layer.exit_batch - 1 and layer.exit_batch == EXIT_BATCH
        assert layer.store.stored_pairs() == 0 and layer.store.capacity_pairs() == 0
    bytes_per_pair = 2 * 8 * 4 * 2  # kv heads x head_dim x fp32 x (k, v), per layer
    assert stats.bytes_held == 2 * (window + EXIT_BATCH - 1) * bytes_per_pair


class PeakRecorder(SPKVLayer):
    """Records the most pairs held at any moment (global capacity + window) during attention."""

    peak = 0

    def attend(self, query, scaling):
        held = self.store.capacity_pairs() + self.recent.capacity * self.batch_size * self.num_kv_heads
        PeakRecorder.peak = max(PeakRecorder.peak, held)
        return super().attend(query, scaling)


def test_long_prefill_memory_is_bounded_by_kept_window_and_chunk():
    model = tiny_model("llama", max_position_embeddings=16384)
    window, chunk, n = 32, 256, 16384
    spkv.convert(model, spkv.SPKVConfig(window=window))
    cache = spkv.SPKVCache(model, policy=RandomPolicy(threshold=0.9, seed=0))
    cache.layers = [PeakRecorder(layer.layer_idx, layer.window, layer.policy, layer.sinks) for layer in cache.layers]
    ids = torch.randint(3, 90, (1, n))
    with torch.no_grad():
        for start in range(0, n, chunk):
            model(input_ids=ids[:, start:start + chunk], **cache_kwarg(cache))
    stats = spkv.cache_stats(cache)
    kept_per_head = stats.kept.max()
    heads = 2
    growth_slack = max(64, kept_per_head // 32) * heads
    bound = heads * (kept_per_head + window - 1 + chunk) + growth_slack
    assert PeakRecorder.peak <= bound
    assert PeakRecorder.peak < 0.2 * heads * n, "far below a full-length cache"
    assert 0.07 < stats.density < 0.13


def test_store_growth_leaves_slack_after_a_large_append():
    """A prefill chunk larger than the pool's ~3% growth must not leave the pool exactly full: the
    first decode exits would then copy the whole pool again (one copy per layer in one step)."""
    store = PagedStore(heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"), page=4)
    keys = torch.randn(2, 512, 4)
    store.append(torch.ones(2, 512, dtype=torch.bool), keys, keys, torch.arange(512))
    pages = store.pages
    assert pages == 2 * 512 // 4 and store.k.shape[0] >= pages + pages // 32
    pool = store.k.data_ptr()
    steps = 2 * (pages // 32)  # one pair per head per exit: 2 heads x steps / 4 per page = the slack
    for step in range(512, 512 + steps):
        store.append(torch.ones(2, 1, dtype=torch.bool), keys[:, :1], keys[:, :1], torch.tensor([step]))
    assert store.k.data_ptr() == pool, "the small appends after the large one copied the pool"
    k, _ = store.get(1)
    assert torch.equal(k[:512], keys[1]) and k.shape[0] == 512 + steps


def test_cache_errors():
    model = tiny_model("llama", max_position_embeddings=64)
    with pytest.raises(ValueError, match="needs a model converted"):
        spkv.SPKVCache(model)
    spkv.convert(model, spkv.SPKVConfig(window=4))
    cache = spkv.SPKVCache(model)
    ids, mask = batch(batch_size=2, length=10)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwarg(cache))
        with pytest.raises(ValueError, match="holds 2 sequences but got 1"):
            model(input_ids=ids[:1, :1], **cache_kwarg(cache))
        with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
            model(input_ids=torch.randint(3, 90, (1, 65)))
    unconverted = tiny_model("llama")
    with pytest.raises(RuntimeError, match="without gate logits"):
        with torch.no_grad():
            unconverted(input_ids=ids, attention_mask=mask, **cache_kwarg(spkv.SPKVCache(model)))


# ---- policies: each keeps exactly the pairs its scores select ---------------------------------


def feed_layer(policy, keys, values, queries, window, threshold_logits=None, sinks=0):
    """Drive one SPKVLayer token by token with synthetic tensors; returns the layer."""
    layer = SPKVLayer(0, window, policy, sinks)
    layer.spkv_config = spkv.SPKVConfig(window=window, threshold=0.5)
    b, hkv, t, d = keys.shape
    for i in range(t):
        layer.staged_logits = threshold_logits[:, i : i + 1] if threshold_logits is not None else torch.zeros(b, 1, hkv)
        layer.update(keys[:, :, i : i + 1], values[:, :, i : i + 1])
        layer.attend(queries[:, :, i : i + 1], 1 / math.sqrt(d))
    return layer


def stored_positions(layer, keys, bi, hi):
    """Map the stored keys of (bi, hi) back to their positions."""
    stored = layer.stored(bi, hi)[0]
    return [int((keys[bi, hi] == k).all(-1).nonzero()) for k in stored]


def synthetic(seed=0, b=2, hkv=2, groups=2, t=40, d=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g),
            torch.randn(b, hkv * groups, t, d, generator=g), torch.randn(b, t, hkv, generator=g) * 2)


@pytest.mark.parametrize("policy_cls", [SPKVPolicy, KeyNorm, RandomPolicy, KeepAll, StreamingLLM])
def test_write_time_policies_keep_exactly_what_scores_select(policy_cls):
    keys, values, queries, gate_logits = synthetic()
    window, t = 5, keys.shape[2]
    policy = policy_cls() if policy_cls is SPKVPolicy else policy_cls(threshold={KeyNorm: -2.8, RandomPolicy: 0.6}.get(policy_cls, 0.0))
    twin = policy_cls(threshold=0.0)  # scores the same pairs the same way, one step at a time
    expected_scores = torch.cat(
        [twin.score_new(keys[:, :, i : i + 1], values[:, :, i : i + 1], gate_logits[:, i : i + 1]) for i in range(t)], dim=2
    )
    layer = feed_layer(policy, keys, values, queries, window, gate_logits)
    threshold = 0.5 if policy_cls is SPKVPolicy else policy.threshold
    for bi in range(2):
        for hi in range(2):
            # after t tokens, positions 0 .. t - window have left the window
            want = [s for s in range(t - window + 1) if expected_scores[bi, hi, s] >= threshold]
            assert stored_positions(layer, keys, bi, hi) == want
    kept = int(layer.kept.sum())
    if policy_cls is StreamingLLM:
        assert kept == 0
    elif policy_cls is KeepAll:
        assert kept == 2 * 2 * (t - window + 1)
    else:
        assert 0 < kept < 2 * 2 * (t - window + 1), "the threshold should select some pairs, not all or none"


@pytest.mark.parametrize("policy_cls", [H2O, TOVA])
def test_attention_policies_match_a_brute_force_simulation(policy_cls):
    keys, values, queries, _ = synthetic(seed=4, b=1, hkv=1, groups=2, t=30)
    window, threshold, t, d = 4, (0.9 if policy_cls is H2O else 0.15), 30, 8
    layer = feed_layer(policy_cls(threshold=threshold), keys, values, queries, window)
    # Brute force: per step, softmax over visible keys; scores from that; decide at window exit.
    kept, score = [], torch.zeros(t)
    for i in range(t):
        visible = kept + list(range(max(0, i - window + 1), i + 1))
        s = torch.stack([queries[0, :, i] @ keys[0, 0, j] for j in visible], dim=-1) / math.sqrt(d)  # [G, V]
        p = torch.softmax(s, dim=-1)
        for col, j in enumerate(visible):
            if j > i - window:
                score[j] = score[j] + p[:, col].sum() if policy_cls is H2O else p[:, col].mean()
        leaving = i - window + 1
        if leaving >= 0 and score[leaving] >= threshold:
            kept.append(leaving)
    assert stored_positions(layer, keys, 0, 0) == kept
    assert 0 < len(kept) < t - window, "threshold should select some pairs, not all or none"


def test_every_registered_policy_is_covered():
    # expected_attention and kvzap are covered through the cache in tests/test_matched.py, lkv in tests/test_lkv.py
    assert set(POLICIES) == {"spkv", "keep_all", "streaming", "h2o", "tova", "key_norm", "random", "expected_attention", "kvzap", "lkv"}


@pytest.mark.parametrize("policy", [None, "random"])
def test_batched_window_exits_are_exact_and_need_no_host_transfer_between_exits(policy, monkeypatch):
    """Decode takes window exits every exit_batch steps: the logits and the final cache equal exiting
    every step, and a step between exits moves nothing to the host (counted, not timed)."""
    from spkv.policies import POLICIES

    model = tiny_model("llama")
    spkv.convert(model, spkv.SPKVConfig(window=6, threshold=0.5))
    randomize_gates(model, seed=3)
    ids, mask = batch(batch_size=2, length=60, left_pad=4)

    def run(exit_batch):
        chosen = POLICIES[policy](threshold=0.5, seed=0) if policy else None  # a write-time policy (seeded)
        cache = spkv.SPKVCache(model, policy=chosen, exit_batch=exit_batch)
        with torch.no_grad():
            out = [model(input_ids=ids[:, :12], attention_mask=mask[:, :12], **cache_kwarg(cache)).logits]
            out += [model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwarg(cache)).logits
                    for t in range(12, ids.shape[1])]
        return torch.cat(out, 1), cache

    every, one = run(1)
    batched, cache = run(5)
    assert_close_on_real_tokens(batched, every, mask, tol=1e-5)
    a, b = spkv.cache_stats(one), spkv.cache_stats(cache)
    assert torch.equal(a.kept, b.kept) and torch.equal(a.decided, b.decided) and 0 < a.density < 1
    for x, y in zip(one.spkv_layers(), cache.spkv_layers()):
        assert torch.equal(x.store_lengths(), y.store_lengths())
        assert all(torch.equal(x.kept_positions(bi, hi), y.kept_positions(bi, hi)) for bi in range(2) for hi in range(2))

    # count host transfers inside the gated layers' decode calls: one per exit batch, none between
    transfers, inside = [], [False]
    for name in ("cpu", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if inside[0]:
                transfers.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_attend = SPKVLayer.attend

    def attend(self, query, scaling):
        inside[0] = True
        try:
            return original_attend(self, query, scaling)
        finally:
            inside[0] = False

    monkeypatch.setattr(SPKVLayer, "attend", attend)
    per_step = []
    with torch.no_grad():
        for _ in range(10):
            before = len(transfers)
            model(input_ids=ids[:, -1:], **cache_kwarg(cache))
            per_step.append(len(transfers) - before)
    exits = [s for s in per_step if s]
    assert 1 <= len(exits) <= 3 and per_step.count(0) >= 6, per_step  # 10 steps, an exit every 5
    with pytest.raises(ValueError, match="exit_batch"):
        spkv.SPKVCache(model, exit_batch=0)
    h2o = spkv.SPKVCache(model, policy=POLICIES["h2o"](), exit_batch=5)  # decides on exit: cannot wait
    assert {layer.exit_batch for layer in h2o.spkv_layers()} == {1}

"""spkv bench decode / prefill: quick smoke runs on a tiny random model, and their result files."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

import spkv
from spkv.bench import common, decode, prefill
from spkv.bench.decode_report import decode_markdown
from spkv.cache_layer import SPKVLayer
from spkv.cli import main
from spkv.convert import predictors


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """An adapter for `--model tiny` whose predictors drop a real share of pairs."""
    model = common.build_tiny_model()
    spkv.convert(model, spkv.SPKVConfig(window=16, threshold=0.5))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in predictors(model).values():
            p.fc2.weight.copy_(torch.randn(p.fc2.weight.shape, generator=g))
            p.fc2.bias.zero_()
    return spkv.save_adapter(model, tmp_path_factory.mktemp("adapter") / "tiny")


@pytest.fixture(scope="module")
def decode_result(tmp_path_factory, tiny_adapter):
    out = tmp_path_factory.mktemp("bench")
    main(["bench", "decode", "--quick", "--adapter", str(tiny_adapter), "--out", str(out)])
    return json.loads((out / "decode.json").read_text()), out


def _ok_rows(result, cache=None):
    return [r for r in result["rows"] if r["status"] == "ok" and (cache is None or r["cache"] == cache)]


def test_decode_quick_rows_and_files(decode_result):
    result, out = decode_result
    for name in ("decode.json", "decode.md", "decode.png", "decode_memory.png"):
        assert (out / name).stat().st_size > 0
    quick = decode.QUICK_DECODE
    rows = result["rows"]
    assert len(rows) == len(quick["contexts"]) * len(quick["batch_sizes"]) * len(decode.DEFAULT_CACHES)
    assert {r["cache"] for r in rows} == set(decode.DEFAULT_CACHES)
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    assert result["bandwidth"]["bytes_per_s"] > 0
    assert {"command", "commit", "machine", "date"} <= set(result["provenance"])
    for r in rows:
        for key in ("step_ms", "tokens_per_s", "speedup_vs_static", "speedup_vs_dynamic", "kv_bytes_held",
                    "kv_bytes_read", "weight_bytes_read", "predicted_ms", "measured_over_predicted", "rss_peak_so_far_mib"):
            assert r[key] > 0, (r["cache"], key, r[key])
        assert len(r["step_ms_repeat_means"]) == quick["repeats"]
        # mean steps, not the median step, so the step that takes the batched window exits is counted
        assert r["step_ms"] == pytest.approx(statistics.median(r["step_ms_repeat_means"]))
        assert r["kv_bytes_read"] <= r["kv_bytes_held"]
    assert all(r["speedup_vs_static"] == 1.0 for r in _ok_rows(result, "static"))
    assert "| density-25 |" in (out / "decode.md").read_text()
    assert result["fill"] == result["settings"]["fill"] == "synthetic"  # the default
    assert all(r["fill"] == ("model" if r["cache"] == "spkv-adapter" else "synthetic") for r in rows)
    assert "synthetic fill" in (out / "decode.md").read_text().splitlines()[0]
    assert result["estimate"]["total_s"] > 0 and len(result["estimate"]["rows"]) == len(rows)


def test_decode_quick_forced_density_and_memory(decode_result):
    result, _ = decode_result
    for percent in (10, 25, 50):
        for r in _ok_rows(result, f"density-{percent}"):
            assert abs(r["density"] - percent / 100) < 0.1, (r["context"], r["batch"], r["density"])
    assert all(r["density"] == 0.0 for r in _ok_rows(result, "window-only"))
    assert all(0.0 < r["density"] < 1.0 for r in _ok_rows(result, "spkv-adapter"))
    longest = max(decode.QUICK_DECODE["contexts"])
    for batch in decode.QUICK_DECODE["batch_sizes"]:
        held = {r["cache"]: r["kv_bytes_held"] for r in _ok_rows(result) if r["context"] == longest and r["batch"] == batch}
        assert held["density-25"] < held["static"]
        assert held["window-only"] < held["density-25"]
        assert held["dynamic"] == held["static"]  # the static cache is preallocated for exactly the run
    # every compressed row against its proportional ideal, from the same run's static and window-only rows
    step = {(r["cache"], r["context"], r["batch"]): r["step_ms"] for r in _ok_rows(result)}
    for r in _ok_rows(result):
        if r["cache"].startswith("density-") or r["cache"] == "spkv-adapter":
            static, window = step["static", r["context"], r["batch"]], step["window-only", r["context"], r["batch"]]
            assert r["kv_share"] == r["density"] and r["ideal_ms"] == pytest.approx(window + r["density"] * (static - window))
        elif r["cache"] in ("static", "dynamic", "window-only"):
            assert r["ideal_ms"] is None


def test_decode_skips_over_memory_budget_and_rejects_unknown_cache():
    given = {"caches": ["static"], "max_kv_gib": 1e-9, "bandwidth_mib": 8, "contexts": [64], "batch_sizes": [1]}
    result = decode.run_decode(common.settings_from(decode.DecodeSettings, given, decode.QUICK_DECODE), progress=False)
    (row,) = result["rows"]
    assert row["status"].startswith("skipped: memory") and row["step_ms"] is None
    given = {"caches": ["spkv-adapter"], "adapter": "unused", "max_model_fill_tokens": 100, "bandwidth_mib": 8,
             "contexts": [64], "batch_sizes": [2]}
    result = decode.run_decode(common.settings_from(decode.DecodeSettings, given, decode.QUICK_DECODE), progress=False)
    (row,) = result["rows"]
    assert row["status"].startswith("skipped: model fill too long") and row["fill"] == "model"
    with pytest.raises(ValueError, match="unknown cache"):
        decode.parse_cache("paged")
    spec = decode.parse_cache("density-25-page128")
    assert (spec.name, spec.page, spec.kv_fraction) == ("density-25-page128", 128, 0.25)
    with pytest.raises(ValueError, match="applies to SP-KV caches"):
        decode.parse_cache("static-page128")
    with pytest.raises(ValueError, match="density-P"):
        decode.parse_cache("density-0")


def test_decode_interleave_times_the_caches_of_a_group_in_turn(monkeypatch):
    order = []
    real = decode.time_repeat

    def recording(s, filled, track_rss=True):
        order.append((filled.row.cache, filled.row.context))
        real(s, filled, track_rss)

    monkeypatch.setattr(decode, "time_repeat", recording)
    given = {"caches": ["static", "density-25", "window-only"], "interleave": True, "bandwidth_mib": 8,
             "contexts": [64, 96], "batch_sizes": [1], "repeats": 2}
    result = decode.run_decode(common.settings_from(decode.DecodeSettings, given, decode.QUICK_DECODE), progress=False)
    caches = ["static", "density-25", "window-only"]
    assert order == [(c, ctx) for ctx in (64, 96) for _ in range(2) for c in caches]
    rows = result["rows"]
    assert [(r["cache"], r["context"]) for r in rows] == [(c, ctx) for ctx in (64, 96) for c in caches]
    assert all(r["status"] == "ok" and len(r["step_ms_repeat_means"]) == 2 for r in rows)
    assert all(r["ideal_ms"] > 0 for r in rows if r["cache"] == "density-25")
    assert any("interleave" in note for note in result["notes"])


def test_decode_interleave_bounds_the_group_memory():
    """Both full caches fit --max-kv-gib alone, not together: the second of the group is skipped."""
    s = common.settings_from(decode.DecodeSettings, {"caches": ["static", "dynamic"], "interleave": True, "bandwidth_mib": 8,
                                                     "contexts": [64], "batch_sizes": [1]}, decode.QUICK_DECODE)
    pool = common.ModelPool(s.model, common.DTYPES[s.dtype], s.window, None, None)
    one = decode.expected_kv_bytes(s, decode.parse_cache("static"), pool.get("base"), 64, 1)
    s.max_kv_gib = 1.5 * one / 2**30
    static, dynamic = decode.run_decode(s, progress=False)["rows"]
    assert static["status"] == "ok"
    assert dynamic["status"].startswith("skipped: memory (the interleaved group") and dynamic["step_ms"] is None


def test_prefill_quick(tmp_path):
    main(["bench", "prefill", "--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "prefill.json").read_text())
    assert (tmp_path / "prefill.md").stat().st_size > 0
    rows = result["rows"]
    assert len(rows) == len(prefill.QUICK_PREFILL["contexts"]) * len(prefill.PREFILL_CONFIGS)
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for r in rows:
        assert r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["time_vs_dynamic"] > 0
        assert len(r["seconds_repeats"]) == prefill.QUICK_PREFILL["repeats"]
    for r in rows:
        if r["config"] == "spkv-keep-all":
            assert r["density"] == 1.0
        if r["config"] != "predictors-only":
            assert r["kv_bytes_held"] > 0
    assert len(result["overhead"]) == len(prefill.QUICK_PREFILL["contexts"])
    assert all(o["keep_all_overhead"] is not None and o["predictors_fraction"] > 0 for o in result["overhead"])


def test_prefill_configs_time_only_the_rows_asked_for(tmp_path):
    main(["bench", "prefill", "--quick", "--contexts", "64", "--configs", "dynamic", "predictors-only", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "prefill.json").read_text())
    assert [r["config"] for r in result["rows"]] == ["dynamic", "predictors-only"]
    assert result["overhead"][0]["keep_all_overhead"] is None and result["overhead"][0]["predictors_fraction"] > 0
    for bad in (["spkv"], ["dynamic", "sdpa"]):
        with pytest.raises(SystemExit, match="choose from"):
            main(["bench", "prefill", "--quick", "--configs", *bad, "--out", str(tmp_path)])


def test_prefill_of_an_lkv_adapter_reports_its_scorer_and_its_bytes_against_the_budget(tmp_path):
    """LKV rows: keep-all is budget 1 (density 1), the scorers time alone, and the bytes in use stay
    within what the budget allows plus E = exit_every pairs per head (the cut's slack)."""
    import spkv
    from spkv.config import LKVConfig, SPKVConfig
    from spkv.lkv import scorers

    from .tiny_models import save_tiny_pretrained

    path = save_tiny_pretrained(tmp_path / "model")
    model, _ = spkv.load_model(str(path))
    spkv.convert(model, SPKVConfig(window=16, predictor_hidden=16, lkv=LKVConfig(budget=0.25, exit_every=8)))
    with torch.no_grad():
        for s in scorers(model).values():
            s.budget_logits.normal_()
    spkv.save_adapter(model, tmp_path / "lkv")
    main(["bench", "prefill", "--model", str(path), "--adapter", str(tmp_path / "lkv"), "--contexts", "300",
          "--prefill-chunk", "64", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "out")])
    rows = {r["config"]: r for r in json.loads((tmp_path / "out" / "prefill.json").read_text())["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), {c: r["status"] for c, r in rows.items()}
    assert rows["spkv-keep-all"]["density"] == 1.0 and rows["predictors-only"]["seconds"] > 0
    lkv = rows["spkv"]
    assert lkv["density"] == pytest.approx(0.25, abs=0.05) and "LKV" in lkv["note"]
    assert lkv["held_over_budget"] == pytest.approx(lkv["kv_bytes_held"] / lkv["kv_bytes_budget"])
    model = spkv.load_adapter(spkv.load_model(str(path))[0], tmp_path / "lkv")
    cache = spkv.SPKVCache(model)
    common.chunked_prefill(model, cache, torch.randint(2, 60, (1, 300)), 64)
    kv = common.kv_bytes(cache)
    layers = cache.spkv_layers()
    slack = sum(8 * x.num_kv_heads * x.bytes_per_pair for x in layers)
    assert kv["budget"] <= kv["read"] + slack and kv["read"] <= kv["budget"] + slack
    assert kv["held"] >= kv["read"]


@pytest.mark.parametrize("name", ["dynamic", "static", "density-25"])
def test_synthetic_fill_matches_model_fill(name):
    """Same bytes (and, for a forced density, the same kept set: RandomPolicy draws in the same
    order) as a model fill, and decoding continues at the right position."""
    context, batch, chunk, steps = 100, 2, 32, 3
    pool = common.ModelPool(common.TINY, torch.float32, window=16, adapter=None)
    spec = decode.parse_cache(name)
    model = pool.get(spec.variant)
    ids, _ = pool.prompt(context, batch)
    caches = {}
    for fill in ("model", "synthetic"):
        cache = decode.make_cache(spec, model, context + steps)
        token = decode.fill_cache(model, cache, fill, ids if fill == "model" else None, batch, context, chunk)
        assert token.shape == (batch, 1)
        assert int(cache.get_seq_length()) == context
        (times,), _ = decode.time_decode(model, cache, token, warmup=0, steps=steps, repeats=1)
        assert len(times) == steps
        assert int(cache.get_seq_length()) == context + steps
        caches[fill] = cache
    model_kv, synthetic_kv = common.kv_bytes(caches["model"]), common.kv_bytes(caches["synthetic"])
    assert synthetic_kv == model_kv
    for a, b in zip(caches["model"].layers, caches["synthetic"].layers):
        if isinstance(a, SPKVLayer):
            assert torch.equal(a.store_lengths(), b.store_lengths()) and a.recent.size == b.recent.size and a.seen == b.seen
        else:
            assert a.keys.shape == b.keys.shape and a.keys.dtype == b.keys.dtype
    if name == "density-25":
        assert abs(synthetic_kv["density"] - 0.25) < 0.1
        assert caches["synthetic"].tokens_seen == context + steps and caches["synthetic"].num_sequences == batch


def test_decode_times_an_exported_hybrid_against_its_proportional_cost(tmp_path):
    """hybrid-export: the plain transformers model of `spkv hybrid export` with its own StaticCache,
    whose sliding layers hold only the window, next to static and window-only in the same run."""
    from spkv import hybrid

    model = common.build_tiny_model()
    layers = list(range(model.config.num_hidden_layers))
    heads = model.config.num_key_value_heads
    layout = hybrid.design([[1.0] * heads if i % 2 else [0.0] * heads for i in layers], layers, 0.5, "learned-layer", window=16)
    export = hybrid.export(hybrid.apply_layout(model, layout), layout, tmp_path / "export")
    given = {"caches": ["static", "window-only", "hybrid-export", "export-sliding"], "hybrid_export": str(export), "bandwidth_mib": 8,
             "contexts": [160], "batch_sizes": [1]}
    result = decode.run_decode(common.settings_from(decode.DecodeSettings, given, decode.QUICK_DECODE), progress=False)
    rows = {r["cache"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), [r["status"] for r in rows.values()]
    extra = decode.QUICK_DECODE["warmup"] + decode.QUICK_DECODE["steps"] * decode.QUICK_DECODE["repeats"]
    per_layer = rows["static"]["kv_bytes_held"] / (len(layers) * (160 + extra))  # bytes per token per layer
    half = len(layers) // 2  # global layers hold the whole run, sliding ones the window
    assert rows["hybrid-export"]["kv_bytes_held"] == pytest.approx(per_layer * half * (160 + extra + 16))
    cost = rows["hybrid-export"]
    assert cost["kv_share"] == 0.5
    assert rows["export-sliding"]["kv_bytes_held"] == pytest.approx(per_layer * len(layers) * 16)  # every layer its window
    sliding = rows["export-sliding"]["step_ms"]  # the like-for-like share-0 end
    assert cost["ideal_ms"] == pytest.approx(sliding + 0.5 * (rows["static"]["step_ms"] - sliding))
    assert cost["measured_over_ideal"] == pytest.approx(cost["step_ms"] / cost["ideal_ms"])
    assert "measured/ideal" in decode_markdown({**result, "provenance": {}})
    skipped = decode.run_decode(common.settings_from(decode.DecodeSettings, {**given, "hybrid_export": None, "caches": ["hybrid-export"]},
                                                     decode.QUICK_DECODE), progress=False)
    assert skipped["rows"][0]["status"] == "skipped: no --hybrid-export" and skipped["rows"][0]["ideal_ms"] is None

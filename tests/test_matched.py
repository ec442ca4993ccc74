"""Matched-density comparison, the KVzap surrogate, Expected Attention and the density analysis."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from spkv import SPKVConfig, convert, save_adapter
from spkv import load_adapter as spkv_load
from spkv.cache import SPKVCache
from spkv.cli import main
from spkv.compat import cache_kwarg
from spkv.data.heldout import HeldoutSet, heldout_set
from spkv.eval.analysis import analyze, fit_line, kept_counted
from spkv.eval.kvzap import (
    fit_kvzap,
    importance_target,
    installed,
    load_regressors,
    regressors_metadata,
    save_regressors,
)
from spkv.eval.matched import MatchSettings, calibrate, decides_late
from spkv.eval.nll import nll_full_sequence, nll_with_policy
from spkv.models import load_model
from spkv.policies import H2O, ExpectedAttention, KeyNorm, KVzap
from spkv.stats import cache_stats

from .tiny_models import VOCAB, save_tiny_pretrained, tiny_model


def _data(n: int = 3, length: int = 320, seed: int = 0) -> HeldoutSet:
    g = torch.Generator().manual_seed(seed)
    return HeldoutSet(torch.randint(3, VOCAB, (n, length), generator=g), [f"d{i}" for i in range(n)], ["rand"] * n)


@pytest.fixture(scope="module")
def control():
    model = convert(tiny_model("llama"), SPKVConfig(window=32, threshold=0.0)).eval()
    return model


@pytest.mark.parametrize("policy_cls", [KeyNorm, H2O, ExpectedAttention])
def test_calibration_reaches_target_density(control, policy_cls):
    data = _data(2)
    settings = MatchSettings(tolerance=0.02, chunk=16, exact_chunk=64, max_iterations=8)
    chunk = settings.chunk if decides_late(policy_cls) else settings.exact_chunk
    settings.chunk = chunk
    calib = calibrate(control, data, lambda t: policy_cls(threshold=t), 0.3, settings)
    assert abs(calib.density - 0.3) <= 0.02, calib.history
    # the reported density is the cache's own count at that threshold, not the guess
    measured = nll_with_policy(control, data, policy_cls(threshold=calib.threshold), sinks=4, chunk=chunk).density
    assert measured == pytest.approx(calib.density)


def test_importance_target_is_max_attention_beyond_window():
    t, window = 6, 2
    w = torch.zeros(1, 2, t, t)  # two query heads, one KV head
    w[0, 0, 5, 1] = 0.7  # query 5 sees key 1 from 4 positions away: counts
    w[0, 1, 2, 1] = 0.9  # query 2 sees key 1 inside the window: does not count
    target, rows = importance_target(w, num_kv_heads=1, window=window)
    assert target[0, 1, 0] == pytest.approx(math.log(0.7 + 1e-6))
    assert rows.tolist() == [True, True, True, True, False, False]  # keys 4, 5: no query beyond the window


def test_kvzap_fit_install_and_roundtrip(control, tmp_path):
    regressors = fit_kvzap(control, _data(2, 128).input_ids, window=32)
    predictor_before = dict(control.model.layers[0].self_attn.named_modules())["spkv_predictor"]
    with installed(control, regressors):
        assert control.model.layers[0].self_attn.spkv_predictor is regressors[0]
        r = nll_with_policy(control, _data(1), KVzap(threshold=-3.0), chunk=64)
        assert 0.0 <= r.density <= 1.0
    assert control.model.layers[0].self_attn.spkv_predictor is predictor_before
    save_regressors(regressors, tmp_path / "kvzap.safetensors", {"seed": 0})
    loaded = load_regressors(tmp_path / "kvzap.safetensors")
    x = torch.randn(1, 5, control.config.hidden_size)
    assert torch.equal(loaded[1](x), regressors[1](x))
    with pytest.raises(RuntimeError, match="kvzap"):
        KVzap(threshold=0.0).score_new(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), None)


def test_kvzap_fit_is_reused_only_for_the_same_control(control, tmp_path, monkeypatch):
    """A saved surrogate fitted on another control (same folder, new weights) is fitted again."""
    import spkv.eval.kvzap
    from spkv.eval.matched import _kvzap_row

    fits = []
    real_fit = spkv.eval.kvzap.fit_kvzap
    monkeypatch.setattr(spkv.eval.kvzap, "fit_kvzap", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    data, train = _data(1, 256), _data(2, 128).input_ids
    settings = MatchSettings(tolerance=0.05, chunk=64, exact_chunk=64, max_iterations=4)
    for digest, fitted in (("aa", 1), ("aa", 1), ("bb", 2)):
        _kvzap_row(control, data, 0.3, settings, tmp_path, train, digest)
        assert len(fits) == fitted and regressors_metadata(tmp_path / "kvzap_regressors.safetensors")["control_sha256"] == digest


def test_expected_attention_matches_gaussian_expectation():
    torch.manual_seed(0)
    d, r = 8, 5
    queries = torch.randn(1, 1, 1, 4000, d) * 0.5 + 0.3  # [B, Hkv, G, Q, D]
    keys, values = torch.randn(1, 1, r, d), torch.ones(1, 1, r, d)
    scaling = 0.5
    scores = ExpectedAttention(epsilon=0.0).observe_queries(torch.zeros(1, 1, r), keys, values, queries, scaling)
    # Monte Carlo: mean over the queries of exp(s q.k), normalised over the keys, times ||v||
    mc = torch.exp(scaling * queries[0, 0, 0] @ keys[0, 0].T).mean(0)
    expected = mc / mc.sum() * math.sqrt(d)
    assert torch.allclose(scores[0, 0], expected, rtol=0.05)


def test_expected_attention_through_the_cache_is_exact_token_by_token(control):
    """Chunk 1 through the cache decides with exactly the last `window` queries (checked by replay)."""
    ids = _data(1, 100).input_ids
    cache = SPKVCache(control, policy=ExpectedAttention(threshold=0.02), sinks=0)
    with torch.no_grad():
        for s in range(ids.shape[1]):
            control(input_ids=ids[:, s : s + 1], **cache_kwarg(cache))
    layer = cache.spkv_layers()[0]
    assert layer.recent_q.shape[3] == control.spkv_config.window
    stats = cache_stats(cache)
    assert int(stats.decided.sum()) > 0 and 0 < stats.density < 1


def test_fit_line_and_analyze(control):
    fit = fit_line([1, 2, 3, 4], [3, 5, 7, 9])
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1) and fit["r2"] == pytest.approx(1)
    model = convert(tiny_model("llama", seed=1), SPKVConfig(window=32, threshold=0.5)).eval()
    for p in model.model.layers[0].self_attn.spkv_predictor.parameters():
        torch.nn.init.normal_(p, std=1.0)  # some gates below tau
    data = _data(2, 200)
    docs = [(doc_id, row.tolist()) for doc_id, row in zip(data.doc_ids, data.input_ids)]
    result = analyze(model, docs)
    reference = nll_full_sequence(model, data)
    assert [d["density"] for d in result["documents"]] == pytest.approx(reference.density_per_sequence)
    assert torch.allclose(torch.tensor(result["density_per_layer_head"]), torch.tensor(reference.density_per_layer_head))
    assert 0 < result["density"] < 1


@pytest.mark.slow  # ~75 s on 2 cores
def test_eval_matched_and_analyze_cli(tmp_path, monkeypatch):
    """The quick end-to-end run CI does: tiny model, SP-KV and control adapters, every baseline."""
    path = save_tiny_pretrained(tmp_path / "model", words=60)
    model, tokenizer = load_model(str(path))
    convert(model, SPKVConfig(window=32, threshold=0.5))
    for p in model.model.layers[1].self_attn.spkv_predictor.parameters():
        torch.nn.init.normal_(p, std=1.0)
    save_adapter(model, tmp_path / "spkv")
    ctrl, _ = load_model(str(path))
    save_adapter(convert(ctrl, SPKVConfig(window=32, threshold=0.0)), tmp_path / "control")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("heldout", 3)):
        docs = [{"id": f"{split}{i}", "source": "words", "text": " ".join(f"w{int(j)}" for j in torch.randint(0, 60, (300 + 50 * i,), generator=g))}
                for i in range(n)]
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    monkeypatch.setenv("SPKV_CORPUS", str(corpus))
    out = tmp_path / "eval"
    main(["eval", "matched", "--model", str(path), "--adapter", str(tmp_path / "spkv"), "--control", str(tmp_path / "control"),
          "--seq-len", "256", "--sequences", "2", "--calibration-sequences", "1", "--chunk", "16", "--kvzap-sequences", "2",
          "--kvzap-seq-len", "128", "--out", str(out)])
    result = json.loads((out / "matched.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert {"base model", "dense control", "SP-KV", "streaming", "h2o", "tova", "key_norm", "expected_attention", "kvzap", "random"} <= set(rows)
    target = rows["SP-KV"]["density"]
    assert 0 < target < 1
    for m in ("h2o", "tova", "key_norm", "expected_attention", "kvzap", "random"):
        assert abs(rows[m]["density"] - target) <= 0.01 + 1e-9, (m, rows[m]["calibration"])
    assert "exactness" in rows["h2o"] and "exactness" not in rows["key_norm"]
    assert rows["dense control"]["dnll_pct"] == 0.0
    assert (out / "matched.md").exists() and (out / "quality_vs_density.png").exists()
    assert not (out / "matched.partial.json").exists()
    digest = hashlib.sha256(b"".join((tmp_path / "control" / f).read_bytes() for f in ("adapter_config.json", "adapter.safetensors"))).hexdigest()
    assert regressors_metadata(out / "kvzap_regressors.safetensors")["control_sha256"] == digest
    main(["analyze", "--model", str(path), "--adapter", str(tmp_path / "spkv"), "--documents", "3", "--min-len", "100",
          "--out", str(tmp_path / "analysis")])
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert len(analysis["documents"]) == 3 and (tmp_path / "analysis" / "density_heatmap.png").exists()


def test_frozen_llm_table_runs_the_baselines_on_the_base_model(tmp_path, monkeypatch):
    """--control base: no control row, dNLL% against the base model, and a baseline row is that
    baseline run on the untouched base model (rerun here at its calibrated threshold)."""
    path = _learned_adapters(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(1)
    docs = [{"id": f"h{i}", "source": "words", "text": " ".join(f"w{int(j)}" for j in torch.randint(0, 60, (320,), generator=g))}
            for i in range(2)]
    for split in ("train", "heldout"):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    monkeypatch.setenv("SPKV_CORPUS", str(corpus))
    out = tmp_path / "frozen"
    main(["eval", "matched", "--model", str(path), "--adapter", str(tmp_path / "gate"), "--control", "base",
          "--seq-len", "256", "--sequences", "2", "--calibration-sequences", "1", "--methods", "key_norm",
          "--exactness-sequences", "0", "--learned", f"lkv={tmp_path / 'lkv'}", "--out", str(out)])
    result = json.loads((out / "matched.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"base model", "SP-KV", "key_norm", "lkv"} and result["control"] is None
    assert rows["base model"]["dnll_pct"] == 0.0 and rows["lkv"]["dnll_pct"] == pytest.approx(rows["lkv"]["dnll_pct_vs_base"])
    model, tokenizer = load_model(str(path))
    convert(model, SPKVConfig(window=32))
    data = heldout_set(tokenizer, seq_len=256, max_sequences=2)
    again = nll_with_policy(model, data, KeyNorm(threshold=rows["key_norm"]["threshold"]), sinks=4, chunk=256)
    assert again.nll == pytest.approx(rows["key_norm"]["nll"], rel=1e-5) and again.density == pytest.approx(rows["key_norm"]["density"])
    assert "against the untouched base model" in (out / "matched.md").read_text()


def _learned_adapters(tmp_path):
    """A tiny checkpoint with an SP-KV gate (spread logits) and an LKV adapter (spread budgets) on it."""
    from spkv.config import LKVConfig
    from spkv.lkv import scorers

    path = save_tiny_pretrained(tmp_path / "model", words=60)
    gate, _ = load_model(str(path))
    convert(gate, SPKVConfig(window=32, threshold=0.5))
    for layer in gate.model.layers:  # gate logits spread around 0, so any density is reachable
        predictor = layer.self_attn.spkv_predictor
        torch.nn.init.normal_(predictor.fc1.weight, std=0.5)
        torch.nn.init.normal_(predictor.fc2.weight, std=0.5)
        torch.nn.init.zeros_(predictor.fc2.bias)
    save_adapter(gate, tmp_path / "gate")
    lkv, _ = load_model(str(path))
    convert(lkv, SPKVConfig(window=32, predictor_hidden=16, lkv=LKVConfig(budget=0.4, exit_every=4)))
    with torch.no_grad():
        for s in scorers(lkv).values():
            s.budget_logits.normal_()
    save_adapter(lkv, tmp_path / "lkv")
    return path


def test_learned_rows_reach_the_target_density_through_the_cache(tmp_path):
    from spkv.eval.matched import learned_row
    from spkv.policies import SPKVPolicy

    path = _learned_adapters(tmp_path)
    data = _data(2, 300)
    data.input_ids = data.input_ids % 60 + 2  # the tiny tokenizer's ids
    settings = MatchSettings(tolerance=0.02, calibration_sequences=1, exact_chunk=64, max_iterations=8)
    gate = learned_row(str(path), "gate", tmp_path / "gate", data, 0.25, settings)
    assert gate["knob"] == "tau" and abs(gate["density"] - 0.25) <= 0.02, gate["calibration"]
    model, _ = load_model(str(path))
    spkv_load(model, tmp_path / "gate")
    again = nll_with_policy(model, data, SPKVPolicy(threshold=gate["threshold"]), sinks=0, chunk=64)
    assert again.density == pytest.approx(gate["density"]) and again.nll == pytest.approx(gate["nll"])
    lkv = learned_row(str(path), "lkv", tmp_path / "lkv", data, 0.25, settings)
    assert lkv["knob"] == "r" and abs(lkv["density"] - 0.25) <= 0.02, lkv["calibration"]
    assert lkv["threshold"] != 0.4  # the trained r (0.4) keeps ~40%: it was moved
    files = (tmp_path / "lkv" / "adapter_config.json").read_bytes() + (tmp_path / "lkv" / "adapter.safetensors").read_bytes()
    assert lkv["adapter_sha256"] == hashlib.sha256(files).hexdigest()


def test_compare_reuses_finished_rows_and_reruns_a_retrained_learned_adapter(tmp_path, monkeypatch):
    import spkv.eval.matched as matched

    path = _learned_adapters(tmp_path)
    data = _data(1, 100)
    done = {m: {"method": m, "threshold": None, "nll": 2.0, "nll_per_sequence": [2.0], "density": 0.3}
            for m in ("base model", "SP-KV", "dense control")}
    done["lkv"] = {**done["SP-KV"], "method": "lkv", "adapter_sha256": "an older adapter"}
    done["gate"] = {**done["SP-KV"], "method": "gate", "adapter_sha256": matched.adapter_digest(tmp_path / "gate")}
    ran = []
    monkeypatch.setattr(matched, "learned_row", lambda model, label, *a: ran.append(label) or {**done["SP-KV"], "method": label})
    result = matched.compare(str(path), "unused", str(tmp_path / "gate"), 0.5, [], data, MatchSettings(), tmp_path,
                             done=done, learned={"gate": str(tmp_path / "gate"), "lkv": str(tmp_path / "lkv")})
    assert ran == ["lkv"]  # only the retrained one runs again; base, SP-KV and control are reused
    assert [r["method"] for r in result["rows"]] == ["base model", "SP-KV", "dense control", "gate", "lkv"]


def test_analyze_an_lkv_model_measures_its_cache_and_maps_its_budgets(tmp_path):
    from spkv.config import LKVConfig
    from spkv.eval.analysis import plot_analysis
    from spkv.lkv import scorers
    from spkv.policies import LKVPolicy

    model = convert(tiny_model("llama", seed=2), SPKVConfig(window=32, predictor_hidden=16, lkv=LKVConfig(budget=0.3, exit_every=4))).eval()
    with torch.no_grad():
        for s in scorers(model).values():
            s.budget_logits.normal_()
    data = _data(2, 700)  # longer than analyze's prefill chunk (512): two chunks, compared with one prefill
    result = analyze(model, [(d, row.tolist()) for d, row in zip(data.doc_ids, data.input_ids)])
    reference = nll_with_policy(model, data, LKVPolicy(), sinks=0, chunk=1000)  # one prefill per document
    assert torch.allclose(torch.tensor(result["density_per_layer_head"]), torch.tensor(reference.density_per_layer_head).float())
    ids = data.input_ids[:1]
    small, whole = kept_counted(model, ids, chunk=37), kept_counted(model, ids, chunk=1000)
    assert torch.equal(small[0], whole[0]) and torch.equal(small[1], whole[1])
    shares = torch.tensor(result["shares_per_layer_head"])
    assert shares.mean().item() == pytest.approx(0.3, abs=1e-4) and shares.std() > 0.01
    # a head keeps about its share of what left its window (within E = 4 pairs of slack per head)
    assert torch.allclose(torch.tensor(result["density_per_layer_head"]), shares, atol=0.06)
    result.update(model="tiny", adapter="lkv")
    beside = {"adapter": "runs/spkv", "density_per_layer_head": result["density_per_layer_head"]}
    paths = plot_analysis(result, tmp_path, beside)
    assert all(p.exists() for p in paths)
    # --beside: rank correlation of the maps (itself: 1) and of its learned budgets with the other map
    from spkv.eval.analysis import analysis_markdown, compare_beside

    result["beside"] = compare_beside(result, beside, "runs/spkv/analysis.json")
    assert result["beside"]["spearman_density"] == pytest.approx(1.0)
    assert -1 <= result["beside"]["spearman_shares"] <= 1
    assert "Spearman rank correlation +1.00 (density)" in analysis_markdown(result)


def test_spearman_matches_pearson_of_mean_ranks_by_hand():
    from spkv.eval.stats import spearman

    a, b = [[0.1, 0.5], [0.5, 0.9], [0.2, 0.0]], [[3.0, 1.0], [2.0, 2.0], [5.0, 0.5]]
    # ranks by hand: a -> 1, 3.5, 3.5, 5, 2, 0; b -> 4, 1, 2.5, 2.5, 5, 0
    ra, rb = torch.tensor([1, 3.5, 3.5, 5, 2, 0]), torch.tensor([4, 1, 2.5, 2.5, 5, 0])
    expected = torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()
    assert spearman(a, b) == pytest.approx(expected)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, [[-x for x in r] for r in a]) == pytest.approx(-1.0)


def test_matched_cli_reuses_only_tables_of_the_same_inputs_and_checks_learned_labels(tmp_path, capsys):
    from spkv.cli.eval import _learned_args, _reusable_rows, _same_table

    head = {"model": "m", "adapter": "a", "adapter_sha256": "x", "tau": 0.5, "seq_len": 2048, "doc_ids": ["d0"]}
    older = {k: v for k, v in head.items() if k != "adapter_sha256"}  # written before the digests were recorded
    retrained = {**head, "adapter_sha256": "y"}
    other_len = {**head, "seq_len": 1024}
    assert _same_table([retrained, other_len, older, head], head, tmp_path) == [older, head]
    assert "adapter_sha256" in capsys.readouterr().err
    # a run stopped after a finished one: its partial rows win, the finished run's others are kept
    partial = {**head, "rows": [{"method": "h2o", "nll": 1.0}]}
    final = {**head, "rows": [{"method": "h2o", "nll": 2.0}, {"method": "lkv", "nll": 3.0}]}
    assert _reusable_rows([partial, final, {**retrained, "rows": [{"method": "x"}]}], head, tmp_path) == {
        "h2o": {"method": "h2o", "nll": 1.0}, "lkv": {"method": "lkv", "nll": 3.0}}
    (tmp_path / "lkv").mkdir()
    (tmp_path / "lkv" / "adapter_config.json").write_text("{}")
    assert _learned_args([f"LKV frozen={tmp_path / 'lkv'}"], ["h2o"]) == {"LKV frozen": str(tmp_path / "lkv")}
    for items, message in (([f"SP-KV={tmp_path / 'lkv'}"], "already a row"), ([f"h2o={tmp_path / 'lkv'}"], "already a row"),
                           ([f"a={tmp_path / 'lkv'}", f"a={tmp_path / 'lkv'}"], "already a row"),
                           (["no-folder"], "LABEL=ADAPTER"), ([f"a={tmp_path}"], "no adapter_config.json")):
        with pytest.raises(SystemExit, match=message):
            _learned_args(items, ["h2o"])

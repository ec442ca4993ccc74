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
    spread = hybrid.design([[0.0]] * 30, list(range(30)), 0.3, "interleave")  # 9 of 30 layers, evenly spaced
    assert [i for i, row in enumerate(spread.units) if row[0]] == [2, 6, 9, 12, 16, 19, 22, 26, 29]
    probe = hybrid.design(DENSITY, layers, 0.5, "probe-layer")  # the probe's scores rank like the density
    assert probe.units == layer.units and probe.design == "probe-layer"
    rand = [hybrid.design(DENSITY, layers, 0.5, "random-head", seed=s) for s in range(3)]
    assert all(r.global_share == 0.5 for r in rand) and len({str(r.units) for r in rand}) > 1
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            hybrid.design(DENSITY, layers, bad)


def test_probe_measures_attention_beyond_the_window_by_brute_force():
    """probe_attention equals the mass computed from the eager attention probabilities by hand."""
    model = tiny_model("llama", num_hidden_layers=2)
    ids, window = _ids(24), 5
    layers, mass = hybrid.probe_attention(model, ids, window)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(input_ids=ids, output_attentions=True, use_cache=False).attentions  # per layer [1, H, T, T]
    expected = []
    for p in probs:
        t = p.shape[-1]
        per_query = [[float(p[0, h, q, : q - window + 1].sum()) for q in range(window, t)] for h in range(p.shape[1])]
        per_head = [sum(row) / len(row) for row in per_query]
        group = len(per_head) // 2  # 4 query heads, 2 KV heads
        expected.append([sum(per_head[k * group : (k + 1) * group]) / group for k in range(2)])
    assert layers == [0, 1]
    assert torch.allclose(torch.tensor(mass), torch.tensor(expected), atol=1e-5)
    gemma_layers, gemma_mass = hybrid.probe_attention(tiny_model("gemma3"), _ids(24), window)
    assert gemma_layers == [3] and len(gemma_mass[0]) == 2  # the full-attention layer only
    with pytest.raises(ValueError, match="longer than the window"):
        hybrid.probe_attention(model, ids[:, :4], window)


def test_sinks_stay_visible_in_local_units():
    model = tiny_model("llama", num_hidden_layers=4)
    layout = hybrid.design(DENSITY, [0, 1, 2, 3], 0.25, "learned-head", window=4, sinks=2)
    hybrid.apply_layout(model, layout)
    ids = _ids(30)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = spkv.SPKVCache(model)
        parts = [model(input_ids=ids[:, t : t + 1], **cache_kwarg(cache)).logits for t in range(ids.shape[1])]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert model.spkv_config.sinks == 2
    with pytest.raises(ValueError, match="sink"):
        hybrid.export_config(model.config, layout)


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


def test_a_hybrid_trains_with_the_control_recipe_and_its_adapter_runs_the_layout(tiny_pretrained, tmp_path):
    """--hybrid-layout: the LLM trains, the layout's constant predictors do not move, LoRA starts as the
    control's does, and the exported adapter runs the same hybrid in a fresh model."""
    from spkv.train.config import TrainConfig
    from spkv.train.loop import build_model, train

    model_dir = tiny_pretrained()
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (3000,), generator=torch.Generator().manual_seed(0))))
    layout = hybrid.design([[0.9, 0.1], [0.2, 0.3]], [0, 1], 0.5, "learned-head", model=str(model_dir), window=4)
    (tmp_path / "layout.json").write_text(layout.to_json())
    common = dict(model=str(model_dir), data=[str(text)], seq_len=32, batch_size=2, max_tokens=4 * 2 * 32, window=4,
                  warmup_steps=1, bf16=False, checkpoint_every=2, train_llm="lora", lora_rank=4, lr=1e-3)
    cfg = TrainConfig(**common, out=str(tmp_path / "hybrid"), hybrid_layout=str(tmp_path / "layout.json"))
    hyb, _, _, _ = build_model(cfg)
    control, _, _, _ = build_model(TrainConfig(**common, out=str(tmp_path / "control"), control=True))
    lora = {k: v for k, v in control.state_dict().items() if "lora_" in k}
    assert lora and all(torch.equal(hyb.state_dict()[k], v) for k, v in lora.items())
    before = {k: v.clone() for k, v in hyb.state_dict().items() if "spkv_predictor" in k}
    adapter = train(cfg)
    after = torch.load(tmp_path / "hybrid" / "checkpoint.pt", weights_only=False)["model"]
    assert before and all(torch.equal(after[k], v) for k, v in before.items())
    assert any("lora_" in k for k in after)
    fresh, _ = spkv.load_model(str(model_dir))
    spkv.load_adapter(fresh, adapter)
    ids = torch.randint(3, 60, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = spkv.SPKVCache(fresh)
        fresh(input_ids=ids, **cache_kwarg(cache))
    assert torch.equal(spkv.cache_stats(cache).density_per_head == 1.0, torch.tensor(layout.units))
    from spkv.eval.hybrids import trained_layout

    (tmp_path / "layout.json").rename(tmp_path / "moved.json")  # the adapter keeps its own copy of the layout
    assert trained_layout(adapter) == layout
    (tmp_path / "moved.json").rename(tmp_path / "layout.json")
    with pytest.raises(ValueError, match="window"):
        build_model(TrainConfig(**{**common, "window": 8}, out=str(tmp_path / "w"), hybrid_layout=str(tmp_path / "layout.json")))
    with pytest.raises(ValueError, match="fixed layout"):
        TrainConfig(**common, out=str(tmp_path / "c"), control=True, hybrid_layout=str(tmp_path / "layout.json"))


def test_compare_at_equal_memory_measures_every_row_and_resumes(tiny_pretrained, tmp_path):
    """spkv hybrid compare: the control is the reference, a post-hoc row is the layout on the control's
    weights (its NLL equals a token-by-token decode through the compact cache), its budget is measured,
    a trained hybrid is found by its adapter, and an interrupted comparison keeps its finished rows."""
    import json
    import random

    import torch.nn.functional as F

    from spkv.cli import main
    from spkv.train.config import TrainConfig
    from spkv.train.loop import train

    from .tiny_models import randomize_gates

    model_dir, words = tiny_pretrained(), 60
    control_model, _ = spkv.load_model(str(model_dir))
    spkv.convert(control_model, spkv.SPKVConfig(window=4, threshold=0.0))
    control = spkv.save_adapter(control_model, tmp_path / "control")
    gated, _ = spkv.load_model(str(model_dir))
    spkv.convert(gated, spkv.SPKVConfig(window=4, threshold=0.5))
    randomize_gates(gated, seed=1)
    adapter = spkv.save_adapter(gated, tmp_path / "spkv")
    layout = hybrid.design([[0.9, 0.1], [0.2, 0.3]], [0, 1], 0.5, "learned-head", model=str(model_dir), window=4)
    (tmp_path / "layout.json").write_text(layout.to_json())
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"w{random.Random(0).randrange(words)}" for _ in range(3000)))
    trained = train(TrainConfig(model=str(model_dir), data=[str(text)], out=str(tmp_path / "run"), seq_len=32, batch_size=1,
                                max_tokens=2 * 32, window=4, warmup_steps=1, bf16=False, train_llm="lora", lora_rank=4,
                                hybrid_layout=str(tmp_path / "layout.json")))
    rng = random.Random(0)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"id": f"h{i}", "text": " ".join(f"w{rng.randrange(words)}" for _ in range(60))}) + "\n"
                               for i in range(2)))
    out = tmp_path / "out"
    argv = ["hybrid", "compare", "--model", str(model_dir), "--control", str(control), "--adapter", str(adapter), "--tau", "0.5",
            "--layouts", str(tmp_path / "layout.json"), "--trained", str(trained), "--seq-len", "40", "--sequences", "2",
            "--heldout", str(heldout), "--out", str(out)]
    main(argv)
    result = json.loads((out / "hybrids.json").read_text())
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["dense control", "SP-KV tau=0.5", "learned-head 0.5 post-hoc", "learned-head 0.5 trained"]
    control_row, _, posthoc, trained_row = result["rows"]
    assert control_row["dnll_pct_vs_control"] == 0.0 and control_row["density"] == 1.0
    assert posthoc["density"] == trained_row["density"] == 0.5  # measured: 2 of 4 units keep everything, 2 nothing
    model = hybrid.apply_layout(spkv.load_adapter(spkv.load_model(str(model_dir))[0], control), layout)
    tokenizer = spkv.load_model(str(model_dir))[1]
    for doc, expected in zip(heldout.read_text().splitlines(), posthoc["nll_per_sequence"]):
        ids = torch.tensor([tokenizer(json.loads(doc)["text"], add_special_tokens=False).input_ids[:40]])
        cache = spkv.SPKVCache(model)
        with torch.no_grad():
            logits = torch.cat([model(input_ids=ids[:, t : t + 1], **cache_kwarg(cache)).logits for t in range(40)], 1)
        assert F.cross_entropy(logits[0, :-1], ids[0, 1:]).item() == pytest.approx(expected, abs=1e-5)
    assert (out / "hybrids.md").read_text().count("post-hoc") >= 1 and (out / "hybrids.png").stat().st_size > 0
    # an interrupted run: the partial file's rows are kept as they are, the rest is measured
    partial = {**result, "rows": [{**r, "nll": r["nll"] + 1.0} if i == 1 else r for i, r in enumerate(result["rows"][:2])]}
    (out / "hybrids.partial.json").write_text(json.dumps(partial))
    main(argv)
    again = json.loads((out / "hybrids.json").read_text())["rows"]
    assert again[1]["nll"] == result["rows"][1]["nll"] + 1.0 and again[2]["nll"] == posthoc["nll"]
    assert not (out / "hybrids.partial.json").exists()
    # a finished run only adds rows; a row made with other weights (another --control) is measured again
    import shutil

    copy = shutil.copytree(control, tmp_path / "control-copy")
    final = json.loads((out / "hybrids.json").read_text())
    final["rows"][0]["nll"] += 1.0  # would survive if the control row were kept
    (out / "hybrids.json").write_text(json.dumps(final))
    main([*argv[:5], str(copy), *argv[6:]])
    third = json.loads((out / "hybrids.json").read_text())["rows"]
    assert third[0]["adapter"] == str(copy) and third[0]["nll"] == pytest.approx(control_row["nll"], abs=1e-6)
    assert third[1]["nll"] == again[1]["nll"]  # the SP-KV row (same adapter, same tau) was kept
    with pytest.raises(SystemExit, match="Two rows would be named"):
        main([*argv[:12], str(tmp_path / "layout.json"), *argv[12:]])  # the same layout twice
    other = hybrid.design([[0.5, 0.5]] * 2, [0, 1], 0.5, "learned-layer", model="another-model", window=4)
    (tmp_path / "other.json").write_text(other.to_json())
    with pytest.raises(SystemExit, match="designed for 'another-model'"):
        main([*argv[:11], str(tmp_path / "other.json"), *argv[12:]])

"""The RULER-style task suite: deterministic, fitted to token lengths, answers where they should be,
RULER's scoring, and a run through the real compressed cache on a tiny model (offline, seconds)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import spkv
from spkv.eval.stats import wilson_interval
from spkv.eval.tasks import prompts, report, runner
from spkv.methods import Method
from spkv.policies import RandomPolicy

from .tiny_models import randomize_gates, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOLERANCE = 24  # tokens: one haystack unit (a sentence, a word, or one cwe word's occurrences)


@lru_cache(maxsize=1)
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in milliseconds on the suite's own vocabulary: round-trips every
    prompt exactly and splits words and numbers into several tokens, like a real tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [" ".join(prompts.NOISE), " ".join(prompts.WORDS), "The special magic numbers VAR Question Answer"] * 3
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_bpe_model(path: Path) -> Path:
    """A loadable folder: tiny random Llama + the BPE tokenizer (for the CLI)."""
    tok = bpe_tokenizer()
    tok.save_pretrained(path)
    tiny_model("llama", vocab_size=len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2).save_pretrained(path)
    return path


def context(sample: prompts.Sample) -> str:
    return sample.prompt[sample.context_span[0] : sample.context_span[1]]


@pytest.mark.parametrize("task", prompts.TASKS)
def test_deterministic_per_seed_and_fitted_to_length(task):
    tok = bpe_tokenizer()
    a = prompts.make_sample(task, 1024, 0, tok, seed=7)
    assert a == prompts.make_sample(task, 1024, 0, tok, seed=7)
    assert a.prompt != prompts.make_sample(task, 1024, 0, tok, seed=8).prompt
    assert a.prompt != prompts.make_sample(task, 1024, 1, tok, seed=7).prompt
    for length in (512, 1024, 2048):
        s = prompts.make_sample(task, length, 0, tok, seed=7, max_new_tokens=16)
        budget = length - 16
        assert s.prompt_tokens == len(tok(s.prompt).input_ids)
        assert budget - TOLERANCE <= s.prompt_tokens <= budget, (length, s.prompt_tokens)
        assert tok.decode(tok(s.prompt).input_ids) == s.prompt
    assert a.max_new_tokens == prompts.TaskConfig().max_new_tokens[task]


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_needles_hold_the_answers_at_their_depths(task):
    s = prompts.make_sample(task, 2048, 3, bpe_tokenizer(), seed=1)
    ctx = context(s)
    expected = {"niah_single": (1, 1), "niah_multikey": (1, 4), "niah_multivalue": (4, 4), "niah_multiquery": (4, 4)}[task]
    assert (len(s.answers), len(s.needles)) == expected
    for needle, depth in zip(s.needles, s.depths):
        assert ctx.count(needle) == 1
        hay = ctx
        for other in s.needles:  # depth is a fraction of the haystack, other needles not counted
            hay = hay.replace(other, "") if other != needle else hay
        assert hay.index(needle) / (len(hay) - len(needle)) == pytest.approx(depth, abs=0.02)
    for answer in s.answers:
        assert ctx.count(answer) == 1  # in exactly one needle, never elsewhere
        assert any(answer in n for n in s.needles)
    keys = [re.search(r"for (\S+) is:", n).group(1) for n in s.needles if any(a in n for a in s.answers)]
    question = s.prompt[s.context_span[1] :]
    assert all(k in question for k in keys)
    if task == "niah_multikey":  # the distractors' keys are not asked
        others = [re.search(r"for (\S+) is:", n).group(1) for n in s.needles if not any(a in n for a in s.answers)]
        assert len(others) == 3 and not any(k in question for k in others)
    # base models get the singular prefix (the plural makes them count "1, 2, 3"); RULER's is an option
    assert s.prompt.endswith("mentioned in the provided text is")
    ruler_style = prompts.make_sample(task, 2048, 3, bpe_tokenizer(), seed=1, config=prompts.TaskConfig(answer_prefix="ruler"))
    assert ruler_style.prompt.endswith("mentioned in the provided text are") and ruler_style.answers == s.answers


def test_variable_tracking_chain_in_order():
    s = prompts.make_sample("vt", 2048, 0, bpe_tokenizer(), seed=2)
    ctx = context(s)
    positions = [ctx.index(n) for n in s.needles]
    assert positions == sorted(positions) and s.depths == sorted(s.depths)
    value = re.search(r"= (\d+)\.", s.needles[0]).group(1)
    assert s.answers == [re.match(r"VAR (\w+)", n).group(1) for n in s.needles]
    for prev, nxt in zip(s.answers, s.answers[1:]):
        assert f"VAR {nxt} = VAR {prev}." in ctx
    assert f"assigned the value {value}" in s.prompt[s.context_span[1] :]
    assert s.prompt.endswith("they are: VAR")  # the word each answer follows in the text
    with pytest.raises(ValueError, match="answer_prefix"):
        prompts.TaskConfig(answer_prefix="chat")


def test_common_and_frequent_words_are_the_most_frequent():
    tok = bpe_tokenizer()
    cwe = prompts.make_sample("cwe", 4096, 0, tok, seed=3)
    counts = Counter(re.findall(r"\d+\. (\S+)", context(cwe)))
    assert len(cwe.answers) == 10
    least_common = min(counts[a] for a in cwe.answers)
    assert least_common > max(c for w, c in counts.items() if w not in cwe.answers)
    assert len(counts) > 40
    fwe = prompts.make_sample("fwe", 4096, 0, tok, seed=3)
    top = [w for w, _ in Counter(context(fwe).split()).most_common(4)]
    assert top[0] == "...." and top[1:] == fwe.answers
    assert prompts.zipf_counts(50, 8, 2.0, 4)[:6] == sorted(set(prompts.zipf_counts(50, 8, 2.0, 4)[:6]), reverse=True)


def test_word_lists_never_hide_one_word_in_another():
    words = prompts.WORDS
    assert len(words) > 400
    assert not any(a != b and a in b for a in words for b in words)


def test_corpus_haystack(tmp_path):
    corpus = tmp_path / "heldout.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": f"Document {i} says alpha beta gamma delta. " * 40}) + "\n"
                              for i in range(5)))
    cfg = prompts.TaskConfig(haystack="corpus", corpus=str(corpus))
    s = prompts.make_sample("niah_single", 1024, 0, bpe_tokenizer(), config=cfg)
    assert "Document" in context(s) and s.needles[0] in context(s)
    assert 1024 - s.max_new_tokens - TOLERANCE <= s.prompt_tokens
    with pytest.raises(FileNotFoundError, match="spkv data"):
        prompts.make_sample("niah_single", 1024, 0, bpe_tokenizer(),
                          config=prompts.TaskConfig(haystack="corpus", corpus=str(tmp_path / "missing.jsonl")))


def test_string_match_scoring():
    answers = ["1234567", "7654321"]
    assert runner.string_match_all(" 1234567 and 7654321.", answers) == 1.0
    assert runner.string_match_all(" 1234567, then nothing", answers) == 0.5
    assert runner.string_match_all("no numbers", answers) == 0.0
    assert runner.string_match_all("The words: Apple, BANANA", ["apple", "banana", "cherry"]) == pytest.approx(2 / 3)
    rows = [{"task": "t", "length": 8, "score": s, "density": d, "prompt_tokens": 5} for s, d in [(1.0, 0.2), (0.5, None)]]
    assert report.summarize(rows) == [{"task": "t", "length": 8, "n": 2, "score": 0.75,
                                       "score_ci": list(wilson_interval(1.5, 2)), "density": 0.2, "prompt_tokens": 5}]


def test_too_short_a_length_says_so():
    with pytest.raises(ValueError, match="too short for task niah_single"):
        prompts.make_sample("niah_single", 64, 0, bpe_tokenizer())


def test_run_suite_through_the_compressed_cache():
    tok = bpe_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)
    spkv.convert(model, spkv.SPKVConfig(window=16, threshold=0.5))
    randomize_gates(model, seed=1)
    result = runner.run_suite(
        model, tok, lengths=[448, 1024], tasks=["niah_multikey", "vt", "fwe"], samples_per_cell=2, seed=0,
        make_cache=lambda: spkv.SPKVCache(model, policy=RandomPolicy(threshold=0.5), sinks=4),
        max_new_tokens=4, prefill_chunk=64,
    )
    assert result["lengths"] == [448] and result["skipped_lengths"] == [1024]  # beyond the model's 512 positions
    assert len(result["cells"]) == 3 and len(result["samples"]) == 6
    for cell in result["cells"]:
        assert 0.0 <= cell["score"] <= 1.0
        assert 0.35 < cell["density"] < 0.65  # random scores, threshold 0.5
    for row in result["samples"]:
        assert row["score"] == runner.string_match_all(row["prediction"], row["answers"])
        assert row["seconds"] > 0 and "cpu" in row  # each sample's wall time and machine

    methods = [Method("dense"), Method("spkv"), Method("streaming", threshold=0.0)]
    both = runner.run_methods(model, tok, methods, lengths=[448], tasks=["niah_single"], samples_per_cell=1,
                             max_new_tokens=4, prefill_chunk=64)
    density = {r["method"]: r["cells"][0]["density"] for r in both["methods"]}
    assert density["dense"] == 1.0 and density["streaming"] == 0.0 and 0.2 < density["spkv"] < 0.8
    table = report.tasks_markdown(both)
    assert "| spkv | niah_single |" in table and "retention vs dense" in table

    # an interrupted method resumes after its last saved sample; the saved rows are reused as they are
    saved = []
    kw = dict(lengths=[448], tasks=["niah_single", "vt"], samples_per_cell=1, max_new_tokens=4, prefill_chunk=64)
    runner.run_methods(model, tok, [Method("dense")], save=saved.append, **kw)
    first = saved[0]["methods"][0]
    assert first["partial"] and len(first["samples"]) == 1 and not saved[-1]["methods"][0].get("partial")
    first["samples"][0]["prediction"] = "marker"
    interrupted = json.loads(json.dumps(saved[0]))  # as the partial file holds it
    with pytest.raises(ValueError, match="other settings \\(seed\\)"):
        runner.run_methods(model, tok, [Method("dense")], resume=interrupted, seed=1, **kw)
    resumed = runner.run_methods(model, tok, [Method("dense")], resume=interrupted, **kw)
    rows = resumed["methods"][0]["samples"]
    assert [r["prediction"] == "marker" for r in rows] == [True, False]
    untimed = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    assert untimed(rows[1]) == untimed(saved[-1]["methods"][0]["samples"][1])  # the rest computed as in an uninterrupted run
    # a finished run grows to more samples per cell: its rows are kept, only the new indices run
    # (index first, so a growth stopped part way leaves every cell at k or k + 1 samples)
    grown = runner.run_methods(model, tok, [Method("dense")], resume=resumed, **{**kw, "samples_per_cell": 2})
    rows2 = grown["methods"][0]["samples"]
    assert len(rows2) == 4 and [(r["task"], r["index"]) for r in rows2] == [("niah_single", 0), ("vt", 0),
                                                                           ("niah_single", 1), ("vt", 1)]
    assert rows2[0]["prediction"] == "marker" and rows2[1] == rows[1]
    assert [c["n"] for c in grown["methods"][0]["cells"]] == [2, 2]
    # a saved row that comes after a missing one is in every partial save, so a stop there loses nothing
    gap = json.loads(json.dumps(grown))
    gap["methods"][0]["samples"] = [r for r in rows2 if (r["task"], r["index"]) != ("niah_single", 0)]
    saves: list[dict] = []
    runner.run_methods(model, tok, [Method("dense")], resume=gap, save=saves.append, **{**kw, "samples_per_cell": 2})
    first_save = saves[0]["methods"][0]
    assert first_save["partial"] and len(first_save["samples"]) == 4
    assert sorted((r["task"], r["index"]) for r in first_save["samples"]) == sorted((r["task"], r["index"]) for r in rows2)
    assert all(r in first_save["samples"] for r in rows2[1:])  # the reused rows, as they were saved


def test_cli_quick(tmp_path, monkeypatch):
    from spkv.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_bpe_model(tmp_path / "model")
    out = tmp_path / "out"
    main(["eval", "tasks", "--model", str(model_dir), "--quick", "--lengths", "384", "--tasks", "niah_single", "cwe",
          "--methods", "dense", "spkv", "random", "--threshold", "random=0.5", "--out", str(out)])
    result = json.loads((out / "tasks.json").read_text())
    assert [m["label"] for m in result["methods"]] == ["dense", "spkv", "random (tau=0.5)"]
    assert result["lengths"] == [384] and "provenance" in result
    table = (out / "tasks.md").read_text()
    assert "| random (tau=0.5) | cwe |" in table


def test_cli_runs_a_hybrid_layout_under_its_own_label(tmp_path, monkeypatch):
    """--hybrid-layout: the layout decodes as `spkv` with its constant gates, labelled by the layout;
    its density is the layout's global share; post-hoc policies are refused beside it."""
    from transformers import AutoConfig

    from spkv.cli import main
    from spkv.hybrid import HybridLayout

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_bpe_model(tmp_path / "model")
    config = AutoConfig.from_pretrained(model_dir)
    layers, hkv = list(range(config.num_hidden_layers)), config.num_key_value_heads
    units = [[True] * hkv] + [[False] * hkv] * (len(layers) - 1)  # the first layer global, the others local
    layout = HybridLayout(model=str(model_dir), layers=layers, units=units, window=128, budget=0.5, design="test")
    (tmp_path / "layout.json").write_text(layout.to_json())
    out = tmp_path / "out"
    base = ["eval", "tasks", "--model", str(model_dir), "--quick", "--lengths", "384", "--tasks", "niah_single",
            "--hybrid-layout", str(tmp_path / "layout.json"), "--out", str(out)]
    main(base + ["--methods", "dense", "spkv"])
    result = json.loads((out / "tasks.json").read_text())
    assert [m["label"] for m in result["methods"]] == ["dense", "hybrid layout"] and result["hybrid_layout"].endswith("layout.json")
    density = result["methods"][1]["cells"][0]["density"]
    assert density == pytest.approx(layout.global_share)
    with pytest.raises(SystemExit, match="dense and spkv"):
        main(base + ["--methods", "dense", "h2o"])


def test_tasks_markdown_summary_rows():
    """Per length and over all cells: mean score (with its interval), density, retention vs dense."""
    def run(label, cells):
        return {"method": label, "label": label,
                "cells": [{"task": t, "length": n, "score": s, "density": d} for t, n, s, d in cells],
                "samples": [{"task": t, "length": n, "index": 0, "score": s} for t, n, s, _ in cells]}

    result = {"lengths": [1024, 2048], "tasks": ["a", "b"], "samples_per_cell": 1, "seed": 0, "config": {},
              "methods": [run("dense", [("a", 1024, 1.0, 1.0), ("b", 1024, 0.5, 1.0), ("a", 2048, 0.5, 1.0), ("b", 2048, 0.0, 1.0)]),
                          run("spkv", [("a", 1024, 0.5, 0.2), ("b", 1024, 0.25, 0.4), ("a", 2048, 0.5, 0.1), ("b", 2048, 0.25, 0.1)])]}
    table = report.tasks_markdown(result)
    assert "| spkv | 1024 | 37.5 [" in table and "| 30.0% | 50.0% [" in table
    assert "| spkv | 2048 | 37.5 [" in table and "| 10.0% | 150.0% [" in table
    assert "| spkv | all | 37.5 [" in table and "| 20.0% | 75.0% [" in table
    assert "| dense | all | 50.0 [" in table and "| 100.0% | 100.0% [100, 100] |" in table
    assert "- spkv: not recorded (0 of 4 samples timed)" in table  # rows saved before timing existed
    result["methods"][1]["samples"][0] |= {"seconds": 90.0, "cpu": "CPU B"}
    result["methods"][1]["samples"][1] |= {"seconds": 30.0, "cpu": "CPU A"}
    assert "- spkv: 2.0 min over 2 of 4 samples, on CPU A, CPU B" in report.tasks_markdown(result)


def test_cli_match_density_and_resume(tmp_path, monkeypatch):
    """--match-density calibrates each policy on task prompts (or held-out text); --resume reuses samples."""
    from spkv.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_bpe_model(tmp_path / "model")
    out = tmp_path / "out"
    args = ["eval", "tasks", "--model", str(model_dir), "--quick", "--lengths", "384", "--tasks", "niah_single", "vt",
            "--methods", "dense", "key_norm", "spkv", "streaming", "--match-density", "0.3", "--calibration-len", "352", "--out", str(out)]
    main(args)
    result = json.loads((out / "tasks.json").read_text())
    calibration = result["calibration"]
    assert calibration["on"] == "tasks" and calibration["documents"] == ["niah_single/352/-1", "vt/352/-1"]
    calib = calibration["methods"]["key_norm"]
    assert abs(calib["density"] - 0.3) <= 0.01
    key_norm = next(m for m in result["methods"] if m["method"] == "key_norm")
    assert key_norm["threshold"] == calib["threshold"]
    # SP-KV's tau is calibrated to the same density (here untrained gates, u near sigmoid(5))
    spkv_calib = calibration["methods"]["spkv"]
    assert abs(spkv_calib["density"] - 0.3) <= 0.01 and 0.0 < spkv_calib["threshold"] < 1.0
    assert next(m for m in result["methods"] if m["method"] == "spkv")["threshold"] == spkv_calib["threshold"]
    # --resume: saved samples come back as they were, and the saved calibration is reused
    result["methods"][0]["samples"][0]["prediction"] = "reused"
    (out / "tasks.partial.json").write_text(json.dumps(result))
    saved = json.loads((out / "calibration.json").read_text())
    saved["methods"]["key_norm"]["threshold"] = 123.0  # a marker
    (out / "calibration.json").write_text(json.dumps(saved))
    main(args + ["--resume"])
    again = json.loads((out / "tasks.json").read_text())
    assert again["methods"][0]["samples"][0]["prediction"] == "reused" and not (out / "tasks.partial.json").exists()
    assert again["calibration"]["methods"]["key_norm"]["threshold"] == 123.0
    # an interrupted rerun that got no further than dense: key_norm still comes from the finished run
    again["methods"][1]["samples"][0]["prediction"] = "from the finished run"
    (out / "tasks.json").write_text(json.dumps(again))
    (out / "tasks.partial.json").write_text(json.dumps({**again, "methods": again["methods"][:1]}))
    main(args + ["--resume"])
    merged = json.loads((out / "tasks.json").read_text())
    assert merged["methods"][1]["method"] == "key_norm"
    assert merged["methods"][1]["samples"][0]["prediction"] == "from the finished run"

    rng = random.Random(0)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"id": f"h{i}", "text": " ".join(rng.choice(prompts.WORDS) for _ in range(900))}) + "\n"
                               for i in range(2)))
    prose = tmp_path / "prose"
    main(args[:-1] + [str(prose), "--calibrate-on", "heldout", "--heldout", str(heldout), "--calibration-len", "256"])
    on_prose = json.loads((prose / "calibration.json").read_text())
    assert on_prose["on"] == "heldout" and on_prose["documents"] == ["h0", "h1"]
    assert abs(on_prose["methods"]["key_norm"]["density"] - 0.3) <= 0.01
    assert "calibrated to 30% density on one prompt per task" in (out / "tasks.md").read_text()
    assert "calibrated to 30% density on 2 held-out documents" in (prose / "tasks.md").read_text()


def _fake_run(method: str, label: str, scores: dict[tuple[str, int, int], float], density: float | None) -> dict:
    samples = [{"task": t, "length": n, "index": i, "score": s} for (t, n, i), s in scores.items()]
    cells = [{"task": t, "length": n, "density": density} for t, n in sorted({(t, n) for t, n, _ in scores})]
    return {"method": method, "label": label, "samples": samples, "cells": cells}


def _fake_result(*runs: dict, seed: int = 0) -> dict:
    return {"tasks": ["a", "b"], "seed": seed, "config": {"haystack": "noise"}, "lengths": [8, 16], "methods": list(runs)}


def test_comparison_table_across_runs_matches_brute_force(tmp_path):
    """tasks-compare: each row's mean per length and over all cells, its density, and retention vs a
    reference on the shared samples only, recomputed by hand; other task settings are refused."""
    keys = [(t, n, i) for t in "ab" for n in (8, 16) for i in range(2)]
    control = _fake_run("dense", "dense", {k: 1.0 if k[2] == 0 else 0.5 for k in keys}, 1.0)
    hybrid = _fake_run("spkv", "hybrid x", {k: 1.0 if k[1] == 8 else 0.0 for k in keys}, 0.34)
    extra = {("a", 8, 2): 1.0}  # a sample the other rows lack: left out of the means and of retention
    spkv_run = _fake_run("spkv", "spkv (tau=0.3)", {**{k: 0.5 for k in keys}, **extra}, 0.25)
    files = {}
    for name, result in [("control", _fake_result(control)), ("hybrid", _fake_result(hybrid)),
                         ("spkv", _fake_result(_fake_run("dense", "dense", {}, 1.0), spkv_run))]:
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(result))
    specs = [f"control={files['control']}", f"hybrid={files['hybrid']}:spkv", f"SP-KV={files['spkv']}:spkv (tau=0.3)"]
    rows = {name: (result, run) for name, result, run in map(report.load_reference, specs)}
    table = report.comparison(rows, {"control": rows["control"]})
    by = {r["name"]: r for r in table["rows"]}
    assert table["lengths"] == [8, 16]
    assert by["control"]["score"]["all"]["mean"] == pytest.approx(0.75)
    assert by["hybrid"]["score"]["8"]["mean"] == 1.0 and by["hybrid"]["score"]["16"]["mean"] == 0.0
    assert by["hybrid"]["density"] == pytest.approx(0.34) and by["SP-KV"]["samples"] == 8  # the samples every row has
    assert by["SP-KV"]["score"]["all"]["mean"] == pytest.approx(0.5)
    assert by["SP-KV"]["retention"]["control"]["ratio"] == pytest.approx((8 * 0.5) / (8 * 0.75))  # shared samples only
    assert by["hybrid"]["retention"]["control"]["ratio"] == pytest.approx(4.0 / 6.0)
    lo, hi = by["hybrid"]["retention"]["control"]["ci"]
    assert lo <= 4.0 / 6.0 <= hi
    text = report.comparison_markdown(table)
    assert "| hybrid | 100.0" in text and "retention vs control" in text
    # per length: hybrid keeps all at 8 (1.0 vs the control's 0.75) and nothing at 16
    assert by["hybrid"]["retention_by_length"]["control"]["8"]["ratio"] == pytest.approx(4.0 / 3.0)
    assert by["hybrid"]["retention_by_length"]["control"]["16"]["ratio"] == 0.0
    versus = report.comparison(rows, {}, versus=["control", "SP-KV"])
    diff = {r["name"]: r["difference"]["control"] for r in versus["rows"]}
    assert diff["hybrid"]["8"]["mean"] == pytest.approx(0.25) and diff["hybrid"]["16"]["mean"] == pytest.approx(-0.75)
    assert diff["hybrid"]["all"]["mean"] == pytest.approx(-0.25) and diff["control"]["all"]["mean"] == 0.0
    lo, hi = diff["hybrid"]["16"]["ci"]  # every pair differs by -1 or -0.5: the interval stays below 0
    assert -1.0 <= lo <= hi < 0
    hybrid_vs_spkv = next(r for r in versus["rows"] if r["name"] == "hybrid")["difference"]["SP-KV"]
    assert hybrid_vs_spkv["8"]["mean"] == pytest.approx(0.5) and hybrid_vs_spkv["16"]["mean"] == pytest.approx(-0.5)
    text = report.comparison_markdown(versus)
    assert "Difference from control" in text and "Difference from SP-KV" in text
    assert "| hybrid | +25.0 [" in text
    # a pair of rows is compared on every sample both have, even one a third row lacks
    zero = _fake_run("dense", "zero", {**{k: 0.0 for k in keys}, **extra}, 1.0)
    zero["samples"][-1]["score"] = 0.0
    mean, (lo, hi) = report.difference(spkv_run, zero)
    assert mean == pytest.approx((8 * 0.5 + 1.0) / 9) and lo <= mean <= hi
    with pytest.raises(ValueError, match="'nobody' is not one of the rows"):
        report.comparison(rows, {}, versus=["control", "nobody"])
    other = {**rows, "seed 1": (_fake_result(hybrid, seed=1), hybrid)}
    with pytest.raises(ValueError, match="other task settings"):
        report.comparison(other, {})


def test_cli_tasks_compare_writes_the_table(tmp_path):
    from spkv.cli import main

    keys = [(t, n, 0) for t in "ab" for n in (8, 16)]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_fake_result(_fake_run("dense", "dense", {k: 1.0 for k in keys}, 1.0),
                                            _fake_run("spkv", "spkv (tau=0.5)", {k: 0.5 for k in keys}, 0.3))))
    main(["eval", "tasks-compare", "--rows", f"dense={path}", f"sp={path}:spkv", "--reference", f"base={path}",
          "--out", str(tmp_path / "cmp")])
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["dense", "sp"] and "provenance" in saved
    assert saved["rows"][1]["retention"]["base"]["ratio"] == pytest.approx(0.5)
    assert "| sp | 50.0" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(SystemExit, match="has no method 'h2o'"):
        main(["eval", "tasks-compare", "--rows", f"x={path}:h2o", "--out", str(tmp_path / "cmp2")])


def test_mean_run_is_the_expected_score_of_a_uniform_choice(tmp_path):
    """--mean: per sample, the mean of the members' scores over the samples they all have."""
    from spkv.cli import main

    keys = [(t, n, 0) for t in "ab" for n in (8, 16)]
    one = _fake_run("spkv", "one", {k: 1.0 for k in keys}, 0.3)
    two = _fake_run("spkv", "two", {**{k: 0.0 for k in keys[:3]}}, 0.4)  # lacks the last sample
    mean = report.mean_run([one, two], "either")
    assert [s["score"] for s in mean["samples"]] == [0.5, 0.5, 0.5] and mean["cells"][0]["density"] == pytest.approx(0.35)
    paths = []
    for run in (one, two):
        paths.append(tmp_path / f"{run['label']}.json")
        paths[-1].write_text(json.dumps(_fake_result(run)))
    main(["eval", "tasks-compare", "--rows", f"one={paths[0]}:spkv", f"two={paths[1]}:spkv", "--mean", "either=one,two",
          "--reference", f"one={paths[0]}:spkv", "--out", str(tmp_path / "cmp")])
    saved = {r["name"]: r for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]}
    assert saved["either"]["score"]["all"]["mean"] == 0.5 and saved["either"]["retention"]["one"]["ratio"] == 0.5
    assert "either: the expected score of one of one, two" in (tmp_path / "cmp" / "compare.md").read_text()
    for bad in ("x=one,three", "one=one,two"):  # an unknown row; a name that would replace a row
        with pytest.raises(SystemExit, match="--mean takes NAME=ROW,ROW"):
            main(["eval", "tasks-compare", "--rows", f"one={paths[0]}:spkv", f"two={paths[1]}:spkv", "--mean", bad,
                  "--out", str(tmp_path / "c2")])

"""The command line on tiny saved models (offline, seconds): `spkv generate` and `spkv eval nll`."""

from __future__ import annotations

import json
import random
import re

import pytest

import spkv
from spkv.cli import main
from spkv.data.heldout import heldout_set
from spkv.eval.nll import nll_full_sequence
from spkv.models import load_model

from .tiny_models import randomize_gates

pytestmark = pytest.mark.usefixtures("one_thread", "offline")  # tests/conftest.py

WORDS = 60  # the tiny tokenizer's words "w0" ... "w59"


def test_generate_prints_the_text_and_the_cache_report(tiny_pretrained, tmp_path, capsys):
    model_dir = tiny_pretrained("model", words=WORDS)
    prompt = " ".join(f"w{(7 * i) % WORDS}" for i in range(150))  # longer than the default 128-token window
    new_tokens = 12
    out_json = tmp_path / "report.json"
    main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(new_tokens),
          "--compare-base", "--json", str(out_json)])
    printed = capsys.readouterr().out
    report = json.loads(out_json.read_text())

    assert report["model"] == str(model_dir) and report["adapter"] is None and "provenance" in report
    assert report["prompt_tokens"] == 150 and report["new_tokens"] == new_tokens == len(report["token_ids"])
    assert printed.index(report["text"]) < printed.index("--- SP-KV cache report ---")
    assert f"prompt tokens 150, generated {new_tokens}" in printed
    cache = report["cache"]
    assert cache["decided"] > 0, "the prompt must be longer than the window, or density counts nothing"
    assert cache["density"] > 0.99 and cache["kept"] <= cache["decided"]  # untrained predictors keep (almost) every pair
    assert cache["bytes_held"] > 0 and cache["bytes_full"] > 0
    # keeping (almost) every pair, the converted model decodes what the unconverted one does
    assert report["tokens_identical_to_base"] == new_tokens
    assert f"the first {new_tokens} of {new_tokens} generated tokens are identical" in printed


def test_generate_errors(tiny_pretrained, tmp_path):
    missing = tmp_path / "no_such_prompt.txt"
    with pytest.raises(SystemExit, match=f"prompt file {re.escape(str(missing))} does not exist"):
        main(["generate", "--model", str(tiny_pretrained("model")), "--prompt-file", str(missing)])
    with pytest.raises(SystemExit, match="--prompt-file F or --prompt TEXT"):
        main(["generate", "--model", str(tiny_pretrained("model2"))])


def _random_gate_adapter(tiny_pretrained, tmp_path):
    """(model dir, the converted model with random gates, its tokenizer, its saved adapter)."""
    model_dir = tiny_pretrained("model", words=WORDS)
    model, tokenizer = load_model(str(model_dir))
    spkv.convert(model, spkv.SPKVConfig(window=8, threshold=0.5))
    randomize_gates(model, seed=2)
    return model_dir, model, tokenizer, spkv.save_adapter(model, tmp_path / "adapter")


def test_eval_nll_sweep(tiny_pretrained, tmp_path):
    model_dir, _, _, adapter = _random_gate_adapter(tiny_pretrained, tmp_path)
    rng = random.Random(0)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"id": f"h{i}", "source": "words",
                                           "text": " ".join(f"w{rng.randrange(WORDS)}" for _ in range(80 + 10 * i))}) + "\n"
                               for i in range(3)))
    out = tmp_path / "out"
    main(["eval", "nll", "--model", str(model_dir), "--adapter", str(adapter), "--thresholds", "0.3", "0.7",
          "--seq-len", "64", "--sequences", "2", "--heldout", str(heldout), "--out", str(out)])

    result = json.loads((out / "nll_sweep.json").read_text())
    assert result["seq_len"] == 64 and result["doc_ids"] == ["h0", "h1"] and result["reference"] == "base model"
    assert [(r["method"], r["threshold"]) for r in result["rows"]] == [("base model", None), ("SP-KV", 0.3), ("SP-KV", 0.7)]
    base_row, low, high = result["rows"]
    assert base_row["density"] is None
    assert 0 < high["density"] < 1, "the random gates must drop pairs at tau 0.7, or the sweep compares nothing"
    assert low["density"] >= high["density"]  # a lower tau keeps at least as much
    # the base model's row is exactly spkv.eval.nll on the same held-out sequences
    base, tokenizer = load_model(str(model_dir))
    direct = nll_full_sequence(base, heldout_set(tokenizer, seq_len=64, max_sequences=2, corpus=heldout))
    assert base_row["nll"] == pytest.approx(direct.nll, abs=1e-6)
    assert base_row["nll_per_sequence"] == pytest.approx(direct.nll_per_sequence, abs=1e-6)
    table = (out / "nll_sweep.md").read_text()
    assert "| base model |  |" in table and "| SP-KV | 0.3 |" in table and "| SP-KV | 0.7 |" in table


def test_eval_nll_at_a_target_density(tiny_pretrained, tmp_path):
    """--densities: tau is calibrated on the calibration corpus (never the evaluated documents), and
    the row is the full-sequence NLL at that tau."""
    model_dir, model, tokenizer, adapter = _random_gate_adapter(tiny_pretrained, tmp_path)
    rng = random.Random(1)

    def corpus(name: str, n: int) -> object:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"{name}{i}", "source": "words",
                                            "text": " ".join(f"w{rng.randrange(WORDS)}" for _ in range(90))}) + "\n"
                                for i in range(n)))
        return path

    heldout, train = corpus("heldout", 2), corpus("train", 3)
    out = tmp_path / "out"
    main(["eval", "nll", "--model", str(model_dir), "--adapter", str(adapter), "--thresholds", "0.5", "--densities", "0.4",
          "--calibration-sequences", "3", "--calibration-corpus", str(train), "--seq-len", "64", "--sequences", "2",
          "--heldout", str(heldout), "--out", str(out)])

    row = json.loads((out / "nll_sweep.json").read_text())["rows"][-1]
    calibration = list(heldout_set(tokenizer, seq_len=64, max_sequences=3, corpus=train).input_ids)
    expected = spkv.calibrate(model, input_ids=calibration, density=0.4)  # sets the model's tau
    assert row["target_density"] == 0.4 and row["threshold"] == pytest.approx(expected.threshold)
    assert row["calibration_density"] == pytest.approx(expected.density) and row["calibration_density"] <= 0.4
    assert row["calibration_tokens"] == 3 * 64
    direct = nll_full_sequence(model, heldout_set(tokenizer, seq_len=64, max_sequences=2, corpus=heldout))
    assert row["nll"] == pytest.approx(direct.nll, abs=1e-6) and row["density"] == pytest.approx(direct.density)
    assert "* (target 40%)" in (out / "nll_sweep.md").read_text()
    args = ["eval", "nll", "--model", str(model_dir), "--adapter", str(adapter), "--calibration-corpus", str(train),
            "--seq-len", "64", "--heldout", str(heldout), "--out", str(tmp_path / "bad")]
    with pytest.raises(SystemExit, match=r"must be in \(0, 1\], got \[1.5\]"):  # before any evaluation
        main(args + ["--densities", "1.5"])
    with pytest.raises(SystemExit, match="--calibration-sequences must be at least 1"):
        main(args + ["--densities", "0.4", "--calibration-sequences", "0"])
    assert not (tmp_path / "bad").exists()


def test_generate_runs_a_hybrid_layout(tiny_pretrained, tmp_path):
    """--hybrid-layout (every command with the model arguments): the cache holds exactly the layout,
    global units everything past the window, local ones nothing."""
    from spkv import hybrid

    model_dir = tiny_pretrained("model", words=WORDS)
    layout = hybrid.design([[0.9, 0.1], [0.2, 0.3]], [0, 1], 0.5, "learned-head", model=str(model_dir), window=8)
    path = tmp_path / "layout.json"
    path.write_text(layout.to_json())
    prompt = " ".join(f"w{(7 * i) % WORDS}" for i in range(60))
    out_json = tmp_path / "report.json"
    main(["generate", "--model", str(model_dir), "--hybrid-layout", str(path), "--prompt", prompt, "--max-new-tokens", "4",
          "--json", str(out_json)])
    report = json.loads(out_json.read_text())
    cache = report["cache"]
    assert report["hybrid_layout"] == str(path) and cache["density"] == 0.5 and cache["density_per_layer_head"] == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(SystemExit, match="not both"):
        main(["generate", "--model", str(model_dir), "--hybrid-layout", str(path), "--threshold", "0.5", "--prompt", prompt])
    with pytest.raises(SystemExit, match="retune"):
        main(["generate", "--model", str(model_dir), "--hybrid-layout", str(path), "--density", "0.2", "--prompt", prompt])
    with pytest.raises(SystemExit, match="designed for"):
        main(["generate", "--model", str(tiny_pretrained("other", words=WORDS)), "--hybrid-layout", str(path), "--prompt", prompt])

"""lm-evaluation-harness on an SP-KV model, with a local task (json data files): offline, seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import spkv
from spkv.eval.lm_eval_harness import HarnessConfig, results_markdown, run_tasks
from spkv.models import load_model

from .tiny_models import randomize_gates, save_tiny_pretrained

pytest.importorskip("lm_eval")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WORDS = 60


def _write_tasks(folder: Path, n_docs: int = 4, seed: int = 0) -> Path:
    """Two local tasks on the tiny word vocabulary: multiple choice (loglikelihood) and generate_until."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        context = " ".join(f"w{rng.randrange(WORDS)}" for _ in range(rng.randint(14, 22)))
        choices = [" ".join(f"w{rng.randrange(WORDS)}" for _ in range(rng.randint(1, 3))) for _ in range(3)]
        docs.append({"context": context, "choices": choices, "label": i % 3, "answer": choices[i % 3]})
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'hf_cache'}\n"
              "test_split: test\ndoc_to_text: \"{{context}}\"\n")
    (folder / "mc.yaml").write_text(
        "task: spkv_tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        "task: spkv_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"<eos>\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


def _sp_kv_model(path: Path):
    model, tokenizer = load_model(save_tiny_pretrained(path / "model", words=WORDS))
    spkv.convert(model, spkv.SPKVConfig(window=4, threshold=0.5))
    randomize_gates(model, seed=3)
    return model, tokenizer


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context) from spkv's own full-sequence hard forward."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
    targets = ids[0, len(ctx):]
    return float(logp[0, len(ctx) - 1 : -1].gather(-1, targets.unsqueeze(-1)).sum())


def test_harness_loglikelihoods_are_spkv_and_metrics_come_back(tmp_path, offline):
    tasks = _write_tasks(tmp_path / "tasks")
    model, tokenizer = _sp_kv_model(tmp_path)
    cfg = HarnessConfig(tasks=["spkv_tiny_mc", "spkv_tiny_gen"], include_path=str(tasks), log_samples=True)
    result = run_tasks(model, tokenizer, cfg)

    assert 0.0 <= result["results"]["spkv_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= result["results"]["spkv_tiny_gen"]["exact_match,none"] <= 1.0
    density = result["spkv"]["loglikelihood_density"]
    assert 0.05 < density < 0.95  # the random gates drop pairs, so the comparison below means something

    checked = 0
    base, _ = load_model(tmp_path / "model")
    for sample in result["samples"]["spkv_tiny_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            expected = _direct_loglikelihood(model, tokenizer, context, continuation)
            assert resp[0][0] == pytest.approx(expected, abs=1e-4)
            dense = _direct_loglikelihood(base, tokenizer, context, continuation)
            checked += abs(dense - expected) > 1e-3
    assert checked > 0  # SP-KV changed some loglikelihoods: the harness did not run a plain model
    for sample in result["samples"]["spkv_tiny_gen"]:
        assert isinstance(sample["resps"][0][0], str)
    assert "spkv_tiny_mc" in results_markdown(result)


def test_cli(tmp_path, offline):
    from spkv.cli import main

    tasks = _write_tasks(tmp_path / "tasks")
    model_dir = save_tiny_pretrained(tmp_path / "model", words=WORDS)
    out = tmp_path / "out"
    main(["eval", "lm-eval", "--tasks", "spkv_tiny_mc", "--model", str(model_dir), "--include-path", str(tasks),
          "--limit", "2", "--threshold", "0.5", "--out", str(out)])
    result = json.loads((out / "lm_eval.json").read_text())
    assert result["n_samples"]["spkv_tiny_mc"]["effective"] == 2
    assert result["spkv"]["threshold"] == 0.5 and "provenance" in result
    assert "| spkv_tiny_mc | acc (none) |" in (out / "lm_eval.md").read_text()

"""spkv show: the highlighted tokens are exactly the pairs the cache holds, and the page renders in
a real headless browser (Chromium from the system packages; .ci/run installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

import spkv
from spkv.attention import keep_decision
from spkv.eval.show import keep_map, write_show

from .tiny_models import randomize_gates, save_tiny_pretrained

TEXT = " ".join(f"w{(i * 7) % 50}" for i in range(90))


@pytest.fixture()
def model_and_tokenizer(tmp_path):
    model, tokenizer = spkv.load_model(save_tiny_pretrained(tmp_path / "base", family="gemma3"))
    spkv.convert(model, spkv.SPKVConfig(window=8))
    randomize_gates(model)
    return model, tokenizer


def test_keep_map_is_the_rule_applied_to_the_full_forward(model_and_tokenizer):
    """Brute force: a position is held iff it is in the last window - 1 tokens or its u >= tau."""
    model, tokenizer = model_and_tokenizer
    result = keep_map(model, tokenizer, TEXT, prefill_chunk=16)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    t, w = ids.shape[1], model.spkv_config.window
    with torch.no_grad(), spkv.record_gates(model) as gates:
        model(input_ids=ids, use_cache=False)
    assert result.layers == sorted(gates) == model.spkv_config.layers
    for li, layer in enumerate(result.layers):
        keep = keep_decision(gates[layer][0], model.spkv_config.threshold).T  # [Hkv, T]
        expected = keep | (torch.arange(t) >= t - w + 1)
        assert torch.equal(result.kept[li], expected)
    assert 0 < result.kept.float().mean() < 1
    assert len(result.tokens) == t


def _dump_dom(browser: str, page, fragment: str) -> str:
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"file://{page}#{fragment}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_page_renders_in_a_headless_browser_with_the_cache_selection(model_and_tokenizer, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here: `apt-get install chromium` (.ci/run installs it) to run the browser test")
    model, tokenizer = model_and_tokenizer
    result = keep_map(model, tokenizer, TEXT, prefill_chunk=16)
    paths = write_show(result, tmp_path / "show")
    assert paths["png"].stat().st_size > 1000 and paths["json"].is_file()
    for li, layer in enumerate(result.layers):
        for head in range(result.kept.shape[1]):
            dom = _dump_dom(browser, paths["html"], f"layer={layer}&head={head}")
            classes = re.findall(r'<span data-index="(\d+)" class="(kept|window|dropped)">', dom)
            assert len(classes) == len(result.tokens)
            shown = torch.tensor([c != "dropped" for _, c in sorted(classes, key=lambda x: int(x[0]))])
            assert torch.equal(shown, result.kept[li, head])
            assert f"{int(result.kept[li, head].sum())} of {len(result.tokens)} tokens held" in dom

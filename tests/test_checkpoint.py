"""Self-describing checkpoints: spkv.save_pretrained then spkv.load_model gives the same model; a
plain transformers load refuses the folder with an error naming spkv's loader."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import spkv
from spkv.compat import cache_kwarg

from .tiny_models import randomize_gates, save_tiny_pretrained


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_save_and_load_give_identical_logits_and_tokens(tmp_path, family):
    model, tokenizer = spkv.load_model(save_tiny_pretrained(tmp_path / "base", family=family))
    spkv.convert(model, spkv.SPKVConfig(window=4, threshold=0.6))
    randomize_gates(model)
    with torch.no_grad():  # a changed LLM weight too, as an adapter would leave it
        model.get_input_embeddings().weight[5].add_(0.5)
    path = spkv.save_pretrained(model, tmp_path / "ckpt", tokenizer)
    loaded, loaded_tok = spkv.load_model(path)
    assert spkv.is_converted(loaded) and loaded.spkv_config == model.spkv_config
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    ids = torch.randint(3, 50, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids, **kw, **cache_kwarg(spkv.SPKVCache(loaded))),
                       model.generate(ids, **kw, **cache_kwarg(spkv.SPKVCache(model))))
    assert spkv.from_pretrained is spkv.load_model


def test_plain_transformers_load_is_refused_with_the_loader_named(tmp_path):
    model, _ = spkv.load_model(save_tiny_pretrained(tmp_path / "base"))
    spkv.convert(model)
    path = spkv.save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"spkv\.load_model"):
        AutoModelForCausalLM.from_pretrained(path)


def test_save_errors(tmp_path):
    model, _ = spkv.load_model(save_tiny_pretrained(tmp_path / "base"))
    with pytest.raises(ValueError, match="SP-KV model"):
        spkv.save_pretrained(model, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()

"""Beam search, prompt-lookup and assisted decoding through the compact cache: the same tokens as the
unconverted model at tau = 0, and under real gating the same as a brute-force reference."""

from __future__ import annotations

import pytest
import torch

import spkv
from spkv.compat import cache_kwarg
from spkv.stats import cache_stats

from .tiny_models import VOCAB, randomize_gates, tiny_model

BEAMS = dict(max_new_tokens=12, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0,
             return_dict_in_generate=True, output_scores=True)


def _prompt(batch: int = 2, length: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_at_tau_zero_matches_the_unconverted_model(family):
    prompt = _prompt()
    ref = tiny_model(family).generate(prompt, **BEAMS)
    model = spkv.convert(tiny_model(family), spkv.SPKVConfig(window=4, threshold=0.0))
    out = model.generate(prompt, **BEAMS)
    assert torch.equal(out.sequences, ref.sequences)


def test_beam_search_under_gating_matches_each_beams_full_forward():
    """Every step's score of every returned beam equals the exact full-sequence forward of that
    beam's tokens under the same rule: the cache followed each beam through every reorder."""
    prompt = _prompt()
    model = spkv.convert(tiny_model("llama"), spkv.SPKVConfig(window=4))
    randomize_gates(model)
    out = model.generate(prompt, **BEAMS)
    assert not torch.equal(out.sequences, tiny_model("llama").generate(prompt, **BEAMS).sequences)  # gating matters here
    steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=out.sequences, use_cache=False).logits.float(), -1)
    n = prompt.shape[1]
    reference = full[:, n - 1 : -1].gather(-1, out.sequences[:, n:].unsqueeze(-1)).squeeze(-1)
    real = steps != 0  # finished beams are padded with zeros
    assert real.sum() > 0.9 * real.numel()
    assert torch.allclose(steps[real], reference[real], atol=1e-4)


def _repetitive_prompt() -> torch.Tensor:
    head = _prompt(1, 60, seed=1)
    return torch.cat([head, head[:, :30]], dim=1)  # repeats give prompt lookup candidates


class _CountingCache(spkv.SPKVCache):
    """Counts crops that really remove tokens, so the tests below cannot pass without rollbacks."""

    removed = 0

    def crop(self, tokens_to_remove: int) -> None:
        type(self).removed += max(0, -tokens_to_remove)
        super().crop(tokens_to_remove)


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_prompt_lookup_and_assisted_decoding_equal_greedy(mode):
    prompt = _repetitive_prompt()
    model = spkv.convert(tiny_model("llama"), spkv.SPKVConfig(window=8))
    randomize_gates(model)
    greedy_cache = spkv.SPKVCache(model)
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    greedy = model.generate(prompt, **kw, **cache_kwarg(greedy_cache))
    extra = {"prompt_lookup_num_tokens": 5} if mode == "prompt_lookup" else {"assistant_model": tiny_model("llama", seed=1)}
    _CountingCache.removed = 0
    cache = _CountingCache(model)
    out = model.generate(prompt, **kw, **extra, **cache_kwarg(cache))
    assert torch.equal(out, greedy)
    assert _CountingCache.removed > 0  # drafts were rejected and rolled back
    cache.crop(0)  # take the window exits deferred since the last verification
    ours, theirs = cache_stats(cache), cache_stats(greedy_cache)
    length = out.shape[1] - 1  # the last token is never fed back
    assert cache.get_seq_length() == greedy_cache.get_seq_length() == length
    assert torch.equal(ours.kept, theirs.kept) and torch.equal(ours.decided, theirs.decided)


def test_crop_errors():
    model = spkv.convert(tiny_model("llama"), spkv.SPKVConfig(window=4))
    cache = spkv.SPKVCache(model)
    with torch.no_grad():
        model(input_ids=_prompt(1, 20), **cache_kwarg(cache))
    with pytest.raises(ValueError, match="already taken"):
        cache.crop(-3)  # exits were taken: only a recording cache can roll back
    with pytest.raises(ValueError, match="negative"):
        cache.crop(2)
    h2o = spkv.SPKVCache(model, policy=spkv.policies.H2O(threshold=0.1), sinks=4)
    assert not h2o.is_croppable
    with pytest.raises(ValueError, match="cannot be cropped"):
        h2o.activate_past_recording()

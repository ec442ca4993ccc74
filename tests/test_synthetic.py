"""Synthetic long-range training data: deterministic, the right length, and disjoint from the
evaluation suite (the training generators never produce an evaluation prompt or its parts)."""

from __future__ import annotations

import random
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from spkv.data import synthetic
from spkv.eval.tasks import prompts

TEXT = ("The river ran past the old mill. Nobody had seen the miller for years.\n"
        "She opened the letter and read it twice. Then she laughed.\n") * 20


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE trained here: real subwords, so decoding and newlines behave."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT, " ".join(prompts.WORDS), "0123456789 Question Answer Let hold"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def _filler(tokenizer, n: int) -> torch.Tensor:
    ids = tokenizer(TEXT * 4, add_special_tokens=False).input_ids
    return torch.tensor((ids * (n // len(ids) + 1))[:n], dtype=torch.int32)


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_sequence_keeps_length_and_ends_with_its_answer(tokenizer, kind):
    filler = _filler(tokenizer, 600)
    ids, piece = synthetic.synthetic_sequence(filler, tokenizer, seed=0, slot=3, kind=kind)
    assert ids.shape == filler.shape and ids.dtype == filler.dtype
    text = tokenizer.decode(ids.tolist())
    assert text.endswith("Answer: " + piece.answer + "<eos>")
    for fact in piece.facts:
        assert fact in text
    assert text.index(piece.facts[0]) < text.index("Question:")
    if kind == "chain":  # written in order, and every name holding the value is the answer
        positions = [text.index(f) for f in piece.facts]
        assert positions == sorted(positions)
        assert piece.answer.split(", ") == re.findall(r"Let (\w+) hold", " ".join(piece.facts))
    again, _ = synthetic.synthetic_sequence(filler, tokenizer, seed=0, slot=3, kind=kind)
    assert torch.equal(ids, again)  # deterministic in (seed, slot)
    other, _ = synthetic.synthetic_sequence(filler, tokenizer, seed=0, slot=4, kind=kind)
    assert not torch.equal(ids, other)


def test_too_short_sequence_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        synthetic.synthetic_sequence(_filler(tokenizer, 30), tokenizer, seed=0, slot=0, kind="multi")


def test_mix_share_follows_the_fraction():
    draws = [synthetic.is_synthetic(0, slot, 0.25) for slot in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.25) < 0.03
    assert not any(synthetic.is_synthetic(0, slot, 0.0) for slot in range(100))
    assert draws == [synthetic.is_synthetic(0, slot, 0.25) for slot in range(4000)]  # a resumed run replays it


def _evaluation_prompts(tokenizer) -> list[str]:
    cfg = prompts.TaskConfig()
    out = []
    for task in prompts.TASKS:
        for index in range(-1, 4):  # -1: the calibration prompts
            out.append(prompts.make_sample(task, 1024, index, tokenizer, seed=0, config=cfg).prompt)
    return out


def test_training_generators_never_produce_an_evaluation_prompt(tokenizer):
    """Every part a training sequence adds (facts, question, answer) is checked against the suite:
    keys are not suite words, values have another number of digits, no sentence is shared, and no
    training part occurs in any evaluation prompt nor an evaluation needle in training text."""
    vocab = synthetic.evaluation_vocabulary()
    eval_prompts = _evaluation_prompts(tokenizer)
    eval_text = "\n".join(eval_prompts)
    eval_needles = set(re.findall(r"One of the special magic numbers for [^.]+\.", eval_text)) | set(re.findall(r"VAR \w+ = [^.]+\.", eval_text))
    assert eval_needles  # the check below compares against something
    eval_sentences = {s.strip() for p in eval_prompts for s in re.split(r"(?<=[.?!])\s+", p) if len(s.strip()) > 12}
    filler = _filler(tokenizer, 700)
    for slot in range(150):
        ids, piece = synthetic.synthetic_sequence(filler, tokenizer, seed=slot % 3, slot=slot)
        parts = [*piece.facts, piece.question, "Answer: " + piece.answer]
        words = {w.lower() for part in parts for w in re.findall(r"[A-Za-z]+", part)}
        generated = words - {w.lower() for t in synthetic.FACT_TEMPLATES for s in t for w in re.findall(r"[A-Za-z]+", s)} \
            - {w.lower() for s in (synthetic.CHAIN_FIRST, synthetic.CHAIN_NEXT, synthetic.CHAIN_QUESTION) for w in re.findall(r"[A-Za-z]+", s)} \
            - {"answer"}
        assert not generated & vocab, generated & vocab  # keys and names are never the suite's words
        for number in re.findall(r"\d+", " ".join(parts)):
            assert len(number) == 6  # the suite's needles have 7 digits, its chains 5
        for part in parts:
            assert part not in eval_text and part.strip() not in eval_sentences
        text = tokenizer.decode(ids.tolist())
        assert not any(n in text for n in eval_needles)
        assert "special magic" not in text and "VAR " not in text and "Memorize" not in text
        assert not any(noise in text for noise in prompts.NOISE)


def test_pseudo_words_avoid_given_words():
    rng = random.Random(0)
    avoid = frozenset(synthetic.pseudo_word(random.Random(i), 2) for i in range(50))
    words = synthetic._distinct_words(rng, 200, avoid)
    assert len(set(words)) == 200 and not set(words) & avoid

"""Synthetic long-range training sequences: facts hidden in training text, asked for at the end.

Why: gates trained on prose alone learn that a pair is rarely needed later, and drop exactly the
rare facts retrieval needs (issue 16: the Gemma3 adapter kept its base model's passkeys with a full
cache and lost most of them at its deployed tau). The paper reports that adding synthetic
long-range retrieval data to training lowers the long-context loss. So a share of training
sequences (TrainConfig.synthetic_fraction) become: a training-split sequence with a few facts
written into it at random depths, ending with a question and its answer; the ordinary next-token
loss on the answer rewards keeping the facts. This design is ours (the paper gives no details).

Three kinds, each the training-side cousin of an evaluation task:
  recall     one fact, asked back                       (cf. niah_single)
  multi      several facts with distinct keys, one asked (cf. niah_multikey / multiquery)
  chain      a value passed along a chain of names; every name holding it asked (cf. vt)

Disjoint from the evaluation suite (spkv.eval.tasks.prompts) by construction, and tested: the
filler is training-split text (never the held-out corpus or RULER's noise sentences); keys and
names are generated pseudo-words that are not English words of the suite's vocabulary; values are
6-digit numbers (the suite's needles use 7 digits, its chains 5); the templates share no sentence
with the suite's; seeds live in a namespace of their own ("spkv-train-synthetic/...").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("recall", "multi", "chain")
SEED_NAMESPACE = "spkv-train-synthetic"

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

# (fact, question) templates; {key}/{value}. None of these sentences appears in the evaluation suite.
FACT_TEMPLATES = (
    ("The locker code assigned to {key} is {value}.", "What is the locker code assigned to {key}?"),
    ("Archive record: {key} was filed under number {value}.", "Under which number was {key} filed?"),
    ("Note for later: the pass phrase of {key} is {value}.", "What is the pass phrase of {key}?"),
)
CHAIN_FIRST = "Let {name} hold {value}."
CHAIN_NEXT = "Let {name} hold whatever {prev} holds."
CHAIN_QUESTION = "Which names hold {value}?"


def pseudo_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable non-word such as "velomar": consonant-vowel syllables plus a final consonant."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CONSONANTS)


def _distinct_words(rng: random.Random, k: int, avoid: frozenset[str]) -> list[str]:
    words: list[str] = []
    while len(words) < k:
        w = pseudo_word(rng, rng.randint(2, 3))
        if w not in avoid and w not in words:
            words.append(w)
    return words


@dataclass
class SyntheticPiece:
    """What one synthetic sequence asks: facts (inserted into filler) and the closing question."""

    kind: str
    facts: list[str]
    question: str
    answer: str


def make_piece(rng: random.Random, kind: str, avoid: frozenset[str] = frozenset()) -> SyntheticPiece:
    """Facts, question and answer of one sequence; `avoid` holds words keys must not be."""
    if kind == "chain":
        names = _distinct_words(rng, rng.randint(3, 5), avoid)
        value = str(rng.randrange(100_000, 1_000_000))
        facts = [CHAIN_FIRST.format(name=names[0], value=value)]
        facts += [CHAIN_NEXT.format(name=b, prev=a) for a, b in zip(names, names[1:])]
        return SyntheticPiece(kind, facts, CHAIN_QUESTION.format(value=value), ", ".join(names))
    count = 1 if kind == "recall" else rng.randint(3, 6)
    keys = [w.capitalize() for w in _distinct_words(rng, count, avoid)]
    fact, question = rng.choice(FACT_TEMPLATES)
    values = [str(rng.randrange(100_000, 1_000_000)) for _ in keys]
    asked = rng.randrange(count)
    facts = [fact.format(key=k, value=v) for k, v in zip(keys, values)]
    return SyntheticPiece(kind, facts, question.format(key=keys[asked]), values[asked])


def evaluation_vocabulary() -> frozenset[str]:
    """Every word the evaluation suite builds keys from (keys must differ from them)."""
    from spkv.eval.tasks.prompts import WORDS

    return frozenset(w.lower() for w in WORDS)


def _newline_positions(filler: torch.Tensor, tokenizer: Any) -> list[int]:
    """Token positions right after a newline or a full stop: where a fact reads as a new sentence."""
    pieces = tokenizer.batch_decode([[t] for t in filler.tolist()])  # one call, not one per token
    return [i + 1 for i, piece in enumerate(pieces) if piece.endswith(("\n", "."))]


def synthetic_sequence(filler: torch.Tensor, tokenizer: Any, seed: int, slot: int, kind: str | None = None,
                       avoid: frozenset[str] | None = None) -> tuple[torch.Tensor, SyntheticPiece]:
    """filler [seq_len] training-text ids -> ([seq_len] ids with facts inserted at random depths and
    the question + answer at the end, the piece). Deterministic in (seed, slot)."""
    rng = random.Random(f"{SEED_NAMESPACE}/{seed}/{slot}")
    piece = make_piece(rng, kind or rng.choice(KINDS), evaluation_vocabulary() if avoid is None else avoid)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    fact_ids = [encode(" " + f + "\n") for f in piece.facts]
    tail = encode("\nQuestion: " + piece.question + " Answer: " + piece.answer)
    if tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    seq_len = filler.shape[0]
    keep = seq_len - len(tail) - sum(map(len, fact_ids))
    if keep < seq_len // 4:
        raise ValueError(f"Sequence length {seq_len} is too short for synthetic facts: use a longer --seq-len.")
    body = filler[:keep]
    spots = [p for p in _newline_positions(body, tokenizer) if p < keep] or list(range(1, keep))
    depths = sorted(rng.sample(spots, len(fact_ids)) if len(spots) >= len(fact_ids) else rng.choices(spots, k=len(fact_ids)))
    if piece.kind != "chain":  # a chain is written in order; other facts in any order
        rng.shuffle(fact_ids)
    parts, last = [], 0
    for depth, ids in zip(depths, fact_ids):
        parts += [body[last:depth], torch.tensor(ids, dtype=filler.dtype)]
        last = depth
    parts += [body[last:], torch.tensor(tail, dtype=filler.dtype)]
    out = torch.cat(parts)
    assert out.shape[0] == seq_len, (out.shape, seq_len)
    return out, piece


def is_synthetic(seed: int, slot: int, fraction: float) -> bool:
    """Whether training slot `slot` (a global sequence counter) is a synthetic sequence: a seeded draw,
    so the mix is fixed by (seed, fraction) and a resumed run replays it exactly."""
    return fraction > 0 and random.Random(f"{SEED_NAMESPACE}/mix/{seed}/{slot}").random() < fraction

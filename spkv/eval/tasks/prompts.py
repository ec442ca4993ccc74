"""RULER-style long-context tasks (Hsieh et al. 2024), generated locally from a seed, and their runner.

Why: held-out NLL says little about whether a compressed cache still *finds* a fact written 8k
tokens ago. RULER's synthetic tasks do, need no download, and scale to any length. Every sample is
fitted to a target length in tokens of the model's own tokenizer; the prompt ends with an answer
prefix, so a small base model can simply continue it. Score = RULER's string match: the fraction of
expected answers that appear in the generated text (case-insensitive).

Answer prefixes (TaskConfig.answer_prefix): "ruler" is RULER's own wording, written for instruction
models. A base model continues its plural "...the special magic numbers for X ... are" with
": 1, 2, 3, ..." and variable tracking's "they are:" the same way, whatever the context holds, so
"base" (the default) ends the needle tasks with the singular "... is" and variable tracking with
"VAR", the word every answer follows in the text. Gemma3-270M then retrieves single needles; a
base model still names one value where several are asked (multi-value, multi-query).

Tasks (RULER's names in brackets):
  niah_single      one needle in a haystack                         [niah_single_2]
  niah_multikey    the needle plus distractor needles with other keys [niah_multikey_1]
  niah_multivalue  one key, several values; all must be returned     [niah_multivalue]
  niah_multiquery  several keys asked at once                        [niah_multiquery]
  vt               variable tracking: VAR X = 12345 ... VAR Y = VAR X; name every variable bound to the value
  cwe              common words extraction from a numbered word list
  fwe              frequent words extraction from Zipf-distributed coded words
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spkv.data.heldout import HeldoutSet, read_heldout

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)

# RULER's "noise" haystack: these five sentences, repeated.
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

_ADJECTIVES = """
able acidic adorable aggressive agreeable alert amused ancient angry anxious arrogant ashamed awful
bashful bewildered bitter bizarre bland blushing bouncy brainy brave breezy brief bright broad bumpy
busy calm careful cautious charming cheerful chilly chubby clever cloudy clumsy colossal complex
cooperative courageous crazy creepy crooked crowded cruel cuddly curious curly damaged dangerous
dazzling defiant delicious delightful dense depressed determined dirty disgusted distinct dizzy dreary
drowsy dusty eager elegant embarrassed enchanting energetic enormous enthusiastic envious evil excited
expensive exuberant fabulous faithful famous fancy fantastic fearless feeble fierce filthy flaky
fluffy foolish fragile frail frantic friendly frightened funny fuzzy gentle giant gigantic glamorous
gleaming glorious gorgeous graceful greasy grieving grotesque grumpy handsome happy harsh healthy
heavy helpful helpless hilarious hollow homely horrible hungry icky itchy jealous jittery jolly joyous
juicy lazy light little lively lonely loose lovely lucky magnificent massive melodic messy miniature
misty modern motionless muddy mushy mysterious nasty naughty nervous nutty obedient obnoxious odd
outrageous panicky perfect plain pleasant poised polite powerful precious prickly proud puzzled quaint
quick quiet rainy rapid rare raspy rich ripe robust rotten rough round rustic salty scary scrawny
selfish shaggy shaky shallow sharp shiny short shy silent silky skinny sleepy slimy slippery smoggy
smooth soggy solid sore sparkling spicy splendid spotless square squeaky stale steady steep sticky
stormy strange striped strong stupid sturdy subtle successful sweet swift tame tangy tasty tender
tense terrible thankful thirsty thoughtful tight tiny tired tough troubled ugly uneven upset uptight
vast victorious vivacious wandering weary wicked wide wild witty wobbly worried wrong zany zealous
"""
_NOUNS = """
actor airport album anchor animal apple apron arrow attic avenue badge bakery balloon banana bandit
barrel basket battery beach beard bedroom beetle bell bicycle blanket blossom boat bone bonnet bottle
boulder bracelet bread bridge broom bubble bucket buffalo building butter button cabbage cabin cactus
camera camel candle canoe canyon captain carpet carrot castle cathedral cellar chair chalk channel
cheese cherry chimney church cinema circus citizen cliff clock closet cloud coconut coffee comet
compass cookie copper cottage cowboy crayon cricket crown cupboard curtain cushion dagger daisy
dentist desert diamond dinosaur doctor dolphin donkey dragon drawer dream drum eagle earring elephant
elevator engine envelope eraser falcon farmer feather fence ferry festival finger firework flag
flamingo flower forest fountain fox garden garlic gate giraffe glacier glove goblin gorilla grape
guitar hammer harbor harp helmet highway honey horizon horse hospital hotel island jacket jaguar
jellyfish jewel jungle kangaroo kettle keyboard kitchen kite ladder lagoon lantern lemon leopard
library lighthouse lizard lobster locket magnet mailbox mango marble market meadow melon mirror
monkey monster mountain museum mushroom napkin necklace needle nephew notebook ocean octopus onion
orange orchard ostrich oven owl paddle painter palace pancake panther parrot passenger peach peanut
pebble pelican pencil penguin pepper piano pickle pigeon pillow pilot pirate planet plumber pocket
potato pumpkin puppet puzzle pyramid quilt rabbit raccoon radio rainbow raven ribbon river robot
rocket saddle sailor salad sandwich satellite saucer scarf scissors sculpture shadow shovel shrimp
skeleton sled snail spider sponge squirrel stadium statue storm submarine suitcase sunflower swamp
sweater sword table teacher telescope temple tennis theater thunder tiger toaster tomato tornado
tower tractor train treasure trumpet tulip tunnel turtle umbrella unicorn valley vase violin volcano
wagon walrus wallet waterfall whale whistle window wizard wolf yacht zebra
"""


def _no_substrings(words: Iterable[str]) -> tuple[str, ...]:
    """Drop words contained in another word: string match must not credit "art" for "party"."""
    unique = sorted(set(words))
    return tuple(w for w in unique if not any(w != o and w in o for o in unique))


ADJECTIVES = _no_substrings(_ADJECTIVES.split())
NOUNS = _no_substrings(_NOUNS.split())
WORDS = _no_substrings(ADJECTIVES + NOUNS)


@dataclass
class TaskConfig:
    """RULER's defaults for each task's shape."""

    haystack: str = "noise"  # "noise" (RULER's repeated sentences) or "corpus" (held-out text)
    corpus: str | None = None  # held-out .jsonl for haystack="corpus" (default: the spkv data corpus)
    multikey_distractors: int = 3
    multivalue_values: int = 4
    multiquery_keys: int = 4
    vt_chains: int = 1
    vt_hops: int = 4
    cwe_common: int = 10  # words to find
    cwe_freq_common: int = 30  # ... each appearing this often (lowered for short lengths, see _cwe)
    cwe_freq_rare: int = 3  # every other word appears this often
    fwe_alpha: float = 2.0  # Zipf exponent
    fwe_answers: int = 3
    answer_prefix: str = "base"  # "base" (for base models, see the module docstring) or "ruler"
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {
        "niah_single": 64, "niah_multikey": 64, "niah_multivalue": 64, "niah_multiquery": 64,
        "vt": 30, "cwe": 120, "fwe": 50,
    })

    def __post_init__(self) -> None:
        if self.answer_prefix not in ("base", "ruler"):
            raise ValueError(f"answer_prefix must be 'base' (base models) or 'ruler' (RULER's wording), got {self.answer_prefix!r}")


@dataclass
class Sample:
    """One prompt of one (task, length) cell."""

    task: str
    length: int  # target tokens: prompt + the answer's token budget
    index: int
    prompt: str
    answers: list[str]
    prompt_tokens: int
    max_new_tokens: int
    needles: list[str] = field(default_factory=list)  # statements inserted into the haystack (niah, vt)
    depths: list[float] = field(default_factory=list)  # their intended depth in the context, 0..1
    context_span: tuple[int, int] = (0, 0)  # [start, end) of the context in the prompt (characters)


@dataclass
class _Draft:
    """A sample whose context size is still open: render(n) builds the prompt with size parameter n."""

    render: Callable[[int], tuple[str, tuple[int, int]]]
    answers: list[str]
    needles: list[str] = field(default_factory=list)
    depths: list[float] = field(default_factory=list)


# -- haystacks ------------------------------------------------------------------------------------
class Haystack:
    """Filler text as units (sentences of RULER's noise, or words of held-out documents)."""

    def __init__(self, units: list[str], cycle: bool) -> None:
        self.units, self.cycle = units, cycle

    @classmethod
    def noise(cls) -> Haystack:
        return cls(list(NOISE), cycle=True)

    @classmethod
    def corpus(cls, path: str | Path | None = None, max_words: int = 400_000) -> Haystack:
        """Words of held-out documents in file order (never trained on); needs `spkv data`."""
        words: list[str] = []
        for doc in read_heldout(path):
            words += doc["text"].split()
            if len(words) >= max_words:
                break
        return cls(words[:max_words], cycle=False)

    def take(self, n: int, start: int) -> list[str]:
        """n consecutive units from `start` (wrapping around)."""
        size = len(self.units)
        if self.cycle:
            start = start % len(NOISE)
        return [self.units[(start + i) % size] for i in range(n)]


def make_haystack(config: TaskConfig) -> Haystack:
    if config.haystack == "noise":
        return Haystack.noise()
    if config.haystack == "corpus":
        return Haystack.corpus(config.corpus)
    raise ValueError(f"haystack must be 'noise' or 'corpus', got {config.haystack!r}")


def _insert(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Needles into the unit list at fractional depths; equal depths keep the needles' order."""
    out = list(units)
    for needle, depth in sorted(zip(needles, depths), key=lambda x: x[1], reverse=True):
        out.insert(round(depth * len(units)), needle)
    return out


def _wrap(head: str, context: str, tail: str) -> tuple[str, tuple[int, int]]:
    return head + context + tail, (len(head), len(head) + len(context))


# -- task drafts --------------------------------------------------------------------------------
def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _keys(rng: random.Random, k: int) -> list[str]:
    keys: set[str] = set()
    while len(keys) < k:
        keys.add(f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}")
    return rng.sample(sorted(keys), k)


def _niah(rng: random.Random, task: str, hay: Haystack, cfg: TaskConfig) -> _Draft:
    if task == "niah_single":
        keys, asked, per_key = _keys(rng, 1), 1, 1
    elif task == "niah_multikey":
        keys, asked, per_key = _keys(rng, 1 + cfg.multikey_distractors), 1, 1
    elif task == "niah_multivalue":
        keys, asked, per_key = _keys(rng, 1), 1, cfg.multivalue_values
    else:
        keys, asked, per_key = _keys(rng, cfg.multiquery_keys), cfg.multiquery_keys, 1
    values = {k: [_number(rng, 7) for _ in range(per_key)] for k in keys}
    needles = [f"One of the special magic numbers for {k} is: {v}." for k in keys for v in values[k]]
    depths = [rng.random() for _ in needles]
    start = rng.randrange(len(hay.units))
    query = _join_keys(keys[:asked])
    head = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n")
    answer = (f"The special magic numbers for {query} mentioned in the provided text are" if cfg.answer_prefix == "ruler"
              else f"The special magic number for {query} mentioned in the provided text is")
    tail = f"\nWhat are all the special magic numbers for {query} mentioned in the provided text? {answer}"

    def render(n: int) -> tuple[str, tuple[int, int]]:
        return _wrap(head, " ".join(_insert(hay.take(n, start), needles, depths)), tail)

    return _Draft(render, [v for k in keys[:asked] for v in values[k]], needles, depths)


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _vt(rng: random.Random, hay: Haystack, cfg: TaskConfig) -> _Draft:
    names = set()
    while len(names) < cfg.vt_chains * (cfg.vt_hops + 1):
        names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
    names = rng.sample(sorted(names), len(names))
    needles, depths, answers, query = [], [], [], ""
    for c in range(cfg.vt_chains):
        chain = names[c * (cfg.vt_hops + 1) : (c + 1) * (cfg.vt_hops + 1)]
        value = _number(rng, 5)
        statements = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        needles += statements
        depths += sorted(rng.random() for _ in statements)  # a chain is written in order
        if c == 0:
            answers, query = list(chain), value
    start = rng.randrange(len(hay.units))
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = (f"\nQuestion: Find all variables that are assigned the value {query} in the text above. "
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(answers)} "
            f"variables are assigned the value {query}, they are:" + (" VAR" if cfg.answer_prefix == "base" else ""))

    def render(n: int) -> tuple[str, tuple[int, int]]:
        return _wrap(head, " ".join(_insert(hay.take(n, start), needles, depths)), tail)

    return _Draft(render, answers, needles, depths)


def _pseudo_words(rng: random.Random, k: int, lengths: tuple[int, int], avoid: Iterable[str]) -> list[str]:
    """k distinct lowercase letter strings, none a substring of another or of `avoid` (and vice versa)."""
    avoid = list(avoid)
    out: list[str] = []
    while len(out) < k:
        w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(*lengths)))
        if not any(w in o or o in w for o in out + avoid):
            out.append(w)
    return out


def _cwe(rng: random.Random, cfg: TaskConfig, budget: int) -> list[_Draft]:
    """Candidates, largest first: RULER's frequencies, then lower ones and fewer common words, so
    short lengths still fit a list (RULER itself starts at 4k)."""
    pool = rng.sample(WORDS, len(WORDS))
    max_words = cfg.cwe_common + budget // (3 * cfg.cwe_freq_rare) + 1  # each entry costs >= 3 tokens
    if max_words > len(pool):  # beyond the built-in list: long pseudo-words, none hiding a real one
        pool += _pseudo_words(rng, max_words - len(pool), (8, 9), pool)
    order_seed = rng.random()
    floor = cfg.cwe_freq_rare + 2  # common words must still stand out
    shapes = [(cfg.cwe_common, cfg.cwe_freq_common)]
    while shapes[-1][1] > floor:
        shapes.append((cfg.cwe_common, max(floor, shapes[-1][1] // 2)))
    while shapes[-1][0] > 2:
        shapes.append((shapes[-1][0] // 2, floor))

    def draft(k: int, freq: int) -> _Draft:
        common, rare = pool[:k], pool[k:]
        head = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
        tail = (f"\nQuestion: What are the {k} most common words in the above list? "
                f"Answer: The top {k} words that appear most often in the list are:")

        def render(n: int) -> tuple[str, tuple[int, int]]:
            words = common * freq + rare[:n] * cfg.cwe_freq_rare
            random.Random(order_seed).shuffle(words)
            return _wrap(head, " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), tail)

        return _Draft(render, list(common))

    return [draft(k, f) for k, f in shapes]


def zipf_counts(total: int, ranks: int, alpha: float, strict_top: int) -> list[int]:
    """Deterministic Zipf counts summing to `total`; the first strict_top + 1 ranks strictly decreasing,
    so the answer (ranks 2..strict_top+1, rank 1 being the noise word) has no ties."""
    weights = [r**-alpha for r in range(1, ranks + 1)]
    scale = total / sum(weights)
    counts = [int(w * scale) for w in weights]
    for r in range(strict_top, -1, -1):  # from the tail up: each must beat the next
        nxt = counts[r + 1] if r + 1 < ranks else 0
        counts[r] = max(counts[r], nxt + 1)
    counts[0] += max(0, total - sum(counts))
    return counts


def _fwe(rng: random.Random, cfg: TaskConfig, budget: int) -> _Draft:
    vocab = max(cfg.fwe_answers + 3, int(math.sqrt(max(budget, 1))))  # enough for a long Zipf tail
    words = ["...."] + _pseudo_words(rng, vocab - 1, (3, 6), ["...."])
    order_seed = rng.random()
    head = ("Read the following coded text and track the frequency of each coded word. "
            f"Find the {_count_word(cfg.fwe_answers)} most frequently appeared coded words. ")
    tail = (f"\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
            f"{_count_word(cfg.fwe_answers)} most frequently appeared words in the above coded text? Answer: "
            f"According to the coded text above, the {_count_word(cfg.fwe_answers)} most frequently appeared words are:")

    def render(n: int) -> tuple[str, tuple[int, int]]:
        counts = zipf_counts(n, len(words), cfg.fwe_alpha, cfg.fwe_answers + 1)
        text = [w for w, c in zip(words, counts) for _ in range(c)]
        random.Random(order_seed).shuffle(text)
        return _wrap(head, " ".join(text), tail)

    return _Draft(render, words[1 : 1 + cfg.fwe_answers])


def _count_word(n: int) -> str:
    return {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}.get(n, str(n))


# -- fitting to a token length --------------------------------------------------------------------
def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens the model is fed for this prompt (special tokens included, as in the runner)."""
    return len(tokenizer(text, verbose=False).input_ids)


def _fit(draft: _Draft, tokenizer: Any, budget: int) -> tuple[str, tuple[int, int], int] | None:
    """The largest size whose prompt has <= budget tokens (binary search); None if even size 0 is too long."""
    cost = lambda n: count_tokens(tokenizer, draft.render(n)[0])  # noqa: E731
    if cost(0) > budget:
        return None
    lo, hi = 0, 1
    while cost(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    prompt, span = draft.render(lo)
    return prompt, span, cost(lo)


def make_sample(task: str, length: int, index: int, tokenizer: Any, seed: int = 0, config: TaskConfig | None = None,
                haystack: Haystack | None = None, max_new_tokens: int | None = None) -> Sample:
    """One sample: deterministic in (task, length, index, seed, tokenizer, config); the prompt fills
    length - max_new_tokens tokens (RULER leaves the answer's budget inside the length)."""
    cfg = config or TaskConfig()
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {', '.join(TASKS)}")
    new = max_new_tokens if max_new_tokens is not None else cfg.max_new_tokens[task]
    budget = length - new
    rng = random.Random(f"{seed}/{task}/{length}/{index}")  # str seeds are hashed stably (sha512)
    if task.startswith("niah"):
        drafts = [_niah(rng, task, haystack if haystack is not None else make_haystack(cfg), cfg)]
    elif task == "vt":
        drafts = [_vt(rng, Haystack.noise(), cfg)]  # RULER tracks variables in the noise haystack
    elif task == "cwe":
        drafts = _cwe(rng, cfg, budget)
    else:
        drafts = [_fwe(rng, cfg, budget)]
    for draft in drafts:
        fitted = _fit(draft, tokenizer, budget)
        if fitted is not None:
            prompt, span, tokens = fitted
            return Sample(task, length, index, prompt, draft.answers, tokens, new, draft.needles, draft.depths, span)
    raise ValueError(f"Length {length} is too short for task {task} (its template alone exceeds {budget} tokens)")


def calibration_set(tokenizer: Any, length: int, tasks: Iterable[str] = TASKS, seed: int = 0,
                    config: TaskConfig | None = None, max_new_tokens: int | None = None) -> HeldoutSet:
    """One prompt per task at `length`, index -1 (never evaluated), cut to the shortest so they stack.

    Why: a threshold that keeps 25% of prose keeps 4-30% of these prompts (repeated noise sentences,
    word lists), depending on the policy; matching density on the prompts the methods will see is
    what makes the suite's comparison fair."""
    cfg, tasks = config or TaskConfig(), list(tasks)
    hay = make_haystack(cfg) if any(t.startswith("niah") for t in tasks) else None
    samples = [make_sample(t, length, -1, tokenizer, seed, cfg, hay, max_new_tokens) for t in tasks]
    ids = [tokenizer(s.prompt, return_tensors="pt").input_ids[0] for s in samples]
    shortest = min(len(i) for i in ids)
    return HeldoutSet(torch.stack([i[:shortest] for i in ids]), [f"{s.task}/{length}/-1" for s in samples],
                      ["tasks"] * len(samples))


def build_suite(tokenizer: Any, lengths: Iterable[int], tasks: Iterable[str] = TASKS, samples_per_cell: int = 4,
                seed: int = 0, config: TaskConfig | None = None, max_new_tokens: int | None = None) -> list[Sample]:
    """Every (task, length, index) sample, index first: a run stopped part way has every cell at k
    or k + 1 samples, so its partial result is a balanced suite. The needle tasks' haystack is loaded once."""
    cfg, tasks, lengths = config or TaskConfig(), list(tasks), list(lengths)
    hay = make_haystack(cfg) if any(t.startswith("niah") for t in tasks) else None
    return [
        make_sample(task, length, i, tokenizer, seed, cfg, hay, max_new_tokens)
        for i in range(samples_per_cell) for task in tasks for length in lengths
    ]

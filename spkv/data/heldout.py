"""Held-out text: documents never trained on, read from `spkv data`'s heldout.jsonl (or a given file).

Every evaluation that needs held-out text reads it here: NLL sets, the density analysis, the task
suite's corpus haystack and the benchmarks' prompts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def heldout_path(corpus: str | Path | None = None) -> Path:
    """The held-out .jsonl: `corpus` if given, else the `spkv data` corpus's; a clear error if missing."""
    if corpus is None:
        from spkv.data.corpus import default_corpus

        return default_corpus() / "heldout.jsonl"
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"No held-out corpus at {path}: run `spkv data`, or give an existing .jsonl file.")
    return path


def read_heldout(corpus: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """Documents in file order: dicts with "id", "text" and (optionally) "source"."""
    with heldout_path(corpus).open(encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


def tokenized_heldout(tokenizer: Any, corpus: str | Path | None = None, min_len: int = 1,
                      max_len: int | None = None) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """(document, its first max_len token ids) for every document with at least min_len tokens."""
    for doc in read_heldout(corpus):
        ids = tokenizer(doc["text"], add_special_tokens=False).input_ids[:max_len]
        if len(ids) >= min_len:
            yield doc, ids


@dataclass
class HeldoutSet:
    """One sequence per held-out document (its first seq_len tokens), so density is per document."""

    input_ids: torch.Tensor  # [N, seq_len]
    doc_ids: list[str]
    sources: list[str]

    def subset(self, n: int) -> HeldoutSet:
        return HeldoutSet(self.input_ids[:n], self.doc_ids[:n], self.sources[:n])


def heldout_set(tokenizer: Any, seq_len: int = 2048, max_sequences: int = 16, corpus: str | Path | None = None) -> HeldoutSet:
    """The first `max_sequences` held-out documents with at least seq_len tokens, cut to seq_len."""
    rows, ids, sources = [], [], []
    for doc, tokens in tokenized_heldout(tokenizer, corpus, min_len=seq_len, max_len=seq_len):
        rows.append(tokens)
        ids.append(doc["id"])
        sources.append(doc.get("source", ""))
        if len(rows) == max_sequences:
            break
    if not rows:
        raise ValueError(f"No held-out document in {heldout_path(corpus)} has {seq_len} tokens: lower --seq-len.")
    return HeldoutSet(torch.tensor(rows), ids, sources)

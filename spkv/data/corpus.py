"""Offline text corpus and the plumbing that turns documents into fixed-length training sequences.

The corpus is fetched by package name (Debian packages and the interpreter's own standard library)
so that it can be rebuilt on a machine without a model or dataset hub and is never committed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from spkv.results import atomic_write_text

MIN_CHARS = 2000
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


class CorpusSourceError(RuntimeError):
    """A corpus source could not be fetched; the message names the source and the failing step."""


@dataclass(frozen=True)
class Document:
    """One corpus document; its id ("<source>/<file or name>"), hashed with the seed, decides its split."""

    id: str
    source: str
    text: str


@dataclass
class _Fetch:
    """What one source produced, plus the commands that produced it (recorded in the manifest)."""

    source: str
    documents: list[Document] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def run(self, args: Sequence[str], cwd: Path | None = None) -> str:
        command = " ".join(args)
        self.commands.append(command)
        try:
            done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
        except OSError as error:
            raise CorpusSourceError(f"source {self.source!r}: `{command}` could not start: {error}") from error
        if done.returncode != 0:
            raise CorpusSourceError(
                f"source {self.source!r}: `{command}` failed with exit code {done.returncode}:\n{done.stderr.strip()}"
            )
        return done.stdout

    def add(self, doc_id: str, text: str) -> None:
        self.documents.append(Document(f"{self.source}/{doc_id}", self.source, text))


def _debian_package(fetch: _Fetch, package: str, workdir: Path) -> Path:
    """Download a .deb without installing it (no root, no system changes) and unpack it; returns the root."""
    fetch.run(["apt-get", "download", package], cwd=workdir)
    (deb,) = workdir.glob(f"{package}_*.deb")
    fetch.run(["dpkg-deb", "-x", deb.name, package], cwd=workdir)
    return workdir / package


def _linux_doc(fetch: _Fetch, workdir: Path) -> None:
    root = _debian_package(fetch, "linux-doc-6.1", workdir) / "usr/share/doc/linux-doc-6.1/Documentation"
    for path in tqdm(sorted(root.rglob("*.rst.gz")), desc=fetch.source, unit="file"):
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        fetch.add(str(path.relative_to(root).with_suffix("")), text)


def _python_doc(fetch: _Fetch, workdir: Path) -> None:
    # The HTML build ships every page's reST source as _sources/**/*.rst.txt.
    root = _debian_package(fetch, "python3.11-doc", workdir) / "usr/share/doc/python3.11/html/_sources"
    for path in tqdm(sorted(root.rglob("*.rst.txt")), desc=fetch.source, unit="file"):
        fetch.add(str(path.relative_to(root).with_suffix("")), path.read_text(encoding="utf-8", errors="replace"))


def _austen(fetch: _Fetch, workdir: Path) -> None:
    """Read the novels from the R package's lazy-load database without needing R.

    Rdata.rdx (a gzipped RDS) maps each object to (offset, length) in Rdata.rdb; each block there is
    a 4-byte big-endian length followed by zlib-compressed R serialization of a character vector of lines.
    """
    try:
        import rdata
    except ImportError as error:
        raise CorpusSourceError(f"source {fetch.source!r} needs the rdata package: pip install rdata") from error
    data = _debian_package(fetch, "r-cran-janeaustenr", workdir) / "usr/lib/R/site-library/janeaustenr/data"
    index = rdata.read_rds(data / "Rdata.rdx")["variables"]
    blob = (data / "Rdata.rdb").read_bytes()
    for name, (offset, length) in sorted(index.items()):
        block = blob[offset : offset + length]
        (expected_size,) = struct.unpack(">I", block[:4])
        raw = zlib.decompress(block[4:])
        if len(raw) != expected_size:
            raise CorpusSourceError(f"source {fetch.source!r}: corrupt block for {name} in {data / 'Rdata.rdb'}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns about the missing RDS magic of lazy-load blocks
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        fetch.add(str(name), "\n".join(str(line) for line in lines))


_CHAPTER_HEADING = re.compile(r"^(\S.*) \d+$")


def _bible(fetch: _Fetch, workdir: Path) -> None:
    """One document per book, split on the chapter headings ("Genesis 1") of the `bible` command."""
    if shutil.which("bible") is None:
        fetch.run(["apt-get", "install", "-y", "bible-kjv"])
    # A huge line width keeps each verse on one line, so only headings start in column 0.
    text = fetch.run(["bible", "-l100000", "gen1:1-rev22:21"])
    books: dict[str, list[str]] = {}
    book = None
    for line in text.splitlines():
        heading = _CHAPTER_HEADING.match(line)
        if heading:
            book = heading.group(1)
        if book is not None:
            books.setdefault(book, []).append(line)
    if len(books) != 66:
        raise CorpusSourceError(f"source {fetch.source!r}: expected 66 books from `bible`, found {len(books)}")
    for number, (name, lines) in enumerate(books.items(), start=1):
        fetch.add(f"{number:02d}-{name.replace(' ', '-')}", "\n".join(lines).strip() + "\n")


def _python_stdlib(fetch: _Fetch, workdir: Path) -> None:
    """The running interpreter's standard library, without third-party packages or test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    fetch.commands.append(f"read {root}/**/*.py (Python {sys.version.split()[0]}), skipping tests and site-packages")
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    paths = [p for p in sorted(root.rglob("*.py")) if skipped.isdisjoint(p.relative_to(root).parts)]
    for path in tqdm(paths, desc=fetch.source, unit="file"):
        fetch.add(str(path.relative_to(root)), path.read_text(encoding="utf-8", errors="replace"))


SOURCES: dict[str, Callable[[_Fetch, Path], None]] = {
    "linux-doc": _linux_doc,
    "python-doc": _python_doc,
    "austen": _austen,
    "bible-kjv": _bible,
    "python-stdlib": _python_stdlib,
}


def split_documents(
    documents: Iterable[Document], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """(train, heldout) by a hash of each document's id and the seed, so the input order never matters.

    Documents hashing below heldout_fraction are held out. A source with several documents but none
    below it (Austen has six novels) holds out its lowest-hash one, so every source can be evaluated.
    Both lists are ordered by the hash: a deterministic shuffle that mixes the sources.
    """
    ordered = sorted(documents, key=lambda doc: (_unit_hash(doc.id, seed), doc.id))
    heldout_ids = {doc.id for doc in ordered if _unit_hash(doc.id, seed) < heldout_fraction}
    by_source: dict[str, list[Document]] = {}
    for doc in ordered:
        by_source.setdefault(doc.source, []).append(doc)
    for docs in by_source.values():
        if heldout_fraction > 0 and len(docs) > 1 and heldout_ids.isdisjoint(doc.id for doc in docs):
            heldout_ids.add(docs[0].id)
    return [doc for doc in ordered if doc.id not in heldout_ids], [doc for doc in ordered if doc.id in heldout_ids]


def _unit_hash(doc_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def build_corpus(
    out_dir: str | os.PathLike[str], heldout_fraction: float = 0.1, seed: int = 0, skip_missing: bool = False
) -> Path:
    """Fetch every source in SOURCES and write train.jsonl, heldout.jsonl and manifest.json to out_dir.

    A source that cannot be fetched raises CorpusSourceError, or with skip_missing=True is left out
    and its error recorded in the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    documents: list[Document] = []
    sources: dict[str, dict] = {}
    missing: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="spkv-corpus-") as scratch:
        for source, fetch_source in SOURCES.items():
            fetch = _Fetch(source)
            workdir = Path(scratch) / source
            workdir.mkdir()
            try:
                fetch_source(fetch, workdir)
                if not fetch.documents:
                    raise CorpusSourceError(f"source {source!r}: found no documents after {fetch.commands}")
            except CorpusSourceError as error:
                if not skip_missing:
                    raise
                missing[source] = {"error": str(error), "commands": fetch.commands}
                continue
            kept = [doc for doc in fetch.documents if len(doc.text) >= MIN_CHARS]
            documents += kept
            sources[source] = {"commands": fetch.commands, "skipped_tiny_documents": len(fetch.documents) - len(kept)}
    splits = dict(zip(("train", "heldout"), split_documents(documents, heldout_fraction, seed), strict=True))
    for split, docs in splits.items():
        atomic_write_text(out / f"{split}.jsonl", (json.dumps(asdict(doc), ensure_ascii=False) + "\n" for doc in docs))
        for source, stats in sources.items():
            texts = [doc.text for doc in docs if doc.source == source]
            stats[f"{split}_documents"], stats[f"{split}_chars"] = len(texts), sum(map(len, texts))
    manifest = {
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "min_chars": MIN_CHARS,
        "sources": sources,
        "missing": missing,
        "totals": {
            f"{split}_{unit}": sum(len(doc.text) if unit == "chars" else 1 for doc in docs)
            for split, docs in splits.items()
            for unit in ("documents", "chars")
        },
    }
    atomic_write_text(out / "manifest.json", [json.dumps(manifest, indent=2) + "\n"])
    return out


def iter_documents(path_or_paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Yield document texts from corpus splits (.jsonl), text files, folders of text files, or HF dataset names.

    A folder yields its .txt/.md/.rst/.py files recursively in sorted order, one document per file.
    A string that is not an existing path is loaded with datasets.load_dataset (split "train", field "text").
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        path_or_paths = [path_or_paths]
    for item in path_or_paths:
        path = Path(item)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES):
                yield file.read_text(encoding="utf-8", errors="replace")
        elif path.is_file() and path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as lines:
                yield from (json.loads(line)["text"] for line in lines if line.strip())
        elif path.is_file():
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix in (*TEXT_SUFFIXES, ".jsonl"):
            raise FileNotFoundError(f"No such corpus file: {path}")  # a typo, not a dataset name
        else:
            import datasets

            yield from (row["text"] for row in datasets.load_dataset(str(item), split="train", streaming=True))


def pack_sequences(
    token_id_iter: Iterable[Sequence[int]], seq_len: int, eos_id: int | None = None
) -> Iterator[list[int]]:
    """Concatenate tokenized documents and cut the stream into sequences of exactly seq_len ids.

    With eos_id, it is appended after every document so the model sees where documents end;
    without it, the caller's token lists are joined as given. The final partial sequence is dropped.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    buffer: list[int] = []
    for ids in token_id_iter:
        buffer.extend(ids)
        if eos_id is not None:
            buffer.append(eos_id)
        start = 0
        while len(buffer) - start >= seq_len:
            yield buffer[start : start + seq_len]
            start += seq_len
        del buffer[:start]


def corpus_dir() -> Path:
    from spkv.models import cache_root

    return Path(os.environ.get("SPKV_CORPUS", cache_root() / "corpus"))


def default_corpus() -> Path:
    """The offline corpus built by `spkv data`; a clear error if it is missing."""
    path = corpus_dir()
    if not (path / "train.jsonl").exists():
        raise FileNotFoundError(f"No corpus at {path}: build it with `spkv data --out {path}` (or pass --data FILES).")
    return path

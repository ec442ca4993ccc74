"""Fixtures shared by the test modules (plain helpers live in tests/tiny_models.py).

No test module imports another: what two modules share is here or in tests/tiny_models.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .tiny_models import save_tiny_pretrained


@pytest.fixture()
def one_thread():
    """Tiny models gain nothing from threads; on a shared, loaded CPU two threads run ~50x slower.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def offline(monkeypatch):
    """No Hugging Face Hub or datasets downloads: everything a test loads is local."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture()
def tiny_pretrained(tmp_path) -> Callable[..., Path]:
    """A factory: `tiny_pretrained("model", words=60, family="llama", **config)` saves a loadable tiny
    checkpoint folder (random model + word-level tokenizer "w0" ... "wN") under tmp_path and returns it."""

    def make(name: str = "model", **kw) -> Path:
        return save_tiny_pretrained(tmp_path / name, **kw)

    return make

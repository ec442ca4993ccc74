"""What the decode and prefill benchmarks share: models and prompts, cache fills, KV accounting,
settings from CLI values, console summaries."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import fields, replace
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

from spkv.bench.machine import MIB, weight_bytes, weight_bytes_read
from spkv.cache import SPKVCache
from spkv.cache_layer import SPKVLayer
from spkv.compat import CACHE_ARG
from spkv.config import SPKVConfig
from spkv.convert import convert
from spkv.stats import cache_stats

TINY = "tiny"  # --model tiny: a small random Llama built in memory (no tokenizer, random ids)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama (hidden 64, 2 layers, 4 query / 2 KV heads); the same weights for the same seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def load_base(name: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer or None) for a spkv.load_model name/path, or `tiny`."""
    if name == TINY:
        return build_tiny_model(dtype), None
    from spkv.models import load_model

    return load_model(name, dtype=dtype)


class ModelPool:
    """Loads each model variant once, on first use: `base` (unconverted), `converted` (spkv.convert
    with untrained predictors), `adapter` (--adapter loaded), `export` (the plain transformers
    model of `spkv hybrid export`, loaded without spkv) and `export-sliding` (it with every layer sliding)."""

    def __init__(self, name: str, dtype: torch.dtype, window: int, adapter: str | None, export: str | None = None) -> None:
        self.name, self.dtype, self.window, self.adapter, self.export = name, dtype, window, adapter, export
        self.models: dict[str, torch.nn.Module] = {}
        self.tokenizer: Any = None
        self._prompts: dict[tuple[int, int], tuple[torch.Tensor, str]] = {}

    def get(self, variant: str) -> torch.nn.Module:
        if variant.startswith("export") and variant not in self.models:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.export)
            if variant == "export-sliding":  # the same weights with every layer sliding
                config.layer_types = ["sliding_attention"] * config.num_hidden_layers
            self.models[variant] = AutoModelForCausalLM.from_pretrained(self.export, config=config, dtype=self.dtype).eval()
        if variant not in self.models:
            model, tokenizer = load_base(self.name, self.dtype)
            self.tokenizer = self.tokenizer or tokenizer
            if variant == "converted":
                convert(model, SPKVConfig(window=self.window))
            elif variant == "adapter":
                from spkv.adapter import load_adapter

                load_adapter(model, self.adapter)
            self.models[variant] = model
        return self.models[variant]

    def prompt(self, context: int, batch: int) -> tuple[torch.Tensor, str]:
        """The same prompt for every cache at one (context, batch): see make_prompt."""
        if (context, batch) not in self._prompts:
            vocab = self.get("base").config.get_text_config(decoder=True).vocab_size
            self._prompts = {(context, batch): make_prompt(self.tokenizer, vocab, context, batch)}  # keep one
        return self._prompts[(context, batch)]


def heldout_ids(tokenizer: Any, context: int, batch: int) -> torch.Tensor | None:
    """[batch, context] consecutive token slices of the held-out corpus (None if there is none)."""
    if tokenizer is None:
        return None
    from spkv.data.heldout import heldout_path, read_heldout

    try:
        heldout_path()
    except FileNotFoundError:
        return None
    need, stream = context * batch, []
    eos = tokenizer.eos_token_id
    for doc in read_heldout():
        stream += tokenizer(doc["text"], add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        if len(stream) >= need:
            break
    if not stream:
        return None
    stream = (stream * math.ceil(need / len(stream)))[:need]  # wraps around only for a tiny corpus
    return torch.tensor(stream).view(batch, context)


def make_prompt(tokenizer: Any, vocab_size: int, context: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Held-out text when a tokenizer and the corpus exist, else random ids; returns (ids, source)."""
    ids = heldout_ids(tokenizer, context, batch)
    if ids is not None:
        return ids, "heldout text"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, context), generator=g), "random ids"


def chunked_prefill(model: torch.nn.Module, cache: Cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Run the prompt through the model in chunks with `cache`; returns the greedy next token [B, 1]."""
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, start:start + chunk], **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def kv_head_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(KV heads, head dim) of the model's attention layers."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def synthetic_fill(model: torch.nn.Module, cache: Cache, batch: int, context: int, chunk: int, seed: int = 0) -> torch.Tensor:
    """Fill `cache` with `context` tokens of random keys/values ([B, Hkv, n, head_dim], the model's
    dtype) without running the model; returns a random next token [B, 1] to decode from.

    Every write goes through the cache's own code: transformers layers get `cache.update`; SP-KV
    gated layers get, per chunk, what a forward gives them minus the attention (zero gate logits,
    no padding, `update`, then the eviction of what left the window), so the kept set follows the
    policy's real decisions. Chunks are visited chunk-major, layer-minor like a chunked prefill, so a
    RandomPolicy draws the same scores in the same order as with `model` fill. Plain DynamicLayers get
    one update of the whole context each (appending chunk by chunk would re-copy the layer each time).
    """
    hkv, head_dim = kv_head_shape(model)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    gen = torch.Generator(device=device).manual_seed(seed)
    config = model.config.get_text_config(decoder=True)
    num_layers = config.num_hidden_layers
    gated = {layer.layer_idx: layer for layer in cache.spkv_layers()} if isinstance(cache, SPKVCache) else {}
    if any(layer.policy.needs_attention for layer in gated.values()):
        raise ValueError("synthetic fill cannot drive a policy that scores by attention received: use --fill model")

    def rand(n: int) -> torch.Tensor:
        return torch.empty(batch, hkv, n, head_dim, dtype=dtype, device=device).normal_(generator=gen)

    def one_shot(i: int) -> bool:
        return i not in gated and i < len(cache.layers) and type(cache.layers[i]) is DynamicLayer

    with torch.no_grad():
        for i in range(num_layers):
            if one_shot(i):
                keys, values = torch.empty(2, batch, hkv, context, head_dim, dtype=dtype, device=device)
                for start in range(0, context, chunk):  # bounded temporaries; one append
                    keys[:, :, start:start + chunk].normal_(generator=gen)
                    values[:, :, start:start + chunk].normal_(generator=gen)
                cache.update(keys, values, i)
                del keys, values
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            for i in range(num_layers):
                if i in gated:
                    layer = gated[i]
                    layer.spkv_config = model.spkv_config
                    layer.staged_logits = torch.zeros(batch, n, hkv, device=device)
                    layer.pending_valid = None
                    layer.update(rand(n), rand(n))
                    layer._evict(layer.seen - layer.window)
                elif not one_shot(i):
                    cache.update(rand(n), rand(n), i)
    if isinstance(cache, SPKVCache):  # what begin_forward would have recorded
        cache.tokens_seen, cache.num_sequences = context, batch
    return torch.randint(3, config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(seed)).to(device)


def _layer_nbytes(layer: Any) -> int:
    if not getattr(layer, "is_initialized", False) or getattr(layer, "keys", None) is None:
        return 0
    return layer.keys.nbytes + layer.values.nbytes


def kv_bytes(cache: Cache) -> dict[str, Any]:
    """Bytes held and bytes a decode step reads; for an SPKVCache also its density.

    Full caches read what they hold. The SP-KV cache reads its kept pairs + the window (not the
    unused capacity of its stores); any ordinary (e.g. sliding) layers count in full."""
    other = sum(_layer_nbytes(layer) for layer in cache.layers if not isinstance(layer, SPKVLayer))
    if not isinstance(cache, SPKVCache):
        return {"held": other, "read": other}
    stats = cache_stats(cache)
    out = {
        "held": stats.bytes_held + other, "read": stats.bytes_used + other, "full": stats.bytes_full + other,
        "density": stats.density, "density_token_weighted": stats.density_token_weighted,
    }
    budgeted = [x for x in cache.spkv_layers() if x.is_initialized and x.shares is not None]
    if budgeted:  # eviction under a budget: what the budget allows, (share x left-the-window + sinks + window) pairs
        from spkv.lkv import budget_limits

        out["budget"] = other + sum(
            (int(budget_limits(x.shares, x.decided, x.sinks_stored).sum()) + x.window * x.batch_size * x.num_kv_heads)
            * x.bytes_per_pair for x in budgeted)
    return out


def settings_from(cls: type, given: dict[str, Any], quick_overrides: dict[str, Any] | None = None) -> Any:
    """Settings dataclass from the given values (None = not given; other keys ignored), on top of the
    defaults, or of `quick_overrides` when given."""
    base = cls(**quick_overrides) if quick_overrides else cls()
    names = {f.name for f in fields(cls)}
    return replace(base, **{k: v for k, v in given.items() if v is not None and k in names})


def model_info(model: torch.nn.Module, name: str, dtype: str) -> dict[str, Any]:
    config = model.config.get_text_config(decoder=True)
    return {
        "name": name, "dtype": dtype, "model_type": config.model_type, "layers": config.num_hidden_layers,
        "kv_heads": config.num_key_value_heads, "max_positions": getattr(config, "max_position_embeddings", None),
        "weight_bytes": weight_bytes(model), "weight_bytes_read_per_step": weight_bytes_read(model),
    }


def _mib(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x / MIB:.1f}" if x >= 10 * MIB else f"{x / MIB:.3g}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(x: float | None, signed: bool = False) -> str:
    return "" if x is None else f"{100 * x:{'+' if signed else ''}.1f}%"


def iter_summary(result: dict[str, Any]) -> Iterator[str]:
    """Short console lines for a finished run."""
    key = "cache" if result["benchmark"] == "decode" else "config"
    for r in result["rows"]:
        if r["status"] != "ok":
            yield f"{r[key]:>14} ctx={r['context']:<6} B={r['batch']:<2} {r['status']}"
        elif result["benchmark"] == "decode":
            yield (f"{r[key]:>14} ctx={r['context']:<6} B={r['batch']:<2} {r['step_ms']:8.2f} ms  "
                   f"{r['tokens_per_s']:8.1f} tok/s  vs static {_num(r['speedup_vs_static'])}  "
                   f"KV {r['kv_bytes_held'] / MIB:.2f} MiB  meas/pred {r['measured_over_predicted']:.2f}")
        else:
            yield (f"{r[key]:>14} ctx={r['context']:<6} B={r['batch']:<2} {r['seconds']:8.3f} s  "
                   f"{r['tokens_per_s']:8.1f} tok/s  vs dynamic {_num(r['time_vs_dynamic'])}")

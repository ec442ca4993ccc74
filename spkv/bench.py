"""Speed and memory benchmarks (protocols.md, "Speed and memory").

`run_decode`: median decode step time of one model across caches, contexts and batch sizes, all in
one process so the ratios between caches are comparable. Each row also gives the KV bytes held and
read, the weight bytes, peak process memory, and the memory-bandwidth bound
(weight bytes + KV bytes read) / bandwidth, with the bandwidth measured in the same run.

`run_prefill`: time and memory of chunked long-prompt prefill: the unconverted model with a
DynamicCache vs the converted model with an SPKVCache, plus the predictors' overhead (the converted
model keeping every pair, and the predictors timed alone).

Cache names (decode):
    dynamic       unconverted model, transformers' DynamicCache
    static        unconverted model, transformers' StaticCache preallocated for the whole run
    spkv-adapter  the model with --adapter loaded, decisions by its predictors
    density-P     converted model, RandomPolicy(threshold=1 - P/100): a forced density of P%
    window-only   converted model, StreamingLLM and no sinks: nothing kept outside the window

How a decode row's cache is filled with its `context` tokens (--fill):
    synthetic  (default) random keys/values of the model's exact shapes and dtype, written through
               each cache's own update (and, for SP-KV, its own eviction under the row's policy) in
               prefill-sized chunks, without running the model: minutes instead of hours at 32k x 8.
               spkv-adapter rows still use `model` (their decisions need the real predictors on real
               text) and are skipped above --max-model-fill-tokens.
    model      the model's chunked prefill over the prompt.
Either way the timed decode steps are real forwards of the model with that cache.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.cache_utils import Cache, DynamicLayer

from .cache import CACHE_ARG, SPKVCache, SPKVLayer, cache_stats
from .config import SPKVConfig
from .convert import convert, predictors
from .policies import RandomPolicy, SPKVPolicy, StreamingLLM
from .policies.base import ScoringPolicy
from .results import atomic_write_text, provenance, pyplot, save_figure, write_json

TINY = "tiny"  # --model tiny: a small random Llama built in memory (no tokenizer, random ids)
MIB = 2**20
GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CACHES = ["dynamic", "static", "spkv-adapter", "density-10", "density-25", "density-50", "window-only"]


# ---------------------------------------------------------------------------------------------
# Models and prompts
# ---------------------------------------------------------------------------------------------


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
    from .models import load_model

    return load_model(name, dtype=dtype)


class ModelPool:
    """Loads each model variant once, on first use: `base` (unconverted), `converted` (spkv.convert
    with untrained predictors) and `adapter` (--adapter loaded)."""

    def __init__(self, name: str, dtype: torch.dtype, window: int, adapter: str | None) -> None:
        self.name, self.dtype, self.window, self.adapter = name, dtype, window, adapter
        self.models: dict[str, torch.nn.Module] = {}
        self.tokenizer: Any = None
        self._prompts: dict[tuple[int, int], tuple[torch.Tensor, str]] = {}

    def get(self, variant: str) -> torch.nn.Module:
        if variant not in self.models:
            model, tokenizer = load_base(self.name, self.dtype)
            self.tokenizer = self.tokenizer or tokenizer
            if variant == "converted":
                convert(model, SPKVConfig(window=self.window))
            elif variant == "adapter":
                from .adapter import load_adapter

                load_adapter(model, self.adapter)
            self.models[variant] = model
        return self.models[variant]

    def prompt(self, context: int, batch: int) -> tuple[torch.Tensor, str]:
        """The same prompt for every cache at one (context, batch): see make_prompt."""
        if (context, batch) not in self._prompts:
            vocab = self.get("base").config.get_text_config(decoder=True).vocab_size
            self._prompts = {(context, batch): make_prompt(self.tokenizer, vocab, context, batch)}  # keep one
        return self._prompts[(context, batch)]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (shared tensors counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Parameter bytes a decode step reads: all of them, except an untied input embedding table
    (a step reads only B of its rows)."""
    total = weight_bytes(model)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp.weight is not out.weight:
        total -= inp.weight.numel() * inp.weight.element_size()
    return total


def heldout_ids(tokenizer: Any, context: int, batch: int) -> torch.Tensor | None:
    """[batch, context] consecutive token slices of the held-out corpus (None if there is none)."""
    if tokenizer is None:
        return None
    from .data import iter_documents
    from .train import default_corpus

    try:
        path = default_corpus() / "heldout.jsonl"
    except FileNotFoundError:
        return None
    if not path.is_file():
        return None
    need, stream = context * batch, []
    eos = tokenizer.eos_token_id
    for text in iter_documents(path):
        stream += tokenizer(text, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
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


# ---------------------------------------------------------------------------------------------
# Machine measurements
# ---------------------------------------------------------------------------------------------


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with this many torch intra-op threads (None: unchanged), then restore the previous count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Memory bandwidth from a large tensor copy: 2 * bytes / time (a copy reads and writes)."""
    n = mib * MIB // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    del src, dst
    median = statistics.median(times)
    return {"bytes_per_s": 2 * n * 4 / median, "copy_mib": mib, "copy_seconds": times, "threads": torch.get_num_threads()}


def rss_peak_mib() -> float:
    """Peak resident memory of this process so far (monotone over the whole run)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / MIB  # kB on Linux, bytes on macOS


def rss_now_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        return None


class RSSSampler:
    """Context manager: samples the current RSS in a thread; `peak_delta_mib` = peak - RSS at entry."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.baseline = self.peak = rss_now_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_now_mib()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)

    def __enter__(self) -> "RSSSampler":
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        now = rss_now_mib()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    @property
    def peak_delta_mib(self) -> float | None:
        return None if self.baseline is None else self.peak - self.baseline


# ---------------------------------------------------------------------------------------------
# KV accounting
# ---------------------------------------------------------------------------------------------


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
    return {
        "held": stats.bytes_held + other, "read": stats.bytes_used + other, "full": stats.bytes_full + other,
        "density": stats.density, "density_token_weighted": stats.density_token_weighted,
    }


def full_kv_bytes(config: Any, context: int, batch: int, element_size: int) -> int:
    """What a full cache of `context` tokens holds (sliding layers hold at most their window)."""
    config = config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * batch * config.num_key_value_heads * head_dim * element_size
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or context
    return sum(per_token * (context if t == "full_attention" else min(context, window)) for t in types)


# ---------------------------------------------------------------------------------------------
# Decode benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class DecodeSettings:
    model: str = "smollm2-135m"
    adapter: str | None = None
    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 8192, 16384, 32768])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    caches: list[str] = field(default_factory=lambda: list(DEFAULT_CACHES))
    steps: int = 16
    warmup: int = 3
    repeats: int = 3
    prefill_chunk: int = 1024  # also the chunk of the synthetic fill
    window: int = 128
    max_kv_gib: float = 12.0
    fill: str = "synthetic"  # synthetic | model: see the module docstring
    max_model_fill_tokens: int = 16384  # with fill=synthetic: skip model-filled rows over context x batch
    bandwidth_mib: int = 512
    dtype: str = "float32"
    threads: int | None = None  # torch threads (None: torch's default)
    out: str = "results/bench"


QUICK_DECODE = dict(model=TINY, contexts=[64, 160], batch_sizes=[1, 2], steps=3, warmup=1, repeats=2,
                    prefill_chunk=64, window=16, bandwidth_mib=64, threads=1)


def settings_from(cls: type, given: dict[str, Any], quick_overrides: dict[str, Any] | None = None) -> Any:
    """Settings dataclass from the given values (None = not given; other keys ignored), on top of the
    defaults, or of `quick_overrides` when given."""
    base = cls(**quick_overrides) if quick_overrides else cls()
    names = {f.name for f in fields(cls)}
    return replace(base, **{k: v for k, v in given.items() if v is not None and k in names})


@dataclass
class CacheSpec:
    name: str
    variant: str  # which model: base | converted | adapter
    policy: ScoringPolicy | None = None
    sinks: int | None = None
    kv_fraction: float = 1.0  # expected share of a full cache's bytes (for the memory budget)


def parse_cache(name: str) -> CacheSpec:
    if name in ("dynamic", "static"):
        return CacheSpec(name, "base")
    if name == "spkv-adapter":
        return CacheSpec(name, "adapter")
    if name == "window-only":
        return CacheSpec(name, "converted", StreamingLLM(threshold=0.0), sinks=0, kv_fraction=0.0)
    if name.startswith("density-"):
        try:
            percent = float(name.split("-", 1)[1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise ValueError(f"cache {name!r}: density-P needs P in (0, 100]")
        return CacheSpec(name, "converted", RandomPolicy(threshold=1 - percent / 100, seed=0), kv_fraction=percent / 100)
    raise ValueError(f"unknown cache {name!r}; choose from dynamic, static, spkv-adapter, density-P, window-only")


def make_cache(spec: CacheSpec, model: torch.nn.Module, max_len: int) -> Cache:
    if spec.name == "dynamic":
        return DynamicCache(config=model.config)
    if spec.name == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    policy = replace(spec.policy) if spec.policy is not None else None  # fresh state (RandomPolicy's generator)
    cache = SPKVCache(model, policy=policy, sinks=spec.sinks)
    cache.max_positions = None  # speed only: allow contexts beyond the model's trained positions
    return cache


@dataclass
class DecodeRow:
    """One (cache, context, batch) measurement. Times in ms, memory in bytes or MiB as named."""

    cache: str
    context: int
    batch: int
    status: str = "ok"  # ok | skipped: ... | error: ...
    step_ms: float | None = None  # median over all timed steps
    step_ms_repeat_means: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None  # batch / step time
    speedup_vs_static: float | None = None  # static's step time / this one's (> 1: faster)
    speedup_vs_dynamic: float | None = None
    kv_bytes_held: int | None = None
    kv_bytes_read: int | None = None
    kv_bytes_full: int | None = None  # a full cache of the same tokens (reference)
    density: float | None = None  # SP-KV caches: kept / decided out-of-window pairs
    density_token_weighted: float | None = None
    weight_bytes_read: int | None = None
    predicted_ms: float | None = None  # (weight bytes + KV bytes read) / bandwidth
    measured_over_predicted: float | None = None
    fill: str = ""  # how the cache was filled: synthetic | model
    fill_s: float | None = None  # seconds of the fill (for information)
    row_peak_rss_delta_mib: float | None = None  # sampled peak RSS during this row - RSS before it
    rss_peak_so_far_mib: float | None = None  # ru_maxrss: monotone over the process
    beyond_model_positions: bool = False
    prompt: str = ""


def time_decode(model: torch.nn.Module, cache: Cache, token: torch.Tensor, warmup: int, steps: int, repeats: int) -> list[list[float]]:
    """Seconds of each timed single-token step ([repeats][steps]); step = forward + greedy pick."""
    times = []
    with torch.no_grad():
        for i in range(warmup + steps * repeats):
            start = time.perf_counter()
            out = model(input_ids=token, **{CACHE_ARG: cache}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
    return [times[r * steps:(r + 1) * steps] for r in range(repeats)]


FILLS = ("synthetic", "model")


def row_fill(s: DecodeSettings, spec: CacheSpec) -> str:
    """The adapter's decisions need its predictors on real text: always model-filled."""
    if s.fill not in FILLS:
        raise ValueError(f"fill {s.fill!r}: choose from {', '.join(FILLS)}")
    return "model" if spec.variant == "adapter" else s.fill


def fill_cache(model: torch.nn.Module, cache: Cache, fill: str, ids: torch.Tensor | None, batch: int, context: int,
               chunk: int) -> torch.Tensor:
    """Fill `cache` with `context` tokens by `fill`; returns the token [B, 1] to decode from."""
    if fill == "model":
        return chunked_prefill(model, cache, ids, chunk)
    return synthetic_fill(model, cache, batch, context, chunk)


def expected_kv_bytes(s: DecodeSettings, spec: CacheSpec, model: torch.nn.Module, context: int, batch: int) -> float:
    """KV bytes the row's cache is expected to hold at the end of the run (the memory budget's estimate)."""
    element = next(model.parameters()).element_size()
    full = full_kv_bytes(model.config, context + s.warmup + s.steps * s.repeats, batch, element)
    window_share = min(1.0, s.window / context) if spec.variant != "base" else 0.0
    return full * min(1.0, spec.kv_fraction + window_share)


def skip_reason(s: DecodeSettings, spec: CacheSpec, pool: ModelPool, context: int, batch: int) -> str | None:
    """Why a row will not run (None: it runs)."""
    if spec.variant == "adapter" and not s.adapter:
        return "skipped: no --adapter"
    if row_fill(s, spec) != s.fill and context * batch > s.max_model_fill_tokens:
        return (f"skipped: model fill too long (context x batch {context * batch} > "
                f"--max-model-fill-tokens {s.max_model_fill_tokens})")
    estimate = expected_kv_bytes(s, spec, pool.get(spec.variant), context, batch)
    if estimate > s.max_kv_gib * GIB:
        return f"skipped: memory (estimated KV {estimate / GIB:.1f} GiB > --max-kv-gib {s.max_kv_gib})"
    return None


def decode_row(s: DecodeSettings, spec: CacheSpec, pool: ModelPool, context: int, batch: int, bandwidth: float) -> DecodeRow:
    """Fill a fresh cache with `context` tokens, then time single-token decode steps."""
    row = DecodeRow(spec.name, context, batch, fill=row_fill(s, spec))
    reason = skip_reason(s, spec, pool, context, batch)
    if reason is not None:
        row.status = reason
        return row
    extra = s.warmup + s.steps * s.repeats
    model = pool.get(spec.variant)
    element = next(model.parameters()).element_size()
    row.beyond_model_positions = context + extra > (getattr(model.config, "max_position_embeddings", None) or math.inf)
    ids, row.prompt = pool.prompt(context, batch) if row.fill == "model" else (None, "synthetic (random K/V)")
    with RSSSampler() as rss:
        cache = make_cache(spec, model, context + extra)
        start = time.perf_counter()
        token = fill_cache(model, cache, row.fill, ids, batch, context, s.prefill_chunk)
        row.fill_s = time.perf_counter() - start
        timed = time_decode(model, cache, token, s.warmup, s.steps, s.repeats)
    all_steps = [t for rep in timed for t in rep]
    row.step_ms = 1000 * statistics.median(all_steps)
    row.step_ms_repeat_means = [1000 * statistics.fmean(rep) for rep in timed]
    row.tokens_per_s = batch / (row.step_ms / 1000)
    kv = kv_bytes(cache)
    row.kv_bytes_held, row.kv_bytes_read = kv["held"], kv["read"]
    row.kv_bytes_full = kv.get("full", full_kv_bytes(model.config, context + extra, batch, element))
    row.density, row.density_token_weighted = kv.get("density"), kv.get("density_token_weighted")
    row.weight_bytes_read = weight_bytes_read(model)
    row.predicted_ms = 1000 * (row.weight_bytes_read + row.kv_bytes_read) / bandwidth
    row.measured_over_predicted = row.step_ms / row.predicted_ms
    row.row_peak_rss_delta_mib = rss.peak_delta_mib
    row.rss_peak_so_far_mib = rss_peak_mib()
    return row


def _model_fill_flops(model: torch.nn.Module, context: int, batch: int) -> float:
    """Rough FLOPs of a prefill of `context` tokens: weights + attention over the prefix (mean context / 2)."""
    config = model.config.get_text_config(decoder=True)
    _, head_dim = kv_head_shape(model)
    attention = 4 * (context / 2) * config.num_attention_heads * head_dim * config.num_hidden_layers
    return batch * context * (2 * weight_bytes(model) / next(model.parameters()).element_size() + attention)


def estimate_decode(s: DecodeSettings, specs: list[CacheSpec], pool: ModelPool, bandwidth: float,
                    plan: list[tuple[int, int, CacheSpec]]) -> dict[str, Any]:
    """Rough run time, before starting: per row, fill + (warmup + steps x repeats) decode steps.

    Calibrated here per kind of cache (dynamic, static, SP-KV per model variant) and batch size: a
    synthetic fill of a short context (<= 512 tokens; the second of two, so first-call costs do not
    count) and of a 4x longer one, each followed by 1 + 2 decode steps; model fill from one short
    prefill (<= 256 tokens, batch 1) of the variant the rows use. Scaled to each row: synthetic fill
    linearly in tokens x batch, plus the first touch of the memory the cache will hold (measured
    separately: small calibration fills reuse freed memory, big caches fault in fresh pages); model
    fill in FLOPs (weights + attention over the prefix); a step linearly in the KV bytes it reads,
    through the two calibration points (at least 1 / bandwidth per byte); plus the per-row garbage
    collection. Model loading is not counted."""
    steps = s.warmup + s.steps * s.repeats
    start = time.perf_counter()
    gc.collect()
    row_overhead = time.perf_counter() - start
    touch_bytes = 256 * MIB
    for _ in range(2):  # fresh pages each time (a large allocation is its own mapping)
        start = time.perf_counter()
        torch.zeros(touch_bytes // 4)
        touch_rate = touch_bytes / (time.perf_counter() - start)
    short = max(1, min(512, min(s.contexts)))
    longer = max(short, min(4 * short, max(s.contexts)))
    # (kind, batch) -> (fill s/token, step s at `short`, KV bytes read at `short`, step s per KV byte read)
    calibrated: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    model_flops: dict[str, float] = {}  # variant -> model fill FLOP/s

    def calibrate(spec: CacheSpec, model: torch.nn.Module, batch: int, context: int, repeat: int) -> tuple[float, float, float]:
        for _ in range(repeat):
            cache = make_cache(spec, model, context + 4)
            start = time.perf_counter()
            token = synthetic_fill(model, cache, batch, context, s.prefill_chunk)
            fill_per_token = (time.perf_counter() - start) / (context * batch)
        times = [t for rep in time_decode(model, cache, token, 1, 2, 1) for t in rep]
        return fill_per_token, min(times), kv_bytes(cache)["read"]
    rows = []
    for context, batch, spec in plan:
        reason = skip_reason(s, spec, pool, context, batch)
        if reason is not None:
            rows.append({"cache": spec.name, "context": context, "batch": batch, "fill_s": 0.0, "step_s": 0.0,
                         "total_s": row_overhead})
            continue
        model, fill = pool.get(spec.variant), row_fill(s, spec)
        kind = (spec.name if spec.variant == "base" else f"spkv:{spec.variant}", batch)
        if kind not in calibrated:
            per_token, step_short, read_short = calibrate(spec, model, batch, short, 2)
            slope = 1 / bandwidth
            if longer > short:
                _, step_long, read_long = calibrate(spec, model, batch, longer, 1)
                if read_long > 1.1 * read_short:
                    slope = max(slope, (step_long - step_short) / (read_long - read_short))
            calibrated[kind] = (per_token, step_short, read_short, slope)
            gc.collect()
        if fill == "model" and spec.variant not in model_flops:
            n = max(1, min(256, s.prefill_chunk, min(s.contexts)))
            ids = torch.randint(3, model.config.get_text_config(decoder=True).vocab_size, (1, n))
            start = time.perf_counter()
            chunked_prefill(model, make_cache(spec, model, n), ids, s.prefill_chunk)
            model_flops[spec.variant] = _model_fill_flops(model, n, 1) / (time.perf_counter() - start)
        per_token, step_s, kv_read, per_byte = calibrated[kind]
        held = expected_kv_bytes(s, spec, model, context, batch)
        if fill == "model":
            fill_s = _model_fill_flops(model, context, batch) / model_flops[spec.variant]
        else:
            fill_s = per_token * context * batch
        fill_s += held / touch_rate
        step_s += max(0.0, held - kv_read) * per_byte
        rows.append({"cache": spec.name, "context": context, "batch": batch, "fill_s": fill_s, "step_s": step_s,
                     "total_s": fill_s + steps * step_s + row_overhead})
    fill_total, total = sum(r["fill_s"] for r in rows), sum(r["total_s"] for r in rows)
    return {"total_s": total, "fill_s": fill_total, "decode_s": total - fill_total, "rows": rows,
            "longest_row": max(rows, key=lambda r: r["total_s"]) if rows else None}


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def estimate_line(s: DecodeSettings, estimate: dict[str, Any], rows: int) -> str:
    longest = estimate["longest_row"]
    line = (f"bench decode: {rows} rows ({s.fill} fill), estimated ~{_duration(estimate['total_s'])} "
            f"(fill ~{_duration(estimate['fill_s'])}, decode steps ~{_duration(estimate['decode_s'])}; rough, model loading not counted)")
    if longest and longest["total_s"] > 0:
        line += (f"; longest row {longest['cache']} ctx={longest['context']} B={longest['batch']} "
                 f"~{_duration(longest['total_s'])}")
    return line


def add_speedups(rows: list[DecodeRow]) -> None:
    """speedup_vs_X = X's step time / this row's, for X measured at the same (context, batch)."""
    ok = {(r.cache, r.context, r.batch): r for r in rows if r.status == "ok"}
    for r in rows:
        if r.status != "ok":
            continue
        for ref, attr in (("static", "speedup_vs_static"), ("dynamic", "speedup_vs_dynamic")):
            base = ok.get((ref, r.context, r.batch))
            if base is not None:
                setattr(r, attr, base.step_ms / r.step_ms)


def model_info(model: torch.nn.Module, name: str, dtype: str) -> dict[str, Any]:
    config = model.config.get_text_config(decoder=True)
    return {
        "name": name, "dtype": dtype, "model_type": config.model_type, "layers": config.num_hidden_layers,
        "kv_heads": config.num_key_value_heads, "max_positions": getattr(config, "max_position_embeddings", None),
        "weight_bytes": weight_bytes(model), "weight_bytes_read_per_step": weight_bytes_read(model),
    }


def run_decode(s: DecodeSettings, progress: bool = True) -> dict[str, Any]:
    """Every (context, batch, cache) row, in that order (small contexts first), plus the bandwidth."""
    specs = [parse_cache(name) for name in s.caches]
    with torch_threads(s.threads):
        return _run_decode(s, specs, progress)


def _run_decode(s: DecodeSettings, specs: list[CacheSpec], progress: bool) -> dict[str, Any]:
    pool = ModelPool(s.model, DTYPES[s.dtype], s.window, s.adapter)
    base = pool.get("base")
    bandwidth = measure_bandwidth(s.bandwidth_mib)
    plan = [(c, b, spec) for c in s.contexts for b in s.batch_sizes for spec in specs]
    for spec in specs:
        row_fill(s, spec)  # a bad --fill fails here, not in every row
    estimate = estimate_decode(s, specs, pool, bandwidth["bytes_per_s"], plan)
    if progress:
        print(estimate_line(s, estimate, len(plan)), file=sys.stderr, flush=True)
    run_start = time.perf_counter()
    rows: list[DecodeRow] = []
    bar = tqdm(plan, desc="bench decode", disable=not progress)
    for context, batch, spec in bar:
        bar.set_postfix_str(f"{spec.name} ctx={context} B={batch}")
        try:
            row = decode_row(s, spec, pool, context, batch, bandwidth["bytes_per_s"])
        except Exception as error:  # record and go on: one failing row must not lose the others
            row = DecodeRow(spec.name, context, batch, status=f"error: {type(error).__name__}: {error}")
        rows.append(row)
        gc.collect()
    add_speedups(rows)
    return {
        "benchmark": "decode", "settings": asdict(s), "fill": s.fill, "threads": torch.get_num_threads(),
        "model": model_info(base, s.model, s.dtype),
        "bandwidth": bandwidth, "estimate": estimate, "wall_s": time.perf_counter() - run_start,
        "rows": [asdict(r) for r in rows],
        "notes": [
            f"fill={s.fill}: " + ("caches filled with random K/V of the model's shapes through each cache's own "
                                  "update/eviction, without running the model (spkv-adapter rows: model fill); "
                                  "decode steps are real forwards." if s.fill == "synthetic" else
                                  "caches filled by the model's chunked prefill over the prompt."),
            "step_ms: median over warmup-free timed steps (repeats x steps); each step = one forward of [B, 1] + argmax.",
            "kv_bytes_read: full caches read what they hold; SP-KV reads kept pairs + window. The dynamic cache "
            "also copies itself on every append (torch.cat), so its real traffic is higher than counted.",
            "rss_peak_so_far_mib is ru_maxrss, monotone over the process; row_peak_rss_delta_mib is sampled per row.",
            "Rows with beyond_model_positions=true run past the model's trained positions: speed only.",
        ],
    }


def _mib(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x / MIB:.1f}" if x >= 10 * MIB else f"{x / MIB:.3g}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def decode_markdown(result: dict[str, Any]) -> str:
    m, bw = result["model"], result["bandwidth"]
    lines = [
        f"# Decode benchmark: {m['name']} ({m['dtype']}), {result['settings'].get('fill', 'model')} fill", "",
        f"Bandwidth (copy of {bw['copy_mib']} MiB): {bw['bytes_per_s'] / GIB:.2f} GiB/s; "
        f"weight bytes read per step: {m['weight_bytes_read_per_step'] / MIB:.1f} MiB; "
        f"window {result['settings']['window']}; torch threads {result['threads']}; command: `{result.get('provenance', {}).get('command', '')}`", "",
        *([f"Run time {_duration(result['wall_s'])} (estimated beforehand ~{_duration(result['estimate']['total_s'])})", ""]
          if "wall_s" in result and "estimate" in result else []),
        "| cache | context | batch | fill | fill s | step ms | tok/s | vs static | vs dynamic | KV held MiB | KV read MiB "
        "| density | predicted ms | measured/predicted | row peak RSS +MiB | peak RSS so far MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['cache']} | {r['context']} | {r['batch']} | {r.get('fill', '')} | {_num(r.get('fill_s'))} | {_num(r['step_ms'])} | {_num(r['tokens_per_s'], '.1f')} "
            f"| {_num(r['speedup_vs_static'])} | {_num(r['speedup_vs_dynamic'])} | {_mib(r['kv_bytes_held'])} "
            f"| {_mib(r['kv_bytes_read'])} | {_num(r['density'], '.3f')} | {_num(r['predicted_ms'])} "
            f"| {_num(r['measured_over_predicted'])} | {_num(r['row_peak_rss_delta_mib'], '.0f')} "
            f"| {_num(r['rss_peak_so_far_mib'], '.0f')} | {r['status']}{' (beyond model positions)' if r['beyond_model_positions'] else ''} |"
        )
    lines += ["", *(f"- {n}" for n in result["notes"]), ""]
    return "\n".join(lines)


def plot_decode(result: dict[str, Any], out: Path) -> list[Path]:
    """decode.png (step time vs context) and decode_memory.png (KV bytes held vs context), log-log,
    one line per cache and one panel per batch size."""
    plt = pyplot()
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    batches = result["settings"]["batch_sizes"]
    paths = []
    for key, ylabel, name, scale in (("step_ms", "decode step (ms)", "decode.png", 1.0),
                                     ("kv_bytes_held", "KV bytes held (MiB)", "decode_memory.png", 1 / MIB)):
        fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
        for ax, batch in zip(axes[0], batches):
            for i, cache in enumerate(result["settings"]["caches"]):
                pts = sorted((r["context"], r[key] * scale) for r in rows if r["cache"] == cache and r["batch"] == batch)
                if pts:  # line styles tell apart caches whose points coincide (dynamic and static bytes)
                    ax.plot(*zip(*pts), marker="os^vD<>"[i % 7], linestyle=("-", "--", ":", "-.")[i % 4], label=cache)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{result['model']['name']}, batch {batch}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_decode(result: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """decode.json (with provenance), decode.md, decode.png and decode_memory.png under `out`."""
    out = Path(out)
    result = {**result, "provenance": result.get("provenance") or provenance()}
    json_path = write_json(out / "decode.json", result)
    md_path = atomic_write_text(out / "decode.md", decode_markdown(result))
    png, mem_png = plot_decode(result, out)
    return {"json": json_path, "md": md_path, "png": png, "memory_png": mem_png}


# ---------------------------------------------------------------------------------------------
# Prefill benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class PrefillSettings:
    model: str = "smollm2-135m"
    adapter: str | None = None
    contexts: list[int] = field(default_factory=lambda: [2048, 8192, 16384])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    prefill_chunk: int = 1024
    repeats: int = 3
    window: int = 128
    max_kv_gib: float = 12.0
    dtype: str = "float32"
    threads: int | None = None  # torch threads (None: torch's default)
    out: str = "results/bench"


QUICK_PREFILL = dict(model=TINY, contexts=[64, 160], batch_sizes=[1], prefill_chunk=64, repeats=2, window=16, threads=1)

# config -> (model variant, cache policy); "predictors-only" times the predictors alone.
PREFILL_CONFIGS = ("dynamic", "spkv", "spkv-keep-all", "predictors-only")


@dataclass
class PrefillRow:
    config: str
    context: int
    batch: int
    status: str = "ok"
    seconds: float | None = None  # median over repeats
    seconds_repeats: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    time_vs_dynamic: float | None = None  # this config's seconds / dynamic's
    kv_bytes_held: int | None = None  # after the prefill
    density: float | None = None
    peak_rss_delta_mib: float | None = None  # max over repeats of (sampled peak - RSS before)
    rss_peak_so_far_mib: float | None = None
    beyond_model_positions: bool = False
    prompt: str = ""
    note: str = ""


def time_predictors(model: torch.nn.Module, batch: int, context: int, chunk: int) -> float:
    """Seconds for every gated layer's predictor over `context` tokens of random hidden states, in chunks."""
    preds = list(predictors(model).values())
    p = next(model.parameters())
    hidden = torch.randn(batch, min(chunk, context), model.config.get_text_config(decoder=True).hidden_size, dtype=p.dtype)
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, context, chunk):
            n = min(chunk, context - s)
            for predictor in preds:
                predictor(hidden[:, :n])
    return time.perf_counter() - start


def _prefill_once(config: str, pool: ModelPool, ids: torch.Tensor, chunk: int) -> tuple[float, float | None, Cache | None]:
    """(seconds, sampled peak RSS delta, the filled cache) of one prefill."""
    variant = "base" if config == "dynamic" else ("adapter" if pool.adapter else "converted")
    model = pool.get(variant)
    if config == "predictors-only":
        return time_predictors(model, ids.shape[0], ids.shape[1], chunk), None, None
    if config == "dynamic":
        cache: Cache = DynamicCache(config=model.config)
    else:
        cache = SPKVCache(model, policy=SPKVPolicy(threshold=0.0) if config == "spkv-keep-all" else None)
        cache.max_positions = None
    with RSSSampler() as rss:
        start = time.perf_counter()
        chunked_prefill(model, cache, ids, chunk)
        seconds = time.perf_counter() - start
    return seconds, rss.peak_delta_mib, cache


def prefill_rows(s: PrefillSettings, pool: ModelPool, context: int, batch: int) -> list[PrefillRow]:
    """All configs at one (context, batch); repeats interleave the configs so drift hits each alike."""
    rows = {c: PrefillRow(c, context, batch) for c in PREFILL_CONFIGS}
    base = pool.get("base")
    element = next(base.parameters()).element_size()
    full = full_kv_bytes(base.config, context, batch, element)
    if full > s.max_kv_gib * GIB:
        for r in rows.values():
            r.status = f"skipped: memory (full KV {full / GIB:.1f} GiB > --max-kv-gib {s.max_kv_gib})"
        return list(rows.values())
    ids, source = pool.prompt(context, batch)
    beyond = context > (getattr(base.config, "max_position_embeddings", None) or math.inf)
    for config in PREFILL_CONFIGS:  # untimed warmup: one chunk each (first-call allocations, lazy init)
        try:
            _prefill_once(config, pool, ids[:, :s.prefill_chunk], s.prefill_chunk)
        except Exception as error:
            rows[config].status = f"error: {type(error).__name__}: {error}"
    for _ in range(s.repeats):
        for config, row in rows.items():
            if row.status != "ok":
                continue
            try:
                seconds, peak, cache = _prefill_once(config, pool, ids, s.prefill_chunk)
            except Exception as error:
                row.status = f"error: {type(error).__name__}: {error}"
                continue
            row.seconds_repeats.append(seconds)
            if peak is not None:
                row.peak_rss_delta_mib = max(peak, row.peak_rss_delta_mib or 0.0)
            if cache is not None:
                kv = kv_bytes(cache)
                row.kv_bytes_held, row.density = kv["held"], kv.get("density")
            del cache
            gc.collect()
    for row in rows.values():
        row.prompt, row.beyond_model_positions, row.rss_peak_so_far_mib = source, beyond, rss_peak_mib()
        if row.status == "ok":
            row.seconds = statistics.median(row.seconds_repeats)
            row.tokens_per_s = batch * context / row.seconds
    dyn = rows["dynamic"]
    for row in rows.values():
        if row.status == "ok" and dyn.status == "ok":
            row.time_vs_dynamic = row.seconds / dyn.seconds
    rows["spkv-keep-all"].note = "converted model keeping every pair: predictors + SP-KV attention and cache overhead"
    rows["predictors-only"].note = "the predictors alone on random hidden states of the same shape"
    rows["spkv"].note = "adapter's predictors and threshold" if pool.adapter else "untrained predictors (keep almost all)"
    return list(rows.values())


def run_prefill(s: PrefillSettings, progress: bool = True) -> dict[str, Any]:
    """Every (context, batch): the PREFILL_CONFIGS rows, plus the overhead summary."""
    with torch_threads(s.threads):
        return _run_prefill(s, progress)


def _run_prefill(s: PrefillSettings, progress: bool) -> dict[str, Any]:
    pool = ModelPool(s.model, DTYPES[s.dtype], s.window, s.adapter)
    base = pool.get("base")
    plan = [(c, b) for c in s.contexts for b in s.batch_sizes]
    rows: list[PrefillRow] = []
    for context, batch in tqdm(plan, desc="bench prefill", disable=not progress):
        rows += prefill_rows(s, pool, context, batch)
    return {
        "benchmark": "prefill", "settings": asdict(s), "threads": torch.get_num_threads(),
        "model": model_info(base, s.model, s.dtype),
        "rows": [asdict(r) for r in rows], "overhead": prefill_overhead(rows),
        "notes": [
            "seconds: median over repeats of the whole chunked prefill (configs interleaved within each repeat).",
            "spkv-keep-all does the same attention work as spkv with nothing dropped: its time over dynamic's "
            "is the predictors' + SP-KV attention/cache overhead; predictors-only isolates the predictors.",
            "peak_rss_delta_mib: sampled peak RSS during the prefill minus RSS before it (in-process).",
        ],
    }


def prefill_overhead(rows: list[PrefillRow]) -> list[dict[str, Any]]:
    """Per (context, batch): keep-all / dynamic - 1 and predictors-only / dynamic."""
    by = {(r.config, r.context, r.batch): r for r in rows if r.status == "ok"}
    out = []
    for (config, context, batch), dyn in by.items():
        if config != "dynamic":
            continue
        keep, pred = by.get(("spkv-keep-all", context, batch)), by.get(("predictors-only", context, batch))
        out.append({
            "context": context, "batch": batch,
            "keep_all_overhead": keep.seconds / dyn.seconds - 1 if keep else None,
            "predictors_fraction": pred.seconds / dyn.seconds if pred else None,
        })
    return out


def prefill_markdown(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [
        f"# Prefill benchmark: {m['name']} ({m['dtype']}), chunk {result['settings']['prefill_chunk']}, "
        f"torch threads {result['threads']}", "",
        f"command: `{result.get('provenance', {}).get('command', '')}`", "",
        "| config | context | batch | seconds | tok/s | time vs dynamic | KV held MiB | density | peak RSS +MiB "
        "| peak RSS so far MiB | status | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['config']} | {r['context']} | {r['batch']} | {_num(r['seconds'], '.3f')} | {_num(r['tokens_per_s'], '.1f')} "
            f"| {_num(r['time_vs_dynamic'])} | {_mib(r['kv_bytes_held'])} | {_num(r['density'], '.3f')} "
            f"| {_num(r['peak_rss_delta_mib'], '.0f')} | {_num(r['rss_peak_so_far_mib'], '.0f')} | {r['status']} | {r['note']} |"
        )
    lines += ["", "| context | batch | keep-all overhead | predictors / dynamic |", "|---|---|---|---|"]
    for o in result["overhead"]:
        lines.append(f"| {o['context']} | {o['batch']} | {_pct(o['keep_all_overhead'], signed=True)} | {_pct(o['predictors_fraction'])} |")
    lines += ["", *(f"- {n}" for n in result["notes"]), ""]
    return "\n".join(lines)


def _pct(x: float | None, signed: bool = False) -> str:
    return "" if x is None else f"{100 * x:{'+' if signed else ''}.1f}%"


def write_prefill(result: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """prefill.json (with provenance) and prefill.md under `out`."""
    out = Path(out)
    result = {**result, "provenance": result.get("provenance") or provenance()}
    return {"json": write_json(out / "prefill.json", result), "md": atomic_write_text(out / "prefill.md", prefill_markdown(result))}


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

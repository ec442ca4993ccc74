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
    NAME-pageN    an SP-KV cache above with N pairs per store page (default window / 4, at most 32)
    window-only   converted model, StreamingLLM and no sinks: nothing kept outside the window
    hybrid-export the per-layer hybrid of `spkv hybrid export` (--hybrid-export), a plain transformers
                  model with transformers' StaticCache (its sliding layers hold the window); its
                  step is compared with export-sliding + global share x (static - export-sliding)
    export-sliding the same exported model with every layer sliding: the hybrid's like-for-like
                  share-0 end (window-only if this row is not run)

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
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache

from spkv.bench.common import (
    DTYPES,
    TINY,
    ModelPool,
    chunked_prefill,
    kv_bytes,
    model_info,
    synthetic_fill,
)
from spkv.bench.machine import (
    GIB,
    RSSSampler,
    measure_bandwidth,
    rss_peak_mib,
    torch_threads,
    weight_bytes_read,
)
from spkv.bench.proportional import add_proportional_cost, global_share
from spkv.budget import predicted_kv_bytes
from spkv.cache import EXIT_BATCH, SPKVCache
from spkv.compat import CACHE_ARG
from spkv.policies import RandomPolicy, StreamingLLM
from spkv.policies.base import ScoringPolicy

DEFAULT_CACHES = ["dynamic", "static", "spkv-adapter", "density-10", "density-25", "density-50", "window-only"]


@dataclass
class DecodeSettings:
    model: str = "smollm2-135m"
    adapter: str | None = None
    hybrid_export: str | None = None  # folder of `spkv hybrid export`, for the hybrid-export cache
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
    interleave: bool = False  # fill every cache of a (context, batch) first, then time them repeat by repeat in turn
    out: str = "results/bench"


QUICK_DECODE = dict(model=TINY, contexts=[64, 160], batch_sizes=[1, 2], steps=3, warmup=1, repeats=2,
                    prefill_chunk=64, window=16, bandwidth_mib=64, threads=1)


@dataclass
class CacheSpec:
    name: str
    variant: str  # which model: base | converted | adapter
    policy: ScoringPolicy | None = None
    sinks: int | None = None
    kv_fraction: float = 1.0  # expected share of a full cache's bytes (for the memory budget)
    page: int | None = None  # SP-KV caches: pairs per store page (None: the cache's default)


def parse_cache(name: str) -> CacheSpec:
    base, _, page = name.rpartition("-page")
    if base and page.isdigit() and int(page) > 0:  # e.g. density-25-page128: the same cache with larger pages
        spec = parse_cache(base)
        if spec.variant not in ("converted", "adapter"):
            raise ValueError(f"cache {name!r}: -pageN applies to SP-KV caches (density-P, window-only, spkv-adapter)")
        return replace(spec, name=name, page=int(page))
    if name in ("dynamic", "static"):
        return CacheSpec(name, "base")
    if name == "spkv-adapter":
        return CacheSpec(name, "adapter")
    if name == "window-only":
        return CacheSpec(name, "converted", StreamingLLM(threshold=0.0), sinks=0, kv_fraction=0.0)
    if name in ("hybrid-export", "export-sliding"):
        return CacheSpec(name, name.replace("hybrid-", ""))
    if name.startswith("density-"):
        try:
            percent = float(name.split("-", 1)[1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise ValueError(f"cache {name!r}: density-P needs P in (0, 100]")
        return CacheSpec(name, "converted", RandomPolicy(threshold=1 - percent / 100, seed=0), kv_fraction=percent / 100)
    raise ValueError(f"unknown cache {name!r}; choose from dynamic, static, spkv-adapter, density-P, window-only, hybrid-export, export-sliding")


def make_cache(spec: CacheSpec, model: torch.nn.Module, max_len: int) -> Cache:
    if spec.name == "dynamic":
        return DynamicCache(config=model.config)
    if spec.name in ("static", "hybrid-export", "export-sliding"):  # the export's sliding layers hold the window
        return StaticCache(config=model.config, max_cache_len=max_len)
    policy = replace(spec.policy) if spec.policy is not None else None  # fresh state (RandomPolicy's generator)
    cache = SPKVCache(model, policy=policy, sinks=spec.sinks, page=spec.page)
    cache.max_positions = None  # speed only: allow contexts beyond the model's trained positions
    return cache


@dataclass
class DecodeRow:
    """One (cache, context, batch) measurement. Times in ms, memory in bytes or MiB as named."""

    cache: str
    context: int
    batch: int
    status: str = "ok"  # ok | skipped: ... | error: ...
    step_ms: float | None = None  # median over repeats of each repeat's mean step (exits paid in full)
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
    kv_share: float | None = None  # compressed caches: share of out-of-window pairs kept (measured; an export's global share)
    ideal_ms: float | None = None  # window-only (an export: export-sliding) + kv_share x (static - it), same run, context, batch
    measured_over_ideal: float | None = None
    fill: str = ""  # how the cache was filled: synthetic | model
    fill_s: float | None = None  # seconds of the fill (for information)
    row_peak_rss_delta_mib: float | None = None  # sampled peak RSS during this row - RSS before it
    rss_peak_so_far_mib: float | None = None  # ru_maxrss: monotone over the process
    beyond_model_positions: bool = False
    prompt: str = ""


def time_decode(model: torch.nn.Module, cache: Cache, token: torch.Tensor, warmup: int, steps: int,
                repeats: int) -> tuple[list[list[float]], torch.Tensor]:
    """Seconds of each timed single-token step ([repeats][steps]), and the next token [B, 1] to decode
    from; step = forward + greedy pick."""
    times = []
    with torch.no_grad():
        for i in range(warmup + steps * repeats):
            start = time.perf_counter()
            out = model(input_ids=token, **{CACHE_ARG: cache}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
    return [times[r * steps:(r + 1) * steps] for r in range(repeats)], token


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
    full = predicted_kv_bytes(model.config, context + s.warmup + s.steps * s.repeats, batch, element)
    fraction = spec.kv_fraction
    if spec.variant.startswith("export"):  # sliding layers hold the window, full ones every token
        fraction = global_share(s.hybrid_export) if spec.variant == "export" else 0.0
    window_share = 0.0 if spec.variant == "base" else min(1.0, s.window / context)
    return full * min(1.0, fraction + window_share)


def skip_reason(s: DecodeSettings, spec: CacheSpec, pool: ModelPool, context: int, batch: int) -> str | None:
    """Why a row will not run (None: it runs)."""
    if spec.variant == "adapter" and not s.adapter:
        return "skipped: no --adapter"
    if spec.variant.startswith("export") and not s.hybrid_export:
        return "skipped: no --hybrid-export"
    if row_fill(s, spec) != s.fill and context * batch > s.max_model_fill_tokens:
        return (f"skipped: model fill too long (context x batch {context * batch} > "
                f"--max-model-fill-tokens {s.max_model_fill_tokens})")
    estimate = expected_kv_bytes(s, spec, pool.get(spec.variant), context, batch)
    if estimate > s.max_kv_gib * GIB:
        return f"skipped: memory (estimated KV {estimate / GIB:.1f} GiB > --max-kv-gib {s.max_kv_gib})"
    return None


@dataclass
class _Filled:
    """A row whose cache is filled and waits for its timed steps."""

    row: DecodeRow
    model: torch.nn.Module
    cache: Cache
    token: torch.Tensor  # [B, 1] the next token to decode from
    extra: int  # decode steps the row will take in all
    rss_base: float | None  # MiB, RSS before the fill
    times: list[list[float]] = field(default_factory=list)  # [repeat][step] seconds


def start_row(s: DecodeSettings, spec: CacheSpec, pool: ModelPool, context: int, batch: int) -> DecodeRow | _Filled:
    """Fill a fresh cache with `context` tokens; a row that will not run comes back as its DecodeRow."""
    row = DecodeRow(spec.name, context, batch, fill=row_fill(s, spec))
    reason = skip_reason(s, spec, pool, context, batch)
    if reason is not None:
        row.status = reason
        return row
    extra = s.warmup + s.steps * s.repeats
    model = pool.get(spec.variant)
    row.beyond_model_positions = context + extra > (getattr(model.config, "max_position_embeddings", None) or math.inf)
    ids, row.prompt = pool.prompt(context, batch) if row.fill == "model" else (None, "synthetic (random K/V)")
    with RSSSampler() as rss:
        cache = make_cache(spec, model, context + extra)
        start = time.perf_counter()
        token = fill_cache(model, cache, row.fill, ids, batch, context, s.prefill_chunk)
        row.fill_s = time.perf_counter() - start
    row.row_peak_rss_delta_mib = rss.peak_delta_mib
    return _Filled(row, model, cache, token, extra, rss.baseline)


def time_repeat(s: DecodeSettings, filled: _Filled, track_rss: bool = True) -> None:
    """One timed repeat of the row's steps (after the warmup steps, on its first repeat); track_rss:
    the row's peak RSS delta (from before its fill) includes the steps' temporaries."""
    warmup = s.warmup if not filled.times else 0
    with RSSSampler() as rss:
        timed, filled.token = time_decode(filled.model, filled.cache, filled.token, warmup, s.steps, 1)
    filled.times.append(timed[0])
    row = filled.row
    if track_rss and rss.peak is not None and filled.rss_base is not None and row.row_peak_rss_delta_mib is not None:
        row.row_peak_rss_delta_mib = max(row.row_peak_rss_delta_mib, rss.peak - filled.rss_base)


def finish_row(filled: _Filled, bandwidth: float) -> DecodeRow:
    """Step time, bytes and the bandwidth bound of a row whose repeats are timed."""
    row, model, cache = filled.row, filled.model, filled.cache
    # The mean of a repeat, not the median step: a median would hide the step that takes the batched
    # window exits (one in EXIT_BATCH); a repeat of a multiple of EXIT_BATCH steps pays each exactly.
    row.step_ms_repeat_means = [1000 * statistics.fmean(rep) for rep in filled.times]
    row.step_ms = statistics.median(row.step_ms_repeat_means)
    row.tokens_per_s = row.batch / (row.step_ms / 1000)
    kv = kv_bytes(cache)
    row.kv_bytes_held, row.kv_bytes_read = kv["held"], kv["read"]
    element = next(model.parameters()).element_size()
    row.kv_bytes_full = kv.get("full", predicted_kv_bytes(model.config, row.context + filled.extra, row.batch, element))
    row.density, row.density_token_weighted = kv.get("density"), kv.get("density_token_weighted")
    row.weight_bytes_read = weight_bytes_read(model)
    row.predicted_ms = 1000 * (row.weight_bytes_read + row.kv_bytes_read) / bandwidth
    row.measured_over_predicted = row.step_ms / row.predicted_ms
    row.rss_peak_so_far_mib = rss_peak_mib()
    return row


def decode_row(s: DecodeSettings, spec: CacheSpec, pool: ModelPool, context: int, batch: int, bandwidth: float) -> DecodeRow:
    """Fill a fresh cache with `context` tokens, then time its single-token decode steps."""
    filled = start_row(s, spec, pool, context, batch)
    if isinstance(filled, DecodeRow):
        return filled
    for _ in range(s.repeats):
        time_repeat(s, filled)
    return finish_row(filled, bandwidth)


def decode_group(s: DecodeSettings, specs: list[CacheSpec], pool: ModelPool, context: int, batch: int,
                 bandwidth: float) -> list[DecodeRow]:
    """--interleave: every cache of one (context, batch) filled first, then the caches take turns repeat
    by repeat, so drift over the run (allocator state, clocks, other load) hits each alike. A cache
    that would push the group's estimated KV over --max-kv-gib is skipped."""
    rows: list[DecodeRow | _Filled] = []
    budget = s.max_kv_gib * GIB
    for spec in specs:
        estimate = 0.0 if skip_reason(s, spec, pool, context, batch) else expected_kv_bytes(s, spec, pool.get(spec.variant), context, batch)
        if estimate > budget:
            rows.append(DecodeRow(spec.name, context, batch, fill=row_fill(s, spec), status=(
                f"skipped: memory (the interleaved group's estimated KV would exceed --max-kv-gib {s.max_kv_gib})")))
            continue
        budget -= estimate
        try:
            rows.append(start_row(s, spec, pool, context, batch))
        except Exception as error:  # record and go on: one failing row must not lose the others
            rows.append(DecodeRow(spec.name, context, batch, status=f"error: {type(error).__name__}: {error}"))
    for _ in range(s.repeats):
        for i, r in enumerate(rows):
            if isinstance(r, _Filled):
                try:
                    time_repeat(s, r, track_rss=False)  # other rows' caches live too: RSS delta of the fill only
                except Exception as error:
                    rows[i] = DecodeRow(r.row.cache, context, batch, status=f"error: {type(error).__name__}: {error}")
    return [finish_row(r, bandwidth) if isinstance(r, _Filled) else r for r in rows]


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


def run_decode(s: DecodeSettings, progress: bool = True) -> dict[str, Any]:
    """Every (context, batch, cache) row, in that order (small contexts first), plus the bandwidth."""
    specs = [parse_cache(name) for name in s.caches]
    with torch_threads(s.threads):
        return _run_decode(s, specs, progress)


def _run_decode(s: DecodeSettings, specs: list[CacheSpec], progress: bool) -> dict[str, Any]:
    pool = ModelPool(s.model, DTYPES[s.dtype], s.window, s.adapter, s.hybrid_export)
    base = pool.get("base")
    bandwidth = measure_bandwidth(s.bandwidth_mib)
    plan = [(c, b, spec) for c in s.contexts for b in s.batch_sizes for spec in specs]
    for spec in specs:
        row_fill(s, spec)  # a bad --fill fails here, not in every row
    from spkv.bench.decode_estimate import estimate_decode, estimate_line

    estimate = estimate_decode(s, specs, pool, bandwidth["bytes_per_s"], plan)
    if progress:
        print(estimate_line(s, estimate, len(plan)), file=sys.stderr, flush=True)
    run_start = time.perf_counter()
    rows: list[DecodeRow] = []
    if s.interleave:
        groups = [(c, b) for c in s.contexts for b in s.batch_sizes]
        bar = tqdm(groups, desc="bench decode (interleaved)", disable=not progress)
        for context, batch in bar:
            bar.set_postfix_str(f"ctx={context} B={batch}")
            rows += decode_group(s, specs, pool, context, batch, bandwidth["bytes_per_s"])
            gc.collect()
    else:
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
    add_proportional_cost(rows, s.hybrid_export)
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
            f"step_ms: median over {s.repeats} repeats of the mean of {s.steps} consecutive warmup-free steps; each "
            "step = one forward of [B, 1] + argmax. SP-KV takes window exits every "
            f"{EXIT_BATCH} steps: a repeat of a multiple of {EXIT_BATCH} steps pays its exits in full"
            + ("." if s.steps % EXIT_BATCH == 0 else f" (this run's {s.steps} steps are not one: SP-KV rows "
               "count their exits only approximately)."),
            "kv_bytes_read: full caches read what they hold; SP-KV reads kept pairs + window. The dynamic cache "
            "also copies itself on every append (torch.cat), so its real traffic is higher than counted.",
            "rss_peak_so_far_mib is ru_maxrss, monotone over the process; row_peak_rss_delta_mib is sampled per row"
            + (" during its fill only (interleaved: the other caches of its group are alive during its steps)." if s.interleave else "."),
            *([f"interleave: at each (context, batch) every cache is filled first, then the caches take turns, one repeat of "
               f"{s.steps} steps each, {s.repeats} times, so drift over the run hits each alike."] if s.interleave else []),
            "Rows with beyond_model_positions=true run past the model's trained positions: speed only.",
        ],
    }

"""Prefill benchmark: time and memory of chunked long-prompt prefill, the unconverted model with a
DynamicCache vs the converted model with an SPKVCache, plus the predictors' overhead (the converted
model keeping every pair, and the predictors timed alone)."""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache
from transformers.cache_utils import Cache

from spkv.bench.common import (
    DTYPES,
    TINY,
    ModelPool,
    _mib,
    _num,
    _pct,
    chunked_prefill,
    kv_bytes,
    model_info,
)
from spkv.bench.machine import GIB, RSSSampler, rss_peak_mib, torch_threads
from spkv.budget import predicted_kv_bytes
from spkv.cache import SPKVCache
from spkv.convert import predictors
from spkv.policies import KeepAll, SPKVPolicy
from spkv.results import atomic_write_text, provenance, write_json

# config -> (model variant, cache policy); "predictors-only" times the predictors alone.
PREFILL_CONFIGS = ("dynamic", "spkv", "spkv-keep-all", "predictors-only")


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
    configs: list[str] = field(default_factory=lambda: list(PREFILL_CONFIGS))  # "dynamic" always: the reference


QUICK_PREFILL = dict(model=TINY, contexts=[64, 160], batch_sizes=[1], prefill_chunk=64, repeats=2, window=16, threads=1)

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
    kv_bytes_budget: int | None = None  # eviction under a budget (LKV): the bytes its budget allows
    held_over_budget: float | None = None  # kv_bytes_held / kv_bytes_budget
    density: float | None = None
    peak_rss_delta_mib: float | None = None  # max over repeats of (sampled peak - RSS before)
    rss_peak_so_far_mib: float | None = None
    beyond_model_positions: bool = False
    prompt: str = ""
    note: str = ""


def time_predictors(model: torch.nn.Module, batch: int, context: int, chunk: int) -> float:
    """Seconds for every gated layer's predictor over `context` tokens of random inputs, in chunks:
    hidden states [B, n, hidden] for SP-KV's predictor, keys and values [B, Hkv, n, D] for LKV's scorer."""
    preds = list(predictors(model).values())
    p = next(model.parameters())
    text = model.config.get_text_config(decoder=True)
    n0 = min(chunk, context)
    if model.spkv_config.lkv is None:
        inputs = (torch.randn(batch, n0, text.hidden_size, dtype=p.dtype),)
    else:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv = torch.randn(2, batch, text.num_key_value_heads, n0, head_dim, dtype=p.dtype)
        inputs = (kv[0], kv[1])
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, context, chunk):
            n = min(chunk, context - s)
            for predictor in preds:
                predictor(*(x[..., :n, :] for x in inputs))
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
        keep_all = config == "spkv-keep-all"
        if model.spkv_config.lkv is not None:  # LKV keeps every pair at budget 1
            cache = SPKVCache(model, policy=KeepAll() if keep_all else None, budget=1.0 if keep_all else None)
        else:
            cache = SPKVCache(model, policy=SPKVPolicy(threshold=0.0) if keep_all else None)
        cache.max_positions = None
    with RSSSampler() as rss:
        start = time.perf_counter()
        chunked_prefill(model, cache, ids, chunk)
        seconds = time.perf_counter() - start
    return seconds, rss.peak_delta_mib, cache


def prefill_rows(s: PrefillSettings, pool: ModelPool, context: int, batch: int) -> list[PrefillRow]:
    """All configs at one (context, batch); repeats interleave the configs so drift hits each alike."""
    rows = {c: PrefillRow(c, context, batch) for c in PREFILL_CONFIGS if c in s.configs}
    base = pool.get("base")
    element = next(base.parameters()).element_size()
    full = predicted_kv_bytes(base.config, context, batch, element)
    if full > s.max_kv_gib * GIB:
        for r in rows.values():
            r.status = f"skipped: memory (full KV {full / GIB:.1f} GiB > --max-kv-gib {s.max_kv_gib})"
        return list(rows.values())
    ids, source = pool.prompt(context, batch)
    beyond = context > (getattr(base.config, "max_position_embeddings", None) or math.inf)
    for config in rows:  # untimed warmup: one chunk each (first-call allocations, lazy init)
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
                if "budget" in kv and config == "spkv":
                    row.kv_bytes_budget, row.held_over_budget = kv["budget"], kv["held"] / kv["budget"]
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
    lkv = pool.get("adapter" if pool.adapter else "converted").spkv_config.lkv is not None
    notes = {"spkv-keep-all": "converted model keeping every pair: predictors + SP-KV attention and cache overhead",
             "predictors-only": "the predictors alone on random hidden states of the same shape",
             "spkv": ("LKV adapter: eviction under its learned budgets" if lkv else "adapter's predictors and threshold"
                      if pool.adapter else "untrained predictors (keep almost all)")}
    if lkv:
        notes["spkv-keep-all"] = "LKV model at budget 1 (keeps every pair): the scorer + cache overhead"
        notes["predictors-only"] = "the token scorers alone on random keys and values of the same shape"
    for config, note in notes.items():
        if config in rows:
            rows[config].note = note
    return list(rows.values())


def run_prefill(s: PrefillSettings, progress: bool = True) -> dict[str, Any]:
    """Every (context, batch): the PREFILL_CONFIGS rows, plus the overhead summary."""
    with torch_threads(s.threads):
        return _run_prefill(s, progress)


def _run_prefill(s: PrefillSettings, progress: bool) -> dict[str, Any]:
    unknown = sorted(set(s.configs) - set(PREFILL_CONFIGS))
    if unknown or "dynamic" not in s.configs:
        raise ValueError(f"--configs {' '.join(s.configs)}: choose from {', '.join(PREFILL_CONFIGS)}, with dynamic "
                         "(every other row is timed against it)")
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
        "| config | context | batch | seconds | tok/s | time vs dynamic | KV held MiB | held / budget | density "
        "| peak RSS +MiB | peak RSS so far MiB | status | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['config']} | {r['context']} | {r['batch']} | {_num(r['seconds'], '.3f')} | {_num(r['tokens_per_s'], '.1f')} "
            f"| {_num(r['time_vs_dynamic'])} | {_mib(r['kv_bytes_held'])} | {_num(r.get('held_over_budget'), '.3f')} "
            f"| {_num(r['density'], '.3f')} "
            f"| {_num(r['peak_rss_delta_mib'], '.0f')} | {_num(r['rss_peak_so_far_mib'], '.0f')} | {r['status']} | {r['note']} |"
        )
    lines += ["", "| context | batch | keep-all overhead | predictors / dynamic |", "|---|---|---|---|"]
    for o in result["overhead"]:
        lines.append(f"| {o['context']} | {o['batch']} | {_pct(o['keep_all_overhead'], signed=True)} | {_pct(o['predictors_fraction'])} |")
    lines += ["", *(f"- {n}" for n in result["notes"]), ""]
    return "\n".join(lines)


def write_prefill(result: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """prefill.json (with provenance) and prefill.md under `out`."""
    out = Path(out)
    result = {**result, "provenance": result.get("provenance") or provenance()}
    return {"json": write_json(out / "prefill.json", result), "md": atomic_write_text(out / "prefill.md", prefill_markdown(result))}



"""A rough run time for `spkv bench decode`, printed before it starts (a 32k x 16 run takes an hour).

Calibrated on this machine with small fills and steps of each kind of cache, then scaled to every
row: see estimate_decode.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from spkv.bench.common import ModelPool, chunked_prefill, kv_bytes, kv_head_shape, synthetic_fill
from spkv.bench.decode import CacheSpec, DecodeSettings, expected_kv_bytes, make_cache, row_fill, skip_reason, time_decode
from spkv.bench.machine import MIB, weight_bytes


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
        times = [t for rep in time_decode(model, cache, token, 1, 2, 1)[0] for t in rep]
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


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def estimate_line(s: DecodeSettings, estimate: dict[str, Any], rows: int) -> str:
    longest = estimate["longest_row"]
    line = (f"bench decode: {rows} rows ({s.fill} fill), estimated ~{duration(estimate['total_s'])} "
            f"(fill ~{duration(estimate['fill_s'])}, decode steps ~{duration(estimate['decode_s'])}; rough, model loading not counted)")
    if longest and longest["total_s"] > 0:
        line += (f"; longest row {longest['cache']} ctx={longest['context']} B={longest['batch']} "
                 f"~{duration(longest['total_s'])}")
    return line

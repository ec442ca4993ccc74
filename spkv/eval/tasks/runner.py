"""Running the task suite: greedy answers through each method's cache, sample by sample, resumable."""


from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers.cache_utils import Cache

from spkv.cache import SPKVCache
from spkv.compat import CACHE_ARG, output_cache
from spkv.eval.tasks.prompts import (
    DEFAULT_LENGTHS,
    TASKS,
    Sample,
    TaskConfig,
    build_suite,
    calibration_set,
)
from spkv.eval.tasks.report import summarize
from spkv.methods import Method, cache_factory
from spkv.results import machine
from spkv.stats import cache_stats


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's metric: the fraction of answers found in the prediction, case-insensitive."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def max_positions(model: torch.nn.Module) -> int | None:
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def generate_answer(model: torch.nn.Module, tokenizer: Any, prompt: str, cache: Cache | None, max_new_tokens: int,
                    prefill_chunk: int | None = 512) -> tuple[str, float | None]:
    """Greedy answer after a chunked prefill through `cache` (None: the model's default cache).

    Returns (text, density); density is the SP-KV cache's kept fraction (None for other caches,
    or when no pair has left the window yet)."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    n = enc.input_ids.shape[1]
    extra = {} if cache is None else {CACHE_ARG: cache}
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
            prefill_chunk_size=prefill_chunk if prefill_chunk and prefill_chunk < n else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **extra,
        )
    text = tokenizer.decode(out.sequences[0, n:], skip_special_tokens=True)
    used = output_cache(out)
    density = None
    if isinstance(used, SPKVCache) and any(layer.is_initialized for layer in used.spkv_layers()):
        value = cache_stats(used).density
        density = None if math.isnan(value) else value
    return text, density


def evaluate_samples(model: torch.nn.Module, tokenizer: Any, samples: list[Sample],
                     make_cache: Callable[[], Cache | None], prefill_chunk: int | None = 512,
                     desc: str = "tasks", done_rows: list[dict[str, Any]] | None = None,
                     on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Generate every sample's answer -> {"cells": per (task, length) score and density, "samples": [...]}.

    Rows in `done_rows` (same task, length and index) are reused; `on_row` gets the rows so far and
    every reused row not reached yet after each new one, so a long run can resume mid-method and a
    stop part way loses no earlier sample."""
    reuse = {(r["task"], r["length"], r["index"]): r for r in done_rows or []}
    keys = [(s.task, s.length, s.index) for s in samples]
    rows = []
    cpu = machine().get("cpu_model")  # per row: a run grown over sessions may span machines
    # the bar starts at the reused rows' count and moves only for generated ones
    with tqdm(total=len(samples), desc=desc, unit="sample", initial=sum(k in reuse for k in keys)) as bar:
        for i, (s, key) in enumerate(zip(samples, keys)):
            if key in reuse:
                rows.append(reuse[key])
                continue
            start = time.perf_counter()
            text, density = generate_answer(model, tokenizer, s.prompt, make_cache(), s.max_new_tokens, prefill_chunk)
            rows.append({"task": s.task, "length": s.length, "index": s.index, "prompt_tokens": s.prompt_tokens,
                         "answers": s.answers, "prediction": text, "score": string_match_all(text, s.answers),
                         "density": density, "seconds": round(time.perf_counter() - start, 3), "cpu": cpu})
            bar.update(1)
            if on_row is not None:
                on_row(rows + [reuse[k] for k in keys[i + 1:] if k in reuse])
    return {"cells": summarize(rows), "samples": rows}


def usable_lengths(model: torch.nn.Module, lengths: Iterable[int]) -> tuple[list[int], list[int]]:
    """(lengths within the model's positions, skipped ones)."""
    limit = max_positions(model)
    lengths = list(lengths)
    ok = [n for n in lengths if limit is None or n <= limit]
    return ok, [n for n in lengths if n not in ok]


def _header(lengths: list[int], skipped: list[int], tasks: list[str], samples_per_cell: int, seed: int,
            prefill_chunk: int | None, config: TaskConfig) -> dict[str, Any]:
    return {"lengths": lengths, "skipped_lengths": skipped, "tasks": tasks, "samples_per_cell": samples_per_cell,
            "seed": seed, "prefill_chunk": prefill_chunk, "config": asdict(config)}


def run_suite(model: torch.nn.Module, tokenizer: Any, lengths: Iterable[int] = DEFAULT_LENGTHS,
              tasks: Iterable[str] = TASKS, samples_per_cell: int = 4, seed: int = 0,
              make_cache: Callable[[], Cache | None] = lambda: None, max_new_tokens: int | None = None,
              prefill_chunk: int | None = 512, config: TaskConfig | None = None) -> dict[str, Any]:
    """Build the suite for this tokenizer and run it with caches from make_cache (one per sample).

    Lengths beyond the model's positions are skipped (listed in "skipped_lengths")."""
    cfg, tasks = config or TaskConfig(), list(tasks)
    ok, skipped = usable_lengths(model, lengths)
    samples = build_suite(tokenizer, ok, tasks, samples_per_cell, seed, cfg, max_new_tokens)
    return {**_header(ok, skipped, tasks, samples_per_cell, seed, prefill_chunk, cfg),
            **evaluate_samples(model, tokenizer, samples, make_cache, prefill_chunk)}


def run_methods(model: torch.nn.Module, tokenizer: Any, methods: list[Method], lengths: Iterable[int] = DEFAULT_LENGTHS,
                tasks: Iterable[str] = TASKS, samples_per_cell: int = 4, seed: int = 0,
                max_new_tokens: int | None = None, prefill_chunk: int | None = 512,
                config: TaskConfig | None = None, resume: dict[str, Any] | None = None,
                save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The same samples for every method -> {"methods": [{"method", "threshold", "cells", "samples"}], ...}.

    `resume` is an earlier result (partial, as `save` got it, or finished) with the same settings:
    its samples are reused as they are and only missing ones run, so an interrupted run continues
    and a finished one can grow to more samples per cell.
    `save` gets the partial result after every sample, so a long suite can resume."""
    cfg, tasks = config or TaskConfig(), list(tasks)
    ok, skipped = usable_lengths(model, lengths)
    samples = build_suite(tokenizer, ok, tasks, samples_per_cell, seed, cfg, max_new_tokens)
    header = _header(ok, skipped, tasks, samples_per_cell, seed, prefill_chunk, cfg)
    done = {}
    if resume:
        wanted = json.loads(json.dumps(header, default=str))  # as the saved file holds it
        changed = [k for k in wanted if k != "samples_per_cell" and resume.get(k) != wanted[k]]
        if changed:
            raise ValueError(f"The earlier run was made with other settings ({', '.join(changed)}): rerun with "
                             "the same settings, or start again without resuming.")
        done = {r["label"]: r for r in resume["methods"]}
    runs: list[dict[str, Any]] = []
    for m in methods:
        prior = done.get(m.label)
        head = {"method": m.name, "label": m.label, "threshold": m.threshold, "sinks": m.sinks}

        def on_row(rows: list[dict[str, Any]], head: dict[str, Any] = head) -> None:
            if save is not None:
                save({**header, "methods": runs + [{**head, "partial": True, "samples": rows}]})

        res = evaluate_samples(model, tokenizer, samples, cache_factory(model, m), prefill_chunk, desc=m.label,
                               done_rows=prior["samples"] if prior else None, on_row=on_row)
        runs.append({**head, **res})
        if save is not None:
            save({**header, "methods": runs})
    return {**header, "methods": runs}


def parse_methods(names: list[str], thresholds: list[str] | None = None, calibrated: bool = False) -> list[Method]:
    """--methods NAME ... with --threshold NAME=VALUE ... -> Methods (a threshold for an unlisted method is an error)."""
    taus: dict[str, float] = {}
    for item in thresholds or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--threshold takes NAME=VALUE (e.g. spkv=0.5), got {item!r}")
        taus[name] = float(value)
    unknown = sorted(set(taus) - set(names))
    if unknown:
        raise ValueError(f"--threshold given for {', '.join(unknown)}, which is not in --methods")
    for n in names:
        if n not in taus and n not in ("dense", "spkv", "lkv", "streaming") and not calibrated:
            warnings.warn(f"{n} runs at its class default threshold, which sets its density arbitrarily: give "
                          f"--threshold {n}=VALUE or --match-density D", stacklevel=2)
    return [Method(n, taus.get(n)) for n in names]


def calibrate_suite(model: torch.nn.Module, tokenizer: Any, methods: list[Method], target: float, path: Path, *,
                    on: str = "tasks", tokens: int = 2048, prefill_chunk: int | None = 512,
                    tasks: Iterable[str] = TASKS, seed: int = 0, config: TaskConfig | None = None,
                    max_new_tokens: int | None = None, heldout: str | None = None, sequences: int = 2,
                    resume: bool = False) -> dict[str, Any]:
    """Thresholds giving `target` density for every method without one (the policies and SP-KV's
    tau; dense and StreamingLLM have none), on one prompt per task at index -1, which the suite
    never evaluates (on="tasks"), or on held-out documents (on="heldout"). Saved to `path`; with
    `resume`, a saved calibration with the same settings that covers these methods is reused."""
    from spkv.data.heldout import heldout_set
    from spkv.eval.calibrate import UNMATCHED, MatchSettings, calibrate_methods
    from spkv.results import write_json

    cfg = config or TaskConfig()
    names = [m.name for m in methods if m.name != "dense" and m.name not in UNMATCHED and m.threshold is None]
    key: dict[str, Any] = {"target_density": target, "on": on, "tokens": tokens, "prefill_chunk": prefill_chunk}
    if on == "heldout":
        key["sequences"] = sequences
    else:
        key.update(tasks=list(tasks), seed=seed, config=asdict(cfg), max_new_tokens=max_new_tokens)
    saved = json.loads(path.read_text()) if resume and path.exists() else {}
    if saved and all(saved.get(k) == v for k, v in key.items()) and set(names) <= set(saved["methods"]):
        return saved
    if on == "heldout":
        data = heldout_set(tokenizer, seq_len=tokens, max_sequences=sequences, corpus=heldout)
    else:
        data = calibration_set(tokenizer, tokens, key["tasks"], seed, cfg, max_new_tokens)
    found = calibrate_methods(model, data, names, target, MatchSettings(chunk=prefill_chunk, score=False))
    calibration = {**key, "documents": data.doc_ids, "methods": {k: v.summary() for k, v in found.items()}}
    write_json(path, calibration)
    return calibration


def with_calibration(methods: list[Method], calibration: dict[str, Any] | None) -> list[Method]:
    """The methods with the thresholds a calibration found (others unchanged)."""
    found = (calibration or {}).get("methods", {})
    return [replace(m, threshold=found[m.name]["threshold"]) if m.name in found else m for m in methods]


def resume_from(earlier: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What `run_methods(resume=...)` continues from: the interrupted run (its settings and methods),
    plus any method only the last finished run has."""
    from spkv.results import merge_by

    if not earlier:
        return None
    return {**earlier[0], "methods": list(merge_by(earlier, "methods", "label").values())}

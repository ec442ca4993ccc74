"""Quality at matched density: every method behind the same rule, each baseline's threshold
calibrated so its density matches SP-KV's, NLL compared on the same held-out documents.

SP-KV runs the exact full-sequence hard-phase forward (proven equal to the compressed cache).
Baselines run on the dense control through the real compressed cache with their scoring policy and
4 sinks, prefilled in chunks of `chunk` tokens; other learned adapters (learned_row) run on their own
weights through the same cache with the sinks they were trained with. Write-time policies are exact at any chunk size;
for the ones that score by attention received, the chunked run is compared with the exact
token-by-token run on a sample, and that error is part of the result.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from spkv.data.heldout import HeldoutSet
from spkv.eval.calibrate import UNMATCHED, Calibration, MatchSettings, calibrate, decides_late
from spkv.eval.nll import nll_full_sequence, nll_with_policy
from spkv.eval.stats import paired_dnll
from spkv.policies import POLICIES, ScoringPolicy
from spkv.results import adapter_digest


def first_then_all(fit: Callable[[HeldoutSet, float], Calibration], data: HeldoutSet, start: float,
                   settings: MatchSettings) -> tuple[Calibration, Calibration]:
    """A first estimate on the calibration documents, then on all of them starting from it (usually
    one run): `fit(documents, start)` is calibrate for a threshold or _scale_budget for LKV's r."""
    first = fit(data.subset(settings.calibration_sequences), start)
    return first, fit(data, first.threshold)


def matched_row(model: torch.nn.Module, data: HeldoutSet, method: str, target: float, settings: MatchSettings,
                policy_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One baseline: calibrate on the first documents, then on all of them from that threshold (one
    run when the first estimate holds), and measure the chunking error if any."""
    cls = POLICIES[method]
    kwargs = policy_kwargs or {}

    def make(threshold: float) -> ScoringPolicy:
        return cls(threshold=threshold, **kwargs)

    chunk = settings.chunk if decides_late(cls) else settings.exact_chunk
    settings = replace(settings, chunk=chunk)
    row: dict[str, Any] = {"method": method, "chunk": chunk}
    if method in UNMATCHED:
        result = nll_with_policy(model, data, make(0.0), sinks=settings.sinks, chunk=chunk, desc=method)
        row.update(threshold=None, calibration=None, **asdict(result))
        return row
    first, calib = first_then_all(lambda docs, start: calibrate(model, docs, make, target, settings, desc=method, start=start),
                                  data, -math.inf, settings)
    threshold = calib.threshold
    row.update(threshold=threshold, calibration={"first": first.summary(), "all": calib.summary()}, **asdict(calib.result))
    if decides_late(cls) and chunk > 1 and settings.exactness_sequences:
        sample = data.subset(settings.exactness_sequences)
        sample.input_ids = sample.input_ids[:, : settings.exactness_tokens]
        row["exactness"] = chunking_error(model, sample, make(threshold), settings)
    return row


def chunking_error(model: torch.nn.Module, sample: HeldoutSet, policy: ScoringPolicy, settings: MatchSettings) -> dict[str, Any]:
    """The chunked run against the exact token-by-token run on the sample documents."""
    exact = nll_with_policy(model, sample, policy, sinks=settings.sinks, chunk=1, desc=f"{policy.name} exact")
    chunked = nll_with_policy(model, sample, policy, sinks=settings.sinks, chunk=settings.chunk, desc=f"{policy.name} chunked")
    return {
        "documents": sample.doc_ids, "tokens": int(sample.input_ids.shape[1]), "nll_exact": exact.nll, "nll_chunked": chunked.nll,
        "nll_error_pct": 100 * (chunked.nll - exact.nll) / exact.nll, "density_exact": exact.density, "density_chunked": chunked.density,
    }


def add_dnll(rows: list[dict[str, Any]], reference: dict[str, Any], base: dict[str, Any]) -> None:
    """dNLL% vs the reference and the base model, with the paired standard error over documents."""
    for r in rows:
        r["dnll_pct"] = 100 * (r["nll"] - reference["nll"]) / reference["nll"]
        r["dnll_pct_stderr"] = paired_dnll(r["nll_per_sequence"], reference["nll_per_sequence"], reference["nll"])[1]
        r["dnll_pct_vs_base"] = 100 * (r["nll"] - base["nll"]) / base["nll"]


def learned_row(model_name: str, label: str, adapter_dir: str | Path, data: HeldoutSet, target: float,
                settings: MatchSettings) -> dict[str, Any]:
    """Another learned system's adapter through the same compressed cache, at the target density.

    An SP-KV gate trained another way (e.g. with the LLM frozen) gets its tau calibrated like a
    baseline's threshold; an LKV model keeps density ~ r by construction, so its budget r is scaled by
    target / density until it is within the tolerance. Both decide at write time: exact at any chunk,
    with the sinks the adapter was trained with."""
    from spkv.adapter import load_adapter, read_adapter_config
    from spkv.models import load_model
    from spkv.policies import SPKVPolicy

    model, _ = load_model(model_name)
    load_adapter(model, adapter_dir)
    model.eval()
    config = model.spkv_config
    settings = replace(settings, sinks=config.sinks, chunk=settings.exact_chunk)
    row: dict[str, Any] = {"method": label, "adapter": str(adapter_dir), "adapter_sha256": adapter_digest(adapter_dir),
                           "train_tokens": read_adapter_config(adapter_dir)["metadata"].get("tokens"), "chunk": settings.chunk}
    if config.lkv is None:
        def make(threshold: float) -> SPKVPolicy:
            return SPKVPolicy(threshold=threshold)

        knob, start = "tau", config.threshold

        def fit(docs: HeldoutSet, start: float) -> Calibration:
            return calibrate(model, docs, make, target, settings, desc=label, start=start)
    else:
        knob, start = "r", config.lkv.budget

        def fit(docs: HeldoutSet, start: float) -> Calibration:
            return _scale_budget(model, docs, start, target, settings, desc=label)
    first, calib = first_then_all(fit, data, start, settings)
    row.update(knob=knob, threshold=calib.threshold, calibration={"first": first.summary(), "all": calib.summary()},
               **asdict(calib.result))
    return row


def _scale_budget(model: torch.nn.Module, data: HeldoutSet, budget: float, target: float, settings: MatchSettings,
                  desc: str) -> Calibration:
    """An LKV model's budget r at the target density: r scaled by target / density until the density
    is within the tolerance (density ~ r by construction), or r stops moving (saturated at 1). The
    model is left at the best r."""
    from spkv.lkv import set_budget
    from spkv.policies import LKVPolicy

    history: list[tuple[float, float]] = []
    best: Calibration | None = None
    for it in range(max(1, settings.max_iterations)):
        set_budget(model, budget)
        result = nll_with_policy(model, data, LKVPolicy(), sinks=settings.sinks, chunk=settings.chunk,
                                 desc=f"{desc} #{it} r={budget:.3g}", score=settings.score)
        history.append((budget, result.density))
        if best is None or abs(result.density - target) < abs(best.density - target):
            best = Calibration(budget, result.density, history, result)
        step = min(1.0, budget * target / max(result.density, 1e-6))
        if abs(result.density - target) <= settings.tolerance or step == budget:
            break
        budget = step
    set_budget(model, best.threshold)
    return best


def compare(model_name: str, adapter: str, control: str | None, tau: float, methods: list[str], data: HeldoutSet,
            settings: MatchSettings, out: Path, kvzap_train: torch.Tensor | None = None,
            done: dict[str, dict[str, Any]] | None = None, save: Callable[[dict[str, Any]], None] | None = None,
            learned: dict[str, str] | None = None) -> dict[str, Any]:
    """The paper's main table: base, dense control, SP-KV at tau, and each baseline at SP-KV's density;
    then each `learned` adapter (label -> folder) at that density (learned_row).

    `done` holds rows of an interrupted run (by method) that are reused (a learned row only if its
    adapter's weights are the same); `save` is called after every row so a long run can resume.
    control=None: the baselines run on the untouched base model and dNLL% is against it, the fair
    reference for learned systems trained with the LLM frozen."""
    from spkv.adapter import load_adapter, read_adapter_config
    from spkv.config import SPKVConfig
    from spkv.convert import convert, set_threshold
    from spkv.models import load_model

    done = dict(done or {})
    rows: dict[str, dict[str, Any]] = {}

    def run(key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        rows[key] = done[key] if key in done else fn()
        if save is not None:
            save({"rows": list(rows.values())})
        return rows[key]

    def full(label: str, adapter_dir: str | None = None, threshold: float | None = None) -> dict[str, Any]:
        model, _ = load_model(model_name)
        if adapter_dir:
            load_adapter(model, adapter_dir)
        if threshold is not None:
            set_threshold(model, threshold)
        return {"method": label, "threshold": threshold, "chunk": None, **asdict(nll_full_sequence(model, data, label))}

    base = run("base model", lambda: full("base model"))
    spkv = run("SP-KV", lambda: full("SP-KV", adapter, tau))
    reference = base if control is None else run("dense control", lambda: full("dense control", control))
    model, _ = load_model(model_name)  # the baselines run on the dense control (or the base model)
    if control is None:
        convert(model, SPKVConfig(window=read_adapter_config(adapter)["spkv"]["window"]))
    else:
        load_adapter(model, control)
    model.eval()
    control_digest = "base model" if control is None else adapter_digest(control)
    target = spkv["density"]
    for method in methods:
        if method == "kvzap":
            run(method, lambda: _kvzap_row(model, data, target, settings, out, kvzap_train, control_digest))
        else:
            run(method, lambda m=method: matched_row(model, data, m, target, settings))
    model = None  # free the control: each learned row loads its own model
    for label, folder in (learned or {}).items():
        if label in done and done[label].get("adapter_sha256") != adapter_digest(folder):
            del done[label]  # the adapter was retrained since: measure it again
        run(label, lambda lab=label, f=folder: learned_row(model_name, lab, f, data, target, settings))
    ordered = list(rows.values())
    add_dnll(ordered, reference, base)
    return {"model": model_name, "adapter": adapter, "control": control, "tau": tau, "target_density": target,
            "seq_len": int(data.input_ids.shape[1]), "sequences": len(data.doc_ids), "doc_ids": data.doc_ids,
            "settings": asdict(settings), "rows": ordered}


def _kvzap_row(model: torch.nn.Module, data: HeldoutSet, target: float, settings: MatchSettings, out: Path,
               train_sequences: torch.Tensor | None, control_digest: str) -> dict[str, Any]:
    """Fit (or reuse, if fitted on this same control) the KVzap surrogate on training text, then
    calibrate and run it like any baseline."""
    from spkv.eval.kvzap import (
        KVzapConfig,
        fit_kvzap,
        installed,
        load_regressors,
        regressors_metadata,
        save_regressors,
    )

    path = out / "kvzap_regressors.safetensors"
    if path.exists() and regressors_metadata(path).get("control_sha256") == control_digest:
        regressors = load_regressors(path)
    else:
        if path.exists():
            print(f"note: {path} was fitted on another control; fitting it again", file=sys.stderr)
        if train_sequences is None:
            raise ValueError("The kvzap baseline needs training sequences to fit its regressors.")
        config = KVzapConfig(sequences=len(train_sequences), seq_len=int(train_sequences.shape[1]))
        regressors = fit_kvzap(model, train_sequences, model.spkv_config.window, config)
        save_regressors(regressors, path, {**asdict(config), "control_sha256": control_digest})
    with installed(model, regressors):
        return matched_row(model, data, "kvzap", target, settings)


def matched_markdown(result: dict[str, Any]) -> str:
    vs_control = result["control"] is not None  # else the reference is the base model: no second column
    on = "the dense control" if vs_control else "the untouched base model"
    lines = [
        f"Held-out NLL of {result['model']} at {result['seq_len']} tokens on {result['sequences']} documents never seen in "
        f"training. Baselines run on {on} through the compressed cache (window 128, {result['settings']['sinks']} "
        f"sinks, prefill chunk {result['settings']['exact_chunk']} for write-time scores and "
        f"{result['settings']['chunk']} for attention-based ones), each threshold calibrated to SP-KV's density "
        f"({100 * result['target_density']:.1f}% at tau {result['tau']:g}) within {100 * result['settings']['tolerance']:.0f} point. "
        f"dNLL% is against {on} (± paired standard error over documents)."
        + (" Rows with a knob in brackets are other learned adapters on their own weights, through the same cache with "
           "the sinks they were trained with: an SP-KV gate's tau calibrated, an LKV model's budget r scaled, to the same "
           "density." if any(r.get("knob") for r in result["rows"]) else ""),
        "",
        "| method | threshold | density (layers x heads) | density (token-weighted) | NLL | "
        f"dNLL% vs {'control' if vs_control else 'base'} (± paired s.e.) | "
        + ("dNLL% vs base | " if vs_control else "") + "chunking error (NLL and density, chunked minus exact) |",
        "| --- " * (8 if vs_control else 7) + "|",
    ]
    for r in result["rows"]:
        thr = "" if r["threshold"] is None else f"{r['threshold']:.4g}" + (f" ({r['knob']})" if r.get("knob") else "")
        dens = "" if r["density"] is None else f"{100 * r['density']:.1f}%"
        densw = "" if r["density_token_weighted"] is None else f"{100 * r['density_token_weighted']:.1f}%"
        ex = r.get("exactness")
        err = (f"{ex['nll_error_pct']:+.2f}%, {100 * (ex['density_chunked'] - ex['density_exact']):+.1f} pts "
               f"({len(ex['documents'])} doc x {ex['tokens']} tokens)") if ex else ""
        vs_base = f"| {r['dnll_pct_vs_base']:+.2f}% " if vs_control else ""
        lines.append(f"| {r['method']} | {thr} | {dens} | {densw} | {r['nll']:.4f} | {r['dnll_pct']:+.2f}% ± {r['dnll_pct_stderr']:.2f} "
                     f"{vs_base}| {err} |")
    return "\n".join(lines) + "\n"


def plot_matched(result: dict[str, Any], out: Path) -> Path:
    """quality_vs_density.png: dNLL% against density, one point per method (with paired s.e.)."""
    from spkv.results import finish_dnll_plot, pyplot

    fig, ax = pyplot().subplots(figsize=(6, 4.2))
    for i, r in enumerate(r for r in result["rows"] if r["density"] is not None and r["method"] != "dense control"):
        ax.errorbar(100 * r["density"], r["dnll_pct"], yerr=r["dnll_pct_stderr"], fmt="os^vD<>P*X"[i % 10],
                    capsize=3, label=r["method"])
    ax.axvline(100 * result["target_density"], color="gray", linestyle=":", linewidth=0.8)
    return finish_dnll_plot(fig, ax, result, "density (% of out-of-window pairs kept)", out / "quality_vs_density.png")

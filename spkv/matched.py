"""Quality at matched density: every method behind the same rule, each baseline's threshold
calibrated so its density matches SP-KV's, NLL compared on the same held-out documents.

SP-KV runs the exact full-sequence hard-phase forward (proven equal to the compressed cache).
Baselines run on the dense control through the real compressed cache with their scoring policy and
4 sinks, prefilled in chunks of `chunk` tokens. Write-time policies are exact at any chunk size;
for the ones that score by attention received, the chunked run is compared with the exact
token-by-token run on a sample, and that error is part of the result.
"""

from __future__ import annotations

import copy
import hashlib
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .evaluate import HeldoutSet, NLLResult, nll_full_sequence, nll_with_policy
from .policies import POLICIES, ScoringPolicy

# Methods with no threshold to calibrate: they are reported at the density they have.
UNMATCHED = {"streaming", "keep_all"}


@dataclass
class MatchSettings:
    tolerance: float = 0.01  # |density - target|, absolute (protocols.md: within 1 point)
    calibration_sequences: int = 4  # calibrate on the first documents, then confirm on all
    max_iterations: int = 6
    chunk: int = 32  # prefill chunk of the attention-based baselines (approximate: error measured)
    exact_chunk: int = 512  # prefill chunk of the write-time baselines (exact at any chunk)
    exactness_sequences: int = 1  # documents re-run token by token for attention-based policies
    exactness_tokens: int = 1024  # ... on their first tokens (token by token is slow on CPU)
    sinks: int = 4
    seed: int = 0
    score: bool = True  # False: calibrate on density alone (no NLL; much faster for large vocabularies)


@dataclass
class Calibration:
    threshold: float
    density: float  # on the calibration documents
    history: list[tuple[float, float]] = field(default_factory=list)  # (threshold, density) tried
    result: NLLResult | None = field(default=None, repr=False)  # the run at `threshold`

    def summary(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "density": self.density, "history": self.history}


def _subset(data: HeldoutSet, n: int) -> HeldoutSet:
    return HeldoutSet(data.input_ids[:n], data.doc_ids[:n], data.sources[:n])


def _recording(policy: ScoringPolicy) -> tuple[ScoringPolicy, list[torch.Tensor]]:
    """A copy of `policy` that also records the scores pairs have when they are decided.

    Write-time policies: every new score. Attention-based ones: the oldest window scores after each
    observe (the pairs about to leave). Used only to guess the next threshold; the density itself is
    always measured by the cache."""
    seen: list[torch.Tensor] = []
    rec = copy.copy(policy)
    score_new, observe, observe_queries = policy.score_new, policy.observe, policy.observe_queries

    def recorded_new(keys, values, gate_logits):
        scores = score_new(keys, values, gate_logits)
        if not decides_late(policy):
            seen.append(scores.detach().flatten().cpu())
        return scores

    def recorded_observe(scores, probs):
        scores = observe(scores, probs)
        if not policy.needs_queries:
            seen.append(scores[:, :, : probs.shape[3]].detach().flatten().cpu())
        return scores

    def recorded_observe_queries(scores, keys, values, queries, scaling):
        scores = observe_queries(scores, keys, values, queries, scaling)
        leaving = keys.shape[2] - queries.shape[3]  # the cache holds min(seen, window) queries
        seen.append(scores[:, :, :leaving].detach().flatten().cpu())
        return scores

    rec.score_new, rec.observe, rec.observe_queries = recorded_new, recorded_observe, recorded_observe_queries
    return rec, seen


def decides_late(policy: ScoringPolicy | type[ScoringPolicy]) -> bool:
    """Scores that change after writing are final only when the pair leaves: chunked runs approximate them."""
    return policy.needs_attention or policy.needs_queries


def _quantile(scores: list[torch.Tensor], q: float, seed: int) -> float:
    values = torch.cat(scores).float()
    values = values[torch.isfinite(values)]
    if values.numel() > 4_000_000:
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(seed))[:4_000_000]]
    return float(torch.quantile(values, q))


def calibrate(model: torch.nn.Module, data: HeldoutSet, make_policy: Callable[[float], ScoringPolicy], target: float,
              settings: MatchSettings, desc: str = "calibrate", start: float = -math.inf) -> Calibration:
    """Find a threshold whose density is within settings.tolerance of `target` on `data`.

    Density falls as the threshold rises. Each run's recorded scores map the density gap to a
    threshold step (quantile at the target minus quantile at the measured density); once the target
    is bracketed, a step that leaves the bracket is replaced by linear interpolation."""
    lo: tuple[float, float] | None = None  # (threshold, density > target)
    hi: tuple[float, float] | None = None  # (threshold, density < target)
    threshold, history, best = start, [], None  # -inf: keep everything first, only to record the scores
    for it in range(settings.max_iterations):
        policy, scores = _recording(make_policy(threshold))
        result = nll_with_policy(model, data, policy, sinks=settings.sinks, chunk=settings.chunk, desc=f"{desc} #{it}",
                                 score=settings.score)
        density = result.density
        history.append((threshold, density))
        if best is None or abs(density - target) < abs(best.density - target):
            best = Calibration(threshold, density, history, result)
        if abs(density - target) <= settings.tolerance:
            break
        if density > target:
            lo = (threshold, density)
        else:
            hi = (threshold, density)
        guess = _quantile(scores, 1.0 - target, settings.seed)
        if math.isfinite(threshold):  # recorded scores are only an estimate: move by their quantile gap
            guess = threshold + guess - _quantile(scores, 1.0 - density, settings.seed)
        inside = (lo is None or guess > lo[0]) and (hi is None or guess < hi[0])
        if not inside and lo is not None and hi is not None and math.isfinite(lo[0]):
            # interpolate the density linearly between the bracket's ends
            guess = lo[0] + (hi[0] - lo[0]) * (lo[1] - target) / (lo[1] - hi[1])
        threshold = guess
    return best


def calibrate_methods(model: torch.nn.Module, data: HeldoutSet, methods: list[str], target: float,
                      settings: MatchSettings) -> dict[str, Calibration]:
    """Thresholds at which each policy's density matches `target` on `data` (prefill chunk
    settings.chunk for every policy, as the caller will run them), e.g. for the task suite."""
    out = {}
    for method in methods:
        if method in UNMATCHED:
            continue
        cls = POLICIES[method]
        out[method] = calibrate(model, data, lambda t, c=cls: c(threshold=t), target, settings, desc=f"{method} calibrate")
    return out


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
    # a first estimate on a few documents, then on all of them starting from it (usually one run)
    first = calibrate(model, _subset(data, settings.calibration_sequences), make, target, settings, desc=f"{method} calibrate")
    calib = calibrate(model, data, make, target, settings, desc=method, start=first.threshold)
    threshold = calib.threshold
    row.update(threshold=threshold, calibration={"first": first.summary(), "all": calib.summary()}, **asdict(calib.result))
    if decides_late(cls) and chunk > 1 and settings.exactness_sequences:
        sample = _subset(data, settings.exactness_sequences)
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
    ref = reference["nll_per_sequence"]
    for r in rows:
        diffs = [100 * (a - b) / reference["nll"] for a, b in zip(r["nll_per_sequence"], ref)]
        mean = sum(diffs) / len(diffs)
        r["dnll_pct"] = 100 * (r["nll"] - reference["nll"]) / reference["nll"]
        r["dnll_pct_stderr"] = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1) / len(diffs))
        r["dnll_pct_vs_base"] = 100 * (r["nll"] - base["nll"]) / base["nll"]


def compare(model_name: str, adapter: str, control: str, tau: float, methods: list[str], data: HeldoutSet,
            settings: MatchSettings, out: Path, kvzap_train: torch.Tensor | None = None,
            done: dict[str, dict[str, Any]] | None = None, save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The paper's main table: base, dense control, SP-KV at tau, and each baseline at SP-KV's density.

    `done` holds rows of an interrupted run (by method) that are reused; `save` is called after
    every row so a long run can resume."""
    from .adapter import load_adapter
    from .convert import set_threshold
    from .models import load_model

    done = dict(done or {})
    rows: dict[str, dict[str, Any]] = {}

    def run(key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        rows[key] = done[key] if key in done else fn()
        if save is not None:
            save({"rows": list(rows.values())})
        return rows[key]

    def full(model: torch.nn.Module, label: str, threshold: float | None) -> dict[str, Any]:
        return {"method": label, "threshold": threshold, "chunk": None, **asdict(nll_full_sequence(model, data, label))}

    base_model, _ = load_model(model_name)
    base = run("base model", lambda: full(base_model, "base model", None))
    del base_model
    spkv_model, _ = load_model(model_name)
    load_adapter(spkv_model, adapter)
    set_threshold(spkv_model, tau)
    spkv = run("SP-KV", lambda: full(spkv_model, "SP-KV", tau))
    del spkv_model
    model, _ = load_model(model_name)
    load_adapter(model, control)
    model.eval()
    reference = run("dense control", lambda: full(model, "dense control", None))
    target = spkv["density"]
    for method in methods:
        if method == "kvzap":
            run(method, lambda: _kvzap_row(model, data, target, settings, out, kvzap_train, _file_digest(control)))
        else:
            run(method, lambda m=method: matched_row(model, data, m, target, settings))
    ordered = list(rows.values())
    add_dnll(ordered, reference, base)
    return {"model": model_name, "adapter": adapter, "control": control, "tau": tau, "target_density": target,
            "seq_len": int(data.input_ids.shape[1]), "sequences": len(data.doc_ids), "doc_ids": data.doc_ids,
            "settings": asdict(settings), "rows": ordered}


def _file_digest(adapter_dir: str | Path) -> str:
    """sha256 of an adapter's weights: which control a KVzap fit belongs to, even if its folder is reused."""
    digest = hashlib.sha256()
    with open(Path(adapter_dir) / "adapter.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kvzap_row(model: torch.nn.Module, data: HeldoutSet, target: float, settings: MatchSettings, out: Path,
               train_sequences: torch.Tensor | None, control_digest: str) -> dict[str, Any]:
    """Fit (or reuse, if fitted on this same control) the KVzap surrogate on training text, then
    calibrate and run it like any baseline."""
    from .kvzap import KVzapConfig, fit_kvzap, installed, load_regressors, regressors_metadata, save_regressors

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
    lines = [
        f"Held-out NLL of {result['model']} at {result['seq_len']} tokens on {result['sequences']} documents never seen in "
        f"training. Baselines run on the dense control through the compressed cache (window 128, {result['settings']['sinks']} "
        f"sinks, prefill chunk {result['settings']['exact_chunk']} for write-time scores and {result['settings']['chunk']} for attention-based ones), each threshold calibrated to SP-KV's density "
        f"({100 * result['target_density']:.1f}% at tau {result['tau']:g}) within {100 * result['settings']['tolerance']:.0f} point. "
        "dNLL% is against the dense control (± paired standard error over documents).",
        "",
        "| method | threshold | density (layers x heads) | density (token-weighted) | NLL | dNLL% vs control | dNLL% vs base | chunking error (NLL and density, chunked minus exact) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        thr = "" if r["threshold"] is None else f"{r['threshold']:.4g}"
        dens = "" if r["density"] is None else f"{100 * r['density']:.1f}%"
        densw = "" if r["density_token_weighted"] is None else f"{100 * r['density_token_weighted']:.1f}%"
        ex = r.get("exactness")
        err = (f"{ex['nll_error_pct']:+.2f}%, {100 * (ex['density_chunked'] - ex['density_exact']):+.1f} pts "
               f"({len(ex['documents'])} doc x {ex['tokens']} tokens)") if ex else ""
        lines.append(f"| {r['method']} | {thr} | {dens} | {densw} | {r['nll']:.4f} | {r['dnll_pct']:+.2f}% ± {r['dnll_pct_stderr']:.2f} "
                     f"| {r['dnll_pct_vs_base']:+.2f}% | {err} |")
    return "\n".join(lines) + "\n"


def plot_matched(result: dict[str, Any], out: Path) -> Path:
    """quality_vs_density.png: dNLL% against density, one point per method (with paired s.e.)."""
    from .results import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, r in enumerate(r for r in result["rows"] if r["density"] is not None and r["method"] != "dense control"):
        ax.errorbar(100 * r["density"], r["dnll_pct"], yerr=r["dnll_pct_stderr"], fmt="os^vD<>P*X"[i % 10],
                    capsize=3, label=r["method"])
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.axvline(100 * result["target_density"], color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("density (% of out-of-window pairs kept)")
    ax.set_ylabel("dNLL% vs dense control")
    ax.set_title(f"{result['model']}, {result['seq_len']} tokens, {result['sequences']} held-out documents", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = save_figure(fig, out / "quality_vs_density.png")
    plt.close(fig)
    return path

"""Held-out quality and density: the numbers users choose a KV-compression method by.

SP-KV is measured with the full-sequence hard-phase forward, which the tests prove equal to real
chunked-prefill + decoding with the compressed cache; post-hoc baselines run through the real cache
with their scoring policy (4 sinks, the same window), so each sees what it would see when decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from spkv.cache import SPKVCache
from spkv.compat import CACHE_ARG
from spkv.convert import is_converted
from spkv.data.heldout import HeldoutSet
from spkv.density import forward_with_density, mean_density
from spkv.eval.stats import paired_dnll, stderr
from spkv.policies import ScoringPolicy
from spkv.stats import cache_stats

HEAD_CHUNK = 1024  # positions per LM-head call: [1024, 262k] fp32 logits are 1 GiB (Gemma 3)


def _summed_nll(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of `targets` [n] from final hidden states [n, hidden], the LM head applied
    HEAD_CHUNK positions at a time (as the model's forward applies it, soft-capping included)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[s : s + HEAD_CHUNK]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        total += F.cross_entropy(logits, targets[s : s + HEAD_CHUNK], reduction="sum").double()
    return total


def _plain_forward(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> Any:
    return model(input_ids=ids, use_cache=False, **kwargs)


def _full_forward_nll(model: torch.nn.Module, ids: torch.Tensor, forward: Any = _plain_forward) -> tuple[float, Any]:
    """Mean next-token NLL of one sequence ids [1, T] from forward(model, ids, logits_to_keep=1), reading the
    decoder's final hidden states with a forward hook: the whole sequence's logits would not fit in
    memory at 8k tokens and a 262k vocabulary (8.6 GB in fp32). Returns (nll, the forward's output)."""
    captured: dict[str, torch.Tensor] = {}
    handle = model.base_model.register_forward_hook(lambda module, args, out: captured.update(h=out.last_hidden_state))
    try:
        output = forward(model, ids, logits_to_keep=1)
    finally:
        handle.remove()
    n = ids.shape[1] - 1
    return float(_summed_nll(model, captured["h"][0, :n], ids[0, 1:]) / n), output


@dataclass
class NLLResult:
    nll: float  # mean over sequences of the mean token NLL
    nll_per_sequence: list[float]
    density: float | None = None  # mean over layers x heads (protocols.md)
    density_token_weighted: float | None = None
    density_per_sequence: list[float] | None = None
    density_per_layer_head: list[list[float]] | None = None

    @property
    def stderr(self) -> float:
        return stderr(self.nll_per_sequence)


def nll_full_sequence(model: torch.nn.Module, data: HeldoutSet, desc: str = "eval") -> NLLResult:
    """NLL with the exact full-sequence forward; for a converted model also the density of its gates."""
    converted = is_converted(model)
    per_seq, dens_seq, kept_sum, counted_sum = [], [], 0, 0
    with torch.no_grad():
        for row in tqdm(data.input_ids, desc=desc, unit="seq", leave=False):
            ids = row.unsqueeze(0)
            if converted:
                nll, (_, kept, counted) = _full_forward_nll(model, ids, forward_with_density)
                dens_seq.append(float(mean_density(kept, counted)))
                kept_sum, counted_sum = kept_sum + kept, counted_sum + counted
            else:
                nll, _ = _full_forward_nll(model, ids)
            per_seq.append(nll)
    result = NLLResult(nll=sum(per_seq) / len(per_seq), nll_per_sequence=per_seq)
    if converted:
        per_head = kept_sum / counted_sum.clamp(min=1)
        result.density = float(per_head.mean())
        result.density_token_weighted = float(kept_sum.sum() / counted_sum.sum())
        result.density_per_sequence = dens_seq
        result.density_per_layer_head = per_head.tolist()
    return result


def nll_with_policy(model: torch.nn.Module, data: HeldoutSet, policy: ScoringPolicy, sinks: int = 4,
                    chunk: int = 1, desc: str = "eval", score: bool = True) -> NLLResult:
    """NLL when the real compressed cache decides with `policy`: prefill in chunks of `chunk` tokens
    (chunk=1 is exact for every policy; write-time policies are exact at any chunk size).

    score=False measures density only (nll is NaN): the LM head over every position is most of a
    prefill's cost for a large vocabulary (Gemma 3: 262k)."""
    per_seq, dens_seq, kept_sum, decided_sum = [], [], 0, 0
    keep = {} if score else {"logits_to_keep": 1}
    with torch.no_grad():
        for row in tqdm(data.input_ids, desc=desc, unit="seq", leave=False):
            ids = row.unsqueeze(0)
            cache = SPKVCache(model, policy=policy, sinks=sinks)
            total = torch.zeros((), dtype=torch.float64)
            for s in range(0, ids.shape[1], chunk):
                logits = model(input_ids=ids[:, s : s + chunk], **{CACHE_ARG: cache}, **keep).logits[0]  # [c, V]
                targets = ids[0, s + 1 : s + 1 + logits.shape[0]]  # the sequence's last logit has none
                if score:
                    total += F.cross_entropy(logits[: len(targets)].float(), targets, reduction="sum").double()
            per_seq.append(float(total / (ids.shape[1] - 1)) if score else math.nan)
            stats = cache_stats(cache)
            dens_seq.append(stats.density)
            kept_sum, decided_sum = kept_sum + stats.kept.sum(1), decided_sum + stats.decided.sum(1)
    per_head = kept_sum / decided_sum.clamp(min=1)
    return NLLResult(
        nll=sum(per_seq) / len(per_seq), nll_per_sequence=per_seq, density=float(per_head.float().mean()),
        density_token_weighted=float(kept_sum.sum() / decided_sum.sum()), density_per_sequence=dens_seq,
        density_per_layer_head=per_head.tolist(),
    )


def threshold_sweep(model_name: str, adapter: str, control: str | None, thresholds: list[float], data: HeldoutSet,
                    densities: Sequence[float] = (), calibration: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Held-out NLL of the base model, the dense control and SP-KV at each tau (with its density),
    then at each target density of `densities`, its tau calibrated on `calibration` (token ids of
    documents that are not in `data`: choosing tau on the evaluated documents would be choosing on
    the test set)."""
    from spkv.adapter import load_adapter, read_adapter_config
    from spkv.budget import calibrate
    from spkv.convert import set_threshold
    from spkv.models import load_model

    if densities and not calibration:
        raise ValueError("densities need calibration documents (token ids of documents outside the evaluated set)")
    if any(not 0.0 < d <= 1.0 for d in densities):  # checked before the sweep's minutes, not after
        raise ValueError(f"every target density must be in (0, 1], got {list(densities)}")

    rows = []
    base, _ = load_model(model_name)
    rows.append({"method": "base model", "threshold": None, **nll_full_sequence(base, data, "base").__dict__})
    if control:
        load_adapter(base, control)  # a fresh base is loaded below for SP-KV
        rows.append({"method": "dense control", "threshold": base.spkv_config.threshold, **nll_full_sequence(base, data, "control").__dict__})
    model, _ = load_model(model_name)
    load_adapter(model, adapter)
    for tau in thresholds:
        set_threshold(model, tau)
        rows.append({"method": "SP-KV", "threshold": tau, **nll_full_sequence(model, data, f"spkv tau={tau}").__dict__})
    for target in densities:
        budget = calibrate(model, input_ids=calibration, density=target)  # sets the model's tau
        rows.append({"method": "SP-KV", "threshold": budget.threshold, "target_density": target,
                     "calibration_density": budget.density, "calibration_tokens": budget.tokens,
                     **nll_full_sequence(model, data, f"spkv {100 * target:g}%").__dict__})
    reference = next(r for r in rows if r["method"] == ("dense control" if control else "base model"))
    base_nll = rows[0]["nll"]
    for r in rows:
        r["dnll_pct_vs_reference"] = 100 * (r["nll"] - reference["nll"]) / reference["nll"]
        r["dnll_pct_vs_base"] = 100 * (r["nll"] - base_nll) / base_nll
        r["nll_stderr"] = NLLResult(r["nll"], r["nll_per_sequence"]).stderr
    meta = read_adapter_config(adapter)["metadata"]
    return {
        "model": model_name, "adapter": adapter, "control": control, "reference": reference["method"],
        "seq_len": int(data.input_ids.shape[1]), "sequences": len(data.doc_ids), "doc_ids": data.doc_ids,
        "sources": data.sources, "train_tokens": meta.get("tokens"), "rows": rows,
    }


def paired_dnll_stderr(rows: list[dict[str, Any]], reference: dict[str, Any]) -> list[float]:
    """Standard error of dNLL% from per-document paired differences (same documents for every method)."""
    return [paired_dnll(r["nll_per_sequence"], reference["nll_per_sequence"], reference["nll"])[1] for r in rows]


def sweep_markdown(result: dict[str, Any]) -> str:
    reference = next(r for r in result["rows"] if r["method"] == result["reference"])
    paired = paired_dnll_stderr(result["rows"], reference)
    lines = [
        f"Held-out NLL at {result['seq_len']} tokens, {result['sequences']} documents never seen in training; "
        + (f"adapter trained on {result['train_tokens']} tokens. " if result.get("train_tokens") else "")
        + f"dNLL% vs the {result['reference']}.",
        "",
        "| method | tau | NLL (± s.e. over documents) | dNLL% vs reference (± paired s.e.) | dNLL% vs base "
        "| density (mean layers x heads) | density (token-weighted) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    calibrated = [r for r in result["rows"] if r.get("target_density") is not None]
    if calibrated:
        lines[0] += (f" Rows marked * have tau calibrated to a target density on {calibrated[0]['calibration_tokens']} tokens "
                     "of training-split documents (not the evaluated ones).")
    for r, se in zip(result["rows"], paired):
        tau = "" if r["threshold"] is None else f"{r['threshold']:.3g}"
        if r.get("target_density") is not None:
            tau += f"* (target {100 * r['target_density']:g}%)"
        dens = "" if r["density"] is None else f"{100 * r['density']:.1f}%"
        densw = "" if r["density_token_weighted"] is None else f"{100 * r['density_token_weighted']:.1f}%"
        lines.append(f"| {r['method']} | {tau} | {r['nll']:.4f} ± {r['nll_stderr']:.4f} | {r['dnll_pct_vs_reference']:+.2f}% ± {se:.2f} | "
                     f"{r['dnll_pct_vs_base']:+.2f}% | {dens} | {densw} |")
    return "\n".join(lines) + "\n"

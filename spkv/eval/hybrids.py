"""Hybrids at equal KV memory: the dense control, SP-KV at tau, and each hybrid layout on the same
held-out documents, as held-out NLL against the KV budget.

A hybrid's budget is its share of global units, which is the share of out-of-window memory it keeps
(every unit of a model holds the same bytes per pair); SP-KV's is its measured density. Post-hoc
hybrids put the layout on the dense control's weights, so the difference from the control is the
layout alone; trained hybrids are adapters trained under their layout with the control's recipe.
Every row's density is measured on the documents, not taken from the layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spkv.data.heldout import HeldoutSet
from spkv.eval.nll import nll_full_sequence, paired_dnll_stderr
from spkv.hybrid import HybridLayout, apply_layout
from spkv.results import adapter_digest, finish_dnll_plot, pyplot


def layout_label(layout: HybridLayout, kind: str) -> str:
    seed = f" s{layout.seed}" if layout.seed is not None else ""
    sinks = f" +{layout.sinks} sinks" if layout.sinks else ""
    return f"{layout.design}{seed}{sinks} {layout.budget:g} {kind}"


def trained_layout(adapter: str | Path) -> HybridLayout:
    """The layout an adapter of `spkv train --hybrid-layout` was trained under: the copy in its
    metadata, or (adapters written before it was kept there) the file its train_config names."""
    from spkv.adapter import read_adapter_config

    meta = read_adapter_config(adapter)["metadata"]
    if meta.get("hybrid_layout"):
        return HybridLayout(**{k: v for k, v in meta["hybrid_layout"].items() if k != "global_share"})
    path = meta.get("train_config", {}).get("hybrid_layout")
    if not path:
        raise ValueError(f"{adapter} was not trained under a hybrid layout (its train_config has no hybrid_layout).")
    return HybridLayout.load(path)


# Identity of a row: these must match for an earlier row to be kept; the other identity fields
# (digests, layout units) are checked where the earlier row has them.
_REQUIRED = ("kind", "adapter")


def _same_row(earlier: dict[str, Any], info: dict[str, Any]) -> bool:
    return all(earlier.get(k) == v for k, v in info.items() if k in earlier or k in _REQUIRED)


def compare_hybrids(model_name: str, control: str, spkv_adapter: str, tau: float, layouts: list[str], trained: list[str],
                    data: HeldoutSet, done: dict[str, dict[str, Any]] | None = None,
                    save: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Rows for the control, SP-KV at tau, each layout file on the control's weights (post-hoc) and each
    trained hybrid adapter. `done` rows (by label, from an earlier run on the same documents) are kept
    when they were made with the same adapter, layout and tau; `save` gets the partial result after
    every row, so an interrupted comparison resumes where it stopped and a finished one only adds rows."""
    import spkv
    from spkv.models import load_model

    done = dict(done or {})
    plan: list[tuple[str, dict[str, Any], Callable[[], Any]]] = []

    def fresh(adapter: str) -> Any:
        model, _ = load_model(model_name)
        return spkv.load_adapter(model, adapter)

    def with_tau() -> Any:
        model = fresh(spkv_adapter)
        spkv.set_threshold(model, tau)
        return model

    digests = {a: adapter_digest(a) for a in (control, spkv_adapter, *trained)}
    plan.append(("dense control", {"kind": "control", "adapter": control, "adapter_sha256": digests[control]}, lambda: fresh(control)))
    plan.append((f"SP-KV tau={tau:g}", {"kind": "spkv", "adapter": spkv_adapter, "adapter_sha256": digests[spkv_adapter],
                                         "threshold": tau}, with_tau))
    for path in layouts:
        layout = HybridLayout.load(path)
        info = {"kind": "post-hoc", "layout": path, "design": layout.design, "budget": layout.budget, "adapter": control,
                "adapter_sha256": digests[control], "units": layout.units, "sinks": layout.sinks}
        plan.append((layout_label(layout, "post-hoc"), info, lambda layout=layout: apply_layout(fresh(control), layout)))
    for adapter in trained:
        layout = trained_layout(adapter)
        info = {"kind": "trained", "design": layout.design, "budget": layout.budget, "adapter": adapter,
                "adapter_sha256": digests[adapter], "units": layout.units, "sinks": layout.sinks}
        plan.append((layout_label(layout, "trained"), info, lambda adapter=adapter: fresh(adapter)))
    labels = [label for label, _, _ in plan]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"Two rows would be named {', '.join(twice)}: compare one layout (or trained adapter) per design, "
                         "seed and budget at a time.")

    rows = []
    for label, info, build in plan:
        earlier = done.get(label)
        if earlier is None or not _same_row(earlier, info):  # other weights or another layout: measured again
            start = time.perf_counter()
            measured = nll_full_sequence(build(), data, label).__dict__
            done[label] = {"label": label, **info, **measured, "seconds": time.perf_counter() - start}
        rows.append(done[label])
        if save is not None:
            save(_result(model_name, data, rows))
    return _result(model_name, data, rows)


def _result(model_name: str, data: HeldoutSet, rows: list[dict[str, Any]]) -> dict[str, Any]:
    reference = rows[0]
    for r, se in zip(rows, paired_dnll_stderr(rows, reference)):
        r["dnll_pct_vs_control"] = 100 * (r["nll"] - reference["nll"]) / reference["nll"]
        r["dnll_pct_stderr"] = se
    return {"model": model_name, "seq_len": int(data.input_ids.shape[1]), "sequences": len(data.doc_ids), "doc_ids": data.doc_ids,
            "rows": rows}


def hybrids_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Held-out NLL of {result['model']} at {result['seq_len']} tokens on {result['sequences']} documents, at equal KV memory: "
        "KV budget = measured share of out-of-window pairs kept (mean over layers x KV heads). Post-hoc hybrids put the "
        "layout on the dense control's weights; trained ones were adapted under it with the control's recipe and tokens.",
        "",
        "| method | KV budget (measured) | NLL | dNLL% vs dense control (± paired s.e.) |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {100 * r['density']:.1f}% | {r['nll']:.4f} | {r['dnll_pct_vs_control']:+.2f}% ± "
                     f"{r['dnll_pct_stderr']:.2f} |")
    seconds = [r["seconds"] for r in result["rows"] if "seconds" in r]
    if seconds:
        lines += ["", f"Measuring took {sum(seconds) / 60:.0f} min in all ({sum(seconds) / len(seconds):.0f} s per row)."]
    return "\n".join(lines) + "\n"


def plot_hybrids(result: dict[str, Any], out: Path) -> Path:
    """hybrids.png: dNLL% vs KV budget, one line per design (post-hoc dashed, trained solid; seeds of a
    random design averaged, each seed a dot), SP-KV a star."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.5))
    series: dict[tuple[str, str], dict[float, list[dict[str, Any]]]] = {}
    for r in result["rows"]:
        if r["kind"] in ("post-hoc", "trained"):
            name = r["design"] + (f" +{r['sinks']} sinks" if r.get("sinks") else "")
            series.setdefault((name, r["kind"]), {}).setdefault(r["budget"], []).append(r)
    designs = sorted({d for d, _ in series})
    for (design, kind), by_budget in sorted(series.items()):
        color, budgets = f"C{designs.index(design) % 10}", sorted(by_budget)
        mean = [[sum(r[k] for r in by_budget[b]) / len(by_budget[b]) for b in budgets] for k in ("density", "dnll_pct_vs_control")]
        err = [max(r["dnll_pct_stderr"] for r in by_budget[b]) for b in budgets]
        ax.errorbar([100 * x for x in mean[0]], mean[1], yerr=err, marker="o", capsize=2, color=color,
                    linestyle="-" if kind == "trained" else "--", label=f"{design} ({kind})")
        if any(len(v) > 1 for v in by_budget.values()):
            dots = [r for b in budgets for r in by_budget[b]]
            ax.scatter([100 * r["density"] for r in dots], [r["dnll_pct_vs_control"] for r in dots], s=8, color=color)
    for r in result["rows"]:
        if r["kind"] == "spkv":
            ax.errorbar([100 * r["density"]], [r["dnll_pct_vs_control"]], yerr=[r["dnll_pct_stderr"]], marker="*", markersize=12,
                        color="black", linestyle="none", label=r["label"])
    return finish_dnll_plot(fig, ax, result, "KV budget: out-of-window pairs kept (%)", out / "hybrids.png")

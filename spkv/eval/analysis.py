"""Where an SP-KV or LKV model keeps memory: density per layer x KV head, and density against length.

The paper says longer inputs compress more. We measure it per held-out document: each document at
its own length (capped at the model's limit), its density from the exact full-sequence forward,
then a least-squares line of density against log2(length) with its R^2. An LKV model's density
comes from its cache (the eviction rule runs there) and its learned budgets are mapped beside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from spkv.bench.common import chunked_prefill
from spkv.cache import SPKVCache
from spkv.data.heldout import tokenized_heldout
from spkv.density import forward_with_density, mean_density
from spkv.results import pyplot, save_figure
from spkv.stats import cache_stats


def documents_by_length(tokenizer: Any, corpus: Path | str | None, count: int, min_len: int, max_len: int) -> list[tuple[str, list[int]]]:
    """`count` held-out documents whose lengths spread evenly (by rank) over [min_len, max_len]."""
    docs = [(doc["id"], ids) for doc, ids in tokenized_heldout(tokenizer, corpus, min_len, max_len)]
    if not docs:
        raise ValueError(f"No document in {corpus} has {min_len} tokens: lower --min-len.")
    docs.sort(key=lambda d: len(d[1]))
    if len(docs) <= count:
        return docs
    picks = sorted({round(i * (len(docs) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [len(docs) - 1]
    return [docs[i] for i in picks]


def fit_line(x: list[float], y: list[float]) -> dict[str, float]:
    """Least squares y = slope * x + intercept, with R^2."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    syy = sum((b - my) ** 2 for b in y)
    slope = sxy / sxx if sxx else float("nan")
    r2 = sxy * sxy / (sxx * syy) if sxx and syy else float("nan")
    return {"slope": slope, "intercept": my - slope * mx if sxx else float("nan"), "r2": r2, "n": n}


def kept_counted(model: torch.nn.Module, ids: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, counted) per [layer, Hkv] for one document ids [1, T]: SP-KV's exact full-sequence
    forward, or for an LKV model its cache prefilled in chunks (exact at any chunk)."""
    if model.spkv_config.lkv is None:
        _, kept, counted = forward_with_density(model, ids)
        return kept, counted
    cache = SPKVCache(model)
    chunked_prefill(model, cache, ids, chunk)
    stats = cache_stats(cache)
    return stats.kept.sum(1).float(), stats.decided.sum(1).float()


def analyze(model: torch.nn.Module, docs: list[tuple[str, list[int]]]) -> dict[str, Any]:
    """Per document: length and density; pooled: density per layer x KV head (and an LKV model's
    learned shares); the regression."""
    from spkv.lkv import model_shares

    cfg = model.spkv_config
    per_doc, kept_sum, counted_sum = [], 0, 0
    with torch.no_grad():
        for doc_id, ids in tqdm(docs, desc="analyze", unit="doc"):
            kept, counted = kept_counted(model, torch.tensor([ids]))
            kept_sum, counted_sum = kept_sum + kept, counted_sum + counted
            per_doc.append({"doc_id": doc_id, "length": len(ids), "density": float(mean_density(kept, counted)),
                            "density_token_weighted": float(kept.sum() / counted.sum().clamp(min=1))})
    per_head = kept_sum / counted_sum.clamp(min=1)
    lengths = [math.log2(d["length"]) for d in per_doc]
    extra = {} if cfg.lkv is None else {
        "budget": cfg.lkv.budget, "uniform_budgets": cfg.lkv.uniform,
        "shares_per_layer_head": torch.stack(list(model_shares(model).values())).tolist()}
    return {
        **extra, "threshold": cfg.threshold if cfg.lkv is None else None, "window": cfg.window, "layers": cfg.layers, "documents": per_doc,
        "density": float(per_head.mean()), "density_per_layer_head": per_head.tolist(),
        "fit_log2_length": fit_line(lengths, [d["density"] for d in per_doc]),
    }


def compare_beside(result: dict[str, Any], beside: dict[str, Any], beside_path: str) -> dict[str, Any]:
    """How this map lines up with another analysis of the same model (`spkv analyze --beside`)."""
    from spkv.eval.stats import spearman

    out = {"analysis": beside_path, "adapter": beside["adapter"],
           "spearman_density": spearman(result["density_per_layer_head"], beside["density_per_layer_head"])}
    if "shares_per_layer_head" in result:
        out["spearman_shares"] = spearman(result["shares_per_layer_head"], beside["density_per_layer_head"])
    return out


def _operating_point(result: dict[str, Any]) -> str:
    return f"LKV budget r {result['budget']:g}" if "budget" in result else f"tau {result['threshold']:g}"


def analysis_markdown(result: dict[str, Any]) -> str:
    fit = result["fit_log2_length"]
    lines = [
        f"Density of {result['model']} + `{result['adapter']}` at {_operating_point(result)} (window {result['window']}), "
        f"{len(result['documents'])} held-out documents, each at its own length.",
        "",
        f"- Pooled density (mean over layers x KV heads): **{100 * result['density']:.1f}%**.",
        f"- Density = {fit['slope']:+.4f} x log2(length) + {fit['intercept']:.3f}, R^2 = {fit['r2']:.2f} "
        f"({'denser' if fit['slope'] > 0 else 'sparser'} for longer documents: {100 * fit['slope']:+.2f} points per doubling).",
        *([f"- Against `{result['beside']['adapter']}`'s density per (layer, KV head): Spearman rank correlation "
           f"{result['beside']['spearman_density']:+.2f} (density)"
           + (f", {result['beside']['spearman_shares']:+.2f} (learned budgets)" if "spearman_shares" in result["beside"] else "")
           + f" over {sum(len(r) for r in result['density_per_layer_head'])} units."] if "beside" in result else []),
        "",
        "| document | tokens | density | density (token-weighted) |",
        "| --- | --- | --- | --- |",
    ]
    for d in result["documents"]:
        lines.append(f"| {d['doc_id']} | {d['length']} | {100 * d['density']:.1f}% | {100 * d['density_token_weighted']:.1f}% |")
    return "\n".join(lines) + "\n"


def heatmaps(grids: dict[str, list[list[float]]], layers: list[int], path: Path) -> Path:
    """One layer x KV head panel per grid (title -> [layers, Hkv] fractions), side by side, in %.
    Small grids (e.g. Gemma3's 3 full layers x 1 head) get their values written in the cells."""
    import textwrap

    plt = pyplot()
    tensors = {title: torch.tensor(g) for title, g in grids.items()}
    hkv = next(iter(tensors.values())).shape[1]
    panel = max(2.6, 1.2 + 0.6 * hkv)  # wide enough for a wrapped title
    fig, axes = plt.subplots(1, len(tensors), figsize=(0.4 + panel * len(tensors), max(2.4, 1.1 + 0.22 * len(layers))),
                             squeeze=False)
    for ax, (title, grid) in zip(axes[0], tensors.items()):
        im = ax.imshow((grid * 100).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=100)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_title("\n".join(textwrap.wrap(title, 30)), fontsize=8)
        if grid.numel() <= 40:
            for (i, j), v in zip(((i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])), grid.flatten().tolist()):
                ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def plot_analysis(result: dict[str, Any], out: Path, beside: dict[str, Any] | None = None) -> list[Path]:
    """density_heatmap.png (layer x KV head; an LKV model's learned shares next to it, and `beside`,
    another analysis.json's result, e.g. SP-KV's map) and density_vs_length.png (per document + fit)."""
    plt = pyplot()
    grids = {f"kept out-of-window pairs (%), {_operating_point(result)}": result["density_per_layer_head"]}
    if "shares_per_layer_head" in result:
        grids[f"learned budget (share, %), r {result['budget']:g}"] = result["shares_per_layer_head"]
    if beside is not None:
        grids[f"{Path(beside['adapter']).name}: kept (%)"] = beside["density_per_layer_head"]
    heatmap = heatmaps(grids, result["layers"], out / "density_heatmap.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [d["length"] for d in result["documents"]]
    ax.scatter(xs, [100 * d["density"] for d in result["documents"]], s=18, label="document")
    fit = result["fit_log2_length"]
    line_x = sorted(xs)
    ax.plot(line_x, [100 * (fit["slope"] * math.log2(x) + fit["intercept"]) for x in line_x], color="C1",
            label=f"fit: {100 * fit['slope']:+.2f} pts/doubling, R^2={fit['r2']:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("density (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    scatter = save_figure(fig, out / "density_vs_length.png")
    plt.close(fig)
    return [heatmap, scatter]

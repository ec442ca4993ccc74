"""The task suite's tables: score per method x task x length, means, retention."""


from __future__ import annotations

from typing import Any


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, length): mean score, mean density (over samples that have one), mean prompt tokens."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["length"]), []).append(r)
    return [
        {"task": task, "length": length, "n": len(rs), "score": _mean([r["score"] for r in rs]),
         "density": _mean([r["density"] for r in rs if r["density"] is not None]),
         "prompt_tokens": _mean([r["prompt_tokens"] for r in rs])}
        for (task, length), rs in cells.items()
    ]


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def tasks_markdown(result: dict[str, Any]) -> str:
    """Score (%) per method x task x length, then the mean over tasks with density and retention vs dense."""
    lengths = result["lengths"]
    head = "| method | task | " + " | ".join(str(n) for n in lengths) + " | mean |"
    lines = [f"RULER-style tasks, {result['samples_per_cell']} samples per cell, seed {result['seed']}, "
             f"{result['config'].get('answer_prefix', 'ruler')} answer prefixes; "
             "score = % of expected answers found in the generated text."]
    calibration = result.get("calibration")
    if calibration:
        on = ("one prompt per task (never evaluated)" if calibration.get("on") == "tasks"
              else f"{len(calibration['documents'])} held-out documents")
        lines.append(f"Policies calibrated to {100 * calibration['target_density']:g}% density on {on} of "
                     f"{calibration['tokens']} tokens; the density column is measured on each cell's own prompts.")
    lines += ["", head,
             "|" + " --- |" * (len(lengths) + 3)]
    means: dict[str, dict[int, tuple[float | None, float | None]]] = {}
    for run in result["methods"]:
        by = {(c["task"], c["length"]): c for c in run["cells"]}
        for task in result["tasks"]:
            scores = [by[(task, n)]["score"] for n in lengths if (task, n) in by]
            lines.append(f"| {run['label']} | {task} | " + " | ".join(_pct(by[(task, n)]["score"]) if (task, n) in by else ""
                                                                  for n in lengths) + f" | {_pct(_mean(scores))} |")
        means[run["label"]] = {}
        for n in [*lengths, "all"]:  # "all": every cell of the method, one summary figure
            cells = [c for c in run["cells"] if n in ("all", c["length"])]
            means[run["label"]][n] = (_mean([c["score"] for c in cells]),
                                      _mean([c["density"] for c in cells if c["density"] is not None]))
    dense = next((r["label"] for r in result["methods"] if r["method"] == "dense"), None)
    lines += ["", "| method | length | mean score | retention vs dense | density |", "| --- | --- | --- | --- | --- |"]
    for label, per_len in means.items():
        for n, (score, density) in per_len.items():
            ref = means[dense][n][0] if dense else None
            retention = f"{100 * score / ref:.1f}%" if ref and score is not None else ""
            lines.append(f"| {label} | {n} | {_pct(score)} | {retention} | {_pct(density) + '%' if density is not None else ''} |")
    if result.get("skipped_lengths"):
        lines += ["", f"Skipped (beyond the model's positions): {', '.join(map(str, result['skipped_lengths']))}."]
    return "\n".join(lines) + "\n"

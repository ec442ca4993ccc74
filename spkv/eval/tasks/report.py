"""The task suite's tables: score per method x task x length with 95% intervals, and retention
against the run's own dense method and against any reference runs (e.g. the untouched base model).

Intervals: a cell's score is a mean of per-sample string-match scores, so its interval is Wilson's
for a proportion (partial matches count fractionally). Means over cells and retention are
bootstrapped over samples; retention pairs each sample with the reference's sample of the same
(task, length, index), which is the same prompt when both runs used the same tokenizer, seed and
task settings (checked).
"""

from __future__ import annotations

from typing import Any

from spkv.eval.stats import bootstrap_interval, wilson_interval

Key = tuple[str, int, int]  # (task, length, index)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, length): mean score with its Wilson interval, mean density (over samples that have
    one), mean prompt tokens."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["length"]), []).append(r)
    out = []
    for (task, length), rs in cells.items():
        scores = [r["score"] for r in rs]
        out.append({"task": task, "length": length, "n": len(rs), "score": _mean(scores),
                    "score_ci": list(wilson_interval(sum(scores), len(scores))),
                    "density": _mean([r["density"] for r in rs if r["density"] is not None]),
                    "prompt_tokens": _mean([r["prompt_tokens"] for r in rs])})
    return out


def sample_scores(run: dict[str, Any], length: int | str = "all") -> dict[Key, float]:
    """A method's per-sample scores, by (task, length, index), at one length or all."""
    return {(s["task"], s["length"], s["index"]): s["score"] for s in run["samples"] if length in ("all", s["length"])}


def mean_with_ci(scores: dict[Key, float]) -> tuple[float | None, tuple[float, float] | None]:
    """Mean score over samples and its bootstrap 95% interval."""
    if not scores:
        return None, None
    values = list(scores.values())
    return _mean(values), bootstrap_interval([values], lambda g: sum(g[0]) / len(g[0]))


def retention(run: dict[str, Any], reference: dict[str, Any], length: int | str = "all") -> tuple[float, tuple[float, float]] | None:
    """Mean score / the reference's mean score on the same samples, with a paired bootstrap 95%
    interval; None when they share no sample or the reference scores 0."""
    a, b = sample_scores(run, length), sample_scores(reference, length)
    keys = sorted(set(a) & set(b))
    ours, theirs = [a[k] for k in keys], [b[k] for k in keys]
    if not keys or sum(theirs) == 0:
        return None

    def ratio(groups: list[list[float]]) -> float:
        return sum(groups[0]) / sum(groups[1]) if sum(groups[1]) else float("nan")

    return ratio([ours, theirs]), bootstrap_interval([ours, theirs], ratio)


SAME_PROMPTS = ("tasks", "seed", "config")  # settings that make two runs' samples the same prompts


def check_comparable(result: dict[str, Any], reference: dict[str, Any], name: str) -> None:
    changed = [k for k in SAME_PROMPTS if result.get(k) != reference.get(k)]
    if changed:
        raise ValueError(f"Reference {name!r} was run with other task settings ({', '.join(changed)}): its samples are "
                         "not the same prompts, so retention against it would compare different questions.")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _ci(ci: tuple[float, float] | list[float] | None) -> str:
    return "" if ci is None else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _retention_text(value: tuple[float, tuple[float, float]] | None) -> str:
    return "" if value is None else f"{100 * value[0]:.1f}%{_ci(value[1])}"


def tasks_markdown(result: dict[str, Any], references: dict[str, dict[str, Any]] | None = None) -> str:
    """Score (%) per method x task x length with Wilson intervals, then per length the mean score
    with its bootstrap interval, the density, and retention vs the run's own dense method and vs
    each reference run (name -> a reference *method* run, e.g. the base model's dense)."""
    references = references or {}
    lengths = result["lengths"]
    lines = [f"RULER-style tasks, {result['samples_per_cell']} samples per cell, seed {result['seed']}, "
             f"{result['config'].get('answer_prefix', 'ruler')} answer prefixes; "
             "score = % of expected answers found in the generated text, [95% interval] (Wilson per cell, "
             "bootstrap over samples for means and retention)."]
    calibration = result.get("calibration")
    if calibration:
        on = ("one prompt per task (never evaluated)" if calibration.get("on") == "tasks"
              else f"{len(calibration['documents'])} held-out documents")
        lines.append(f"Policies calibrated to {100 * calibration['target_density']:g}% density on {on} of "
                     f"{calibration['tokens']} tokens; the density column is measured on each cell's own prompts.")
    lines += ["", "| method | task | " + " | ".join(str(n) for n in lengths) + " |", "|" + " --- |" * (len(lengths) + 2)]
    for run in result["methods"]:
        by = {(c["task"], c["length"]): c for c in run["cells"]}
        for task in result["tasks"]:
            cells = [by.get((task, n)) for n in lengths]
            lines.append(f"| {run['label']} | {task} | " + " | ".join(
                "" if c is None else _pct(c["score"]) + _ci(c.get("score_ci")) for c in cells) + " |")
    dense = next((r for r in result["methods"] if r["method"] == "dense"), None)
    ref_names = list(references)
    lines += ["", "| method | length | mean score | density | retention vs dense |" + "".join(f" retention vs {n} |" for n in ref_names),
              "|" + " --- |" * (5 + len(ref_names))]
    for run in result["methods"]:
        for n in [*lengths, "all"]:  # "all": every cell of the method, one summary figure
            score, ci = mean_with_ci(sample_scores(run, n))
            densities = [c["density"] for c in run["cells"] if n in ("all", c["length"]) and c["density"] is not None]
            density = _mean(densities)
            cols = [_retention_text(retention(run, dense, n)) if dense else ""]
            cols += [_retention_text(retention(run, references[name], n)) for name in ref_names]
            lines.append(f"| {run['label']} | {n} | {_pct(score)}{_ci(ci)} | {_pct(density) + '%' if density is not None else ''} | "
                         + " | ".join(cols) + " |")
    lines += ["", "Wall time (generation, summed over samples; rows saved before timing was recorded are not counted):", ""]
    lines += [f"- {run['label']}: {wall_time(run)}" for run in result["methods"]]
    if result.get("skipped_lengths"):
        lines += ["", f"Skipped (beyond the model's positions): {', '.join(map(str, result['skipped_lengths']))}."]
    return "\n".join(lines) + "\n"


def wall_time(run: dict[str, Any]) -> str:
    """'12.3 min over 40 of 56 samples, on CPU A, CPU B': the timed samples of a method run."""
    timed = [r for r in run["samples"] if r.get("seconds") is not None]
    if not timed:
        return f"not recorded (0 of {len(run['samples'])} samples timed)"
    cpus = sorted({r["cpu"] for r in timed if r.get("cpu")})
    return (f"{sum(r['seconds'] for r in timed) / 60:.1f} min over {len(timed)} of {len(run['samples'])} samples"
            + (f", on {', '.join(cpus)}" if cpus else ""))


def load_reference(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """NAME=FILE[:LABEL] -> (name, the file's result, its method run LABEL (a label or a method name),
    default its dense run)."""
    import json
    from pathlib import Path

    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--reference takes NAME=FILE[:LABEL] (e.g. base=results/tasks/gemma3/tasks.json), got {spec!r}")
    path, _, label = rest.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--reference {name}: no result file {path}")
    result = json.loads(Path(path).read_text())
    runs = {r["label"]: r for r in result["methods"]}
    method = label or "dense"  # LABEL: a run's label (e.g. 'spkv (tau=0.27)') or its method name ('spkv')
    run = runs.get(method) or next((r for r in result["methods"] if r["method"] == method), None)
    if run is None:
        raise ValueError(f"--reference {name}: {path} has no method {method!r} (it has {', '.join(runs)})")
    return name, result, run


def _run_density(run: dict[str, Any]) -> float | None:
    """Mean density over a method run's cells that measured one."""
    return _mean([c["density"] for c in run["cells"] if c["density"] is not None])


def difference(run: dict[str, Any], other: dict[str, Any], length: int | str = "all"
               ) -> tuple[float, tuple[float, float]] | None:
    """Mean score of `run` minus `other`'s on the samples both have at this length, with a paired
    bootstrap 95% interval: whether one system beats another, not just whether their separate
    intervals overlap."""
    a, b = sample_scores(run, length), sample_scores(other, length)
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    ours, theirs = [a[k] for k in shared], [b[k] for k in shared]

    def diff(groups: list[list[float]]) -> float:
        return (sum(groups[0]) - sum(groups[1])) / len(groups[0])

    return diff([ours, theirs]), bootstrap_interval([ours, theirs], diff)


def _figure(value: tuple[float, tuple[float, float]] | None, key: str) -> dict[str, Any] | None:
    return None if value is None else {key: value[0], "ci": list(value[1])}


def comparison(rows: dict[str, tuple[dict[str, Any], dict[str, Any]]],
               references: dict[str, tuple[dict[str, Any], dict[str, Any]]],
               versus: list[str] | None = None) -> dict[str, Any]:
    """One figure set per system, for a table across runs (e.g. the dense control, SP-KV and each
    hybrid layout, each from its own `spkv eval tasks` run): per length and over all cells, the mean
    score with its bootstrap interval over the samples every row has (runs grown to different sample
    counts are compared on the same prompts); the mean density; retention vs each reference run on
    the samples both have, over all cells and per length; with `versus` (rows' names, e.g. the best
    baseline, or the system an ablation changes), each row's paired difference from each of them per
    length, on the samples the two rows both have. rows and references: name -> (the run's result, one of its method runs)."""
    results = [result for result, _ in [*rows.values(), *references.values()]]
    for (name, (result, _)) in [*rows.items(), *references.items()]:
        check_comparable(result, results[0], name)
    versus = list(versus or [])
    unknown = [v for v in versus if v not in rows]
    if unknown:
        raise ValueError(f"versus {', '.join(map(repr, unknown))} is not one of the rows ({', '.join(rows)})")
    lengths = sorted({n for result, _ in rows.values() for n in result["lengths"]})
    common = set.intersection(*(set(sample_scores(run)) for _, run in rows.values()))
    out = []
    for name, (_, run) in rows.items():
        row: dict[str, Any] = {"name": name, "label": run["label"], "density": _run_density(run),
                               "samples": len(common), "score": {}, "retention": {}, "retention_by_length": {}}
        for n in [*lengths, "all"]:
            score, ci = mean_with_ci({k: v for k, v in sample_scores(run, n).items() if k in common})
            row["score"][str(n)] = None if score is None else {"mean": score, "ci": list(ci)}
        for ref, (_, ref_run) in references.items():
            row["retention"][ref] = _figure(retention(run, ref_run, "all"), "ratio")
            row["retention_by_length"][ref] = {str(n): _figure(retention(run, ref_run, n), "ratio") for n in lengths}
        row["difference"] = {v: {str(n): _figure(difference(run, rows[v][1], n), "mean")
                                 for n in [*lengths, "all"]} for v in versus}
        out.append(row)
    return {"lengths": lengths, "references": list(references), "versus": versus, "rows": out}


def mean_run(runs: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """A system that is one of `runs` drawn uniformly at random (e.g. a random global layer when only
    these layouts exist): its expected score on each sample is the mean of theirs, over the samples
    they all have; its density is the mean of theirs."""
    scores = [sample_scores(run) for run in runs]
    keys = sorted(set.intersection(*(set(s) for s in scores)))
    samples = [{"task": t, "length": n, "index": i, "score": sum(s[(t, n, i)] for s in scores) / len(scores)}
               for t, n, i in keys]
    densities = [_run_density(run) for run in runs]
    density = None if None in densities else sum(densities) / len(densities)
    cells = [{"task": t, "length": n, "density": density} for t, n in sorted({(t, n) for t, n, _ in keys})]
    return {"method": "mean", "label": label, "samples": samples, "cells": cells}


def comparison_markdown(table: dict[str, Any]) -> str:
    """The comparison as markdown: mean score [95% interval] per length and over all cells, density,
    retention over all cells vs each reference; then retention per length vs each reference, and the
    paired difference from each `versus` row."""
    lengths, refs = table["lengths"], table["references"]
    head = ["system", *map(str, lengths), "all", "density", *(f"retention vs {r}" for r in refs)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in table["rows"]:
        scores = [row["score"][str(n)] for n in [*lengths, "all"]]
        cells = ["" if s is None else _pct(s["mean"]) + _ci(s["ci"]) for s in scores]
        density = "" if row["density"] is None else f"{100 * row['density']:.1f}%"
        ret = [_retention_text(_pair(row["retention"][r], "ratio")) for r in refs]
        lines.append("| " + " | ".join([row["name"], *cells, density, *ret]) + " |")
    for ref in refs:
        lines += ["", f"Retention vs {ref} per length (paired, on the samples both have):", "",
                  "| system | " + " | ".join(map(str, lengths)) + " |", "|" + " --- |" * (len(lengths) + 1)]
        for row in table["rows"]:
            by = row.get("retention_by_length", {}).get(ref, {})
            lines.append("| " + " | ".join([row["name"], *(_retention_text(_pair(by.get(str(n)), "ratio"))
                                                           for n in lengths)]) + " |")
    for versus in table.get("versus", []):
        lines += ["", f"Difference from {versus} (score points, paired over the samples both rows have; an interval "
                  "that excludes 0 is a real difference):", "",
                  "| system | " + " | ".join(map(str, [*lengths, "all"])) + " |", "|" + " --- |" * (len(lengths) + 2)]
        for row in table["rows"]:
            if row["name"] != versus:
                lines.append("| " + " | ".join([row["name"], *(_points(row["difference"][versus][str(n)])
                                                               for n in [*lengths, "all"])]) + " |")
    return "\n".join(lines) + "\n"


def _pair(figure: dict[str, Any] | None, key: str) -> tuple[float, tuple[float, float]] | None:
    return None if figure is None else (figure[key], figure["ci"])


def _points(figure: dict[str, Any] | None) -> str:
    if figure is None:
        return ""
    lo, hi = figure["ci"]
    return f"{100 * figure['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"  # 1 decimal: an end near 0 keeps its sign

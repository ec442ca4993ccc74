"""Uncertainty of the published numbers, written once: standard errors over documents, paired
differences between methods on the same documents, and confidence intervals over task samples."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for one value."""
    n = len(values)
    m = mean(values)
    return math.sqrt(sum((x - m) ** 2 for x in values) / max(1, n - 1) / n)


def paired_dnll(per_doc: Sequence[float], reference_per_doc: Sequence[float], reference_nll: float) -> tuple[float, float]:
    """(dNLL%, its paired standard error) of a method against a reference on the same documents:
    the per-document differences carry the comparison, so document difficulty cancels out."""
    if len(per_doc) != len(reference_per_doc):
        raise ValueError(f"Paired comparison needs the same documents: {len(per_doc)} vs {len(reference_per_doc)}.")
    diffs = [100 * (a - b) / reference_nll for a, b in zip(per_doc, reference_per_doc)]
    return 100 * (mean(per_doc) - reference_nll) / reference_nll, stderr(diffs)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a proportion; well-behaved at 0/n and n/n, unlike the
    normal approximation. `successes` may be fractional (RULER's partial string matches)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(groups: Sequence[Sequence[float]], statistic: Callable[[list[list[float]]], float],
                       resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over samples resampled with replacement within
    each group (e.g. each method's scores on the same cells). Groups resample the same indices when
    they have equal length, so paired samples stay paired. NaN statistics are dropped."""
    rng = random.Random(seed)
    lengths = {len(g) for g in groups}
    paired = len(lengths) == 1
    values = []
    for _ in range(resamples):
        if paired:
            idx = [rng.randrange(next(iter(lengths))) for _ in range(next(iter(lengths)))]
            sample = [[g[i] for i in idx] for g in groups]
        else:
            sample = [[g[rng.randrange(len(g))] for _ in g] for g in groups]
        v = statistic(sample)
        if not math.isnan(v):
            values.append(v)
    if not values:
        return (math.nan, math.nan)
    values.sort()
    lo = values[int((1 - level) / 2 * (len(values) - 1))]
    hi = values[int((1 + level) / 2 * (len(values) - 1))]
    return (lo, hi)


def spearman(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """Rank correlation of two [layers, Hkv] maps over their units (ties get their mean rank): do two
    systems put memory on the same heads?"""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0.0] * len(x)
        i = 0
        while i < len(order):  # a run of ties shares the mean of its ranks
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in order[i:j + 1]:
                r[k] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = (ranks([v for row in m for v in row]) for m in (a, b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / max(1e-12, math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)))

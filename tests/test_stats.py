"""The statistics behind the published numbers: standard errors, paired dNLL, Wilson and bootstrap
intervals, and the task suite's retention against a reference run."""

from __future__ import annotations

import math

import pytest

from spkv.eval import stats
from spkv.eval.tasks import report


def test_stderr_and_paired_dnll():
    assert stats.stderr([1.0, 2.0, 3.0]) == pytest.approx(math.sqrt(1.0 / 3))
    dnll, se = stats.paired_dnll([2.2, 2.4, 2.0], [2.0, 2.2, 1.9], reference_nll=2.0333333333333)
    assert dnll == pytest.approx(100 * (2.2 - 2.0333333333333) / 2.0333333333333)
    diffs = [100 * d / 2.0333333333333 for d in (0.2, 0.2, 0.1)]
    assert se == pytest.approx(stats.stderr(diffs))
    with pytest.raises(ValueError, match="same documents"):
        stats.paired_dnll([1.0], [1.0, 2.0], 1.0)


def test_wilson_interval_known_values():
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # the textbook 0/10 bound
    lo, hi = stats.wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert all(math.isnan(x) for x in stats.wilson_interval(0, 0))


def test_bootstrap_is_seeded_and_covers_the_estimate():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    mean = lambda g: sum(g[0]) / len(g[0])  # noqa: E731
    a = stats.bootstrap_interval([values], mean, seed=3)
    assert a == stats.bootstrap_interval([values], mean, seed=3)
    assert a[0] <= sum(values) / len(values) <= a[1] and a[0] < a[1]
    assert stats.bootstrap_interval([[1.0] * 5], mean) == (1.0, 1.0)


def _run(label: str, scores: dict[tuple[str, int, int], float]) -> dict:
    return {"method": label, "label": label, "samples": [{"task": t, "length": n, "index": i, "score": s}
                                                        for (t, n, i), s in scores.items()]}


def test_retention_pairs_samples_and_ignores_unshared_ones():
    ours = _run("spkv", {("a", 1, 0): 1.0, ("a", 1, 1): 0.0, ("a", 2, 0): 1.0})
    base = _run("dense", {("a", 1, 0): 1.0, ("a", 1, 1): 1.0, ("b", 1, 0): 1.0})
    value, (lo, hi) = report.retention(ours, base, 1)
    assert value == 0.5 and 0.0 <= lo <= 0.5 <= hi <= 1.0  # only the two shared length-1 samples
    assert report.retention(ours, base, 2) is None  # nothing shared at length 2
    with pytest.raises(ValueError, match="other task settings"):
        report.check_comparable({"tasks": ["a"], "seed": 0, "config": {}}, {"tasks": ["a"], "seed": 1, "config": {}}, "base")

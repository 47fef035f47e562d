"""How much of the label gap a trainer closes, with its uncertainty (the maths of ``nnssl_benchmark``'s table).

Per seed ``s`` (mean foreground Dice ``D`` of each row on the test set)::

    gap_closed_s = (D_method,s - D_labeled_only,s) / (D_full,s - D_labeled_only,s)

0 = no better than nnU-Net on the labeled cases alone, 1 = as good as nnU-Net with every label, < 0 = worse than
labeled-only. The table reports the mean over seeds with a 95 % Student-t interval
``mean ± t_{0.975, n-1} · sd / sqrt(n)`` (sd with ddof 1; undefined for one seed). When the full reference is
less than ``GAP_MIN_DENOMINATOR`` above labeled-only in a seed, that seed's ratio is undefined: dividing by a
near-zero (or negative) gap would turn noise into huge numbers.

The paired test against labeled-only is the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) on the
per-case mean foreground Dice, paired by (seed, test case): it needs no normality and uses every test case, not
only the few seed means. The pairs of one seed share a model, so p is optimistic when a seed's model is an outlier;
the seed interval of gap closed is the conservative number.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

# below this Dice difference between the full reference and labeled-only the ratio is noise divided by noise
GAP_MIN_DENOMINATOR = 0.02
CONFIDENCE = 0.95
TEST_NAME = "two-sided Wilcoxon signed-rank test of per-case mean Dice vs labeled-only, pairs = seeds × test cases"


def gap_closed(method: float, labeled_only: float, full: float, min_gap: float = GAP_MIN_DENOMINATOR) -> float:
    """``(method - labeled_only) / (full - labeled_only)``; NaN when ``full - labeled_only < min_gap`` or any input
    is NaN."""
    denominator = full - labeled_only
    if not (denominator >= min_gap) or method != method:  # `not >=` is also True for NaN
        return float("nan")
    return (method - labeled_only) / denominator


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of the finite ``values``: the Student-t interval ``mean ± t_{(1+c)/2, n-1} sd/sqrt(n)``.
    One value: (value, NaN, NaN), since one seed says nothing about the spread; none: all NaN."""
    finite = [float(v) for v in values if v == v]
    if not finite:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean(finite))
    if len(finite) < 2:
        return mean, float("nan"), float("nan")
    from scipy import stats

    half = float(stats.t.ppf((1 + confidence) / 2, len(finite) - 1) * np.std(finite, ddof=1) / math.sqrt(len(finite)))
    return mean, mean - half, mean + half


def per_case_mean_dice(per_case: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """case -> mean over classes of its Dice (classes with an undefined Dice left out)."""
    out = {}
    for case, dice in per_case.items():
        finite = [v for v in dice.values() if v is not None and v == v]
        out[case] = float(np.mean(finite)) if finite else float("nan")
    return out


def paired_cases(method: Mapping[int, Mapping[str, float]], reference: Mapping[int, Mapping[str, float]]
                 ) -> tuple[list[float], list[float]]:
    """Per-case mean Dice of both, paired by (seed, case) present in both; ``{seed: {case: {class: dice}}}``."""
    x, y = [], []
    for seed in sorted(set(method) & set(reference)):
        a, b = per_case_mean_dice(method[seed]), per_case_mean_dice(reference[seed])
        for case in sorted(set(a) & set(b)):
            if a[case] == a[case] and b[case] == b[case]:
                x.append(a[case])
                y.append(b[case])
    return x, y


def wilcoxon_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of the pairs ``x - y``: 1.0 when every pair is equal (nothing to test),
    NaN without pairs."""
    if not x:
        return float("nan")
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if np.all(d == 0):
        return 1.0
    from scipy import stats

    return float(stats.wilcoxon(d, alternative="two-sided").pvalue)

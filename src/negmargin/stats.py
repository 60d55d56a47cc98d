"""The statistics every number in results/ is reported with, in one place (docs/analysis.md).

* Over the test episodes of one run: mean accuracy and mmfewshot's 'std' column, the 95% CI half-width
  1.96 * std(ddof=0) / sqrt(N) (:func:`ci95`).
* Base-class accuracy on held-out images: the normal approximation of the binomial (:func:`binomial_ci95`).
* Over training seeds: mean and Student-t half-width t_{0.975, n-1} * s / sqrt(n), s with ddof=1; with
  fewer than two seeds the CI is None (unknown), never 0 (:func:`aggregate_seeds`).
* Rank correlation of a series with the margin (:func:`spearman`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

Z_95 = 1.959963984540054

# t_{0.975, df} for df = 1..30 (two-sided 95%), used when scipy is not installed.
_T_975 = (
    12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252,
    2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688,
    2.131449546, 2.119905299, 2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845,
    2.073873068, 2.068657610, 2.063898562, 2.059538553, 2.055529439, 2.051830516, 2.048407142,
    2.045229642, 2.042272456,
)


def ci95(accuracies: np.ndarray) -> float:
    """mmfewshot's 'std' column: 1.96 · population std (ddof=0) / sqrt(N), in the accuracies' unit."""
    accuracies = np.asarray(accuracies, dtype=np.float64)
    return float(1.96 * accuracies.std(ddof=0) / math.sqrt(len(accuracies)))


def binomial_ci95(correct: int, total: int) -> float:
    """Half-width (in %) of the normal-approximation 95% CI of an accuracy: 1.96 * sqrt(p (1 - p) / n)."""
    p = correct / total
    return 100.0 * Z_95 * math.sqrt(p * (1.0 - p) / total)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    try:
        from scipy.stats import t as student_t
    except ImportError:
        if df <= len(_T_975):
            return _T_975[df - 1]
        # Cornish-Fisher expansion around the normal quantile; error < 1e-5 for df > 30.
        z = Z_95
        return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
                + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))
    return float(student_t.ppf(0.975, df))


def aggregate_seeds(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Mean over seeds and the Student-t 95% CI half-width; None entries (missing numbers) are skipped.

    ``ci95`` = t_{0.975, n-1} * s / sqrt(n) with s the sample std (ddof=1): few seeds, unknown variance.
    With one value ``std`` and ``ci95`` are None (unknown, not 0); with none, ``mean`` is None too.
    """
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    n = len(present)
    if n == 0:
        return {"mean": None, "ci95": None, "std": None, "n": 0}
    if n == 1:
        return {"mean": float(present[0]), "ci95": None, "std": None, "n": 1}
    std = float(present.std(ddof=1))
    return {"mean": float(present.mean()), "ci95": t_quantile_975(n - 1) * std / math.sqrt(n), "std": std, "n": n}


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when either side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)

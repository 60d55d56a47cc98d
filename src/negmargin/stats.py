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
from typing import Any

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
    ``values`` lists the per-seed numbers (shown instead of an interval where there are few seeds).
    """
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    n = len(present)
    listed = [float(v) for v in present]
    if n == 0:
        return {"mean": None, "ci95": None, "std": None, "n": 0, "values": []}
    if n == 1:
        return {"mean": listed[0], "ci95": None, "std": None, "n": 1, "values": listed}
    std = float(present.std(ddof=1))
    return {"mean": float(present.mean()), "ci95": t_quantile_975(n - 1) * std / math.sqrt(n), "std": std, "n": n,
            "values": listed}


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


def interval(mean: float, half: float | None) -> tuple[float | None, float | None]:
    return (None, None) if half is None else (mean - half, mean + half)


def paired_difference(per_seed: Sequence[tuple[int, np.ndarray]]) -> dict[str, Any]:
    """The difference of a margin to m = 0, measured on the same episodes (or the same images) per seed.

    ``per_seed``: (seed, differences) with one difference per episode or image, in points. Per seed: the mean
    and a normal 95% CI over the episodes, 1.96 * s / sqrt(n) (s with ddof=1). Pooled: the mean of the per-seed
    means, with a Student-t 95% CI over those means (n_seeds - 1 degrees of freedom). Each per-seed mean
    carries its own episode noise, so that interval accounts for seed and episode variance together; with one
    seed the pooled CI is that seed's episode CI (seed variance unknown, and said so in ``interval``).
    """
    seeds = []
    for seed, differences in per_seed:
        differences = np.asarray(differences, dtype=np.float64)
        half = Z_95 * float(differences.std(ddof=1)) / math.sqrt(len(differences)) if len(differences) > 1 else None
        mean = float(differences.mean())
        low, high = interval(mean, half)
        seeds.append({"seed": int(seed), "mean": mean, "ci95_low": low, "ci95_high": high, "n": len(differences)})
    means = np.array([entry["mean"] for entry in seeds])
    mean = float(means.mean())
    if len(seeds) > 1:
        low, high = interval(mean, t_quantile_975(len(seeds) - 1) * float(means.std(ddof=1)) / math.sqrt(len(seeds)))
        how = f"Student t over the {len(seeds)} per-seed paired means ({len(seeds) - 1} df)"
    else:
        low, high = seeds[0]["ci95_low"], seeds[0]["ci95_high"]
        how = "one seed: normal over its episodes (seed variance not measured)"
    return {"mean": mean, "ci95_low": low, "ci95_high": high, "n_seeds": len(seeds),
            "n_episodes": int(min(entry["n"] for entry in seeds)), "interval": how, "per_seed": seeds}


def seed_paired_difference(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """The difference of a per-run number (no per-episode values, e.g. discriminability) to m = 0, seed by
    seed: mean and Student-t 95% CI over the per-seed differences; no CI with one seed."""
    differences = np.array([value - zero for value, zero in pairs], dtype=np.float64)
    stat = aggregate_seeds(differences.tolist())
    low, high = interval(stat["mean"], stat["ci95"])
    return {"mean": stat["mean"], "ci95_low": low, "ci95_high": high, "n_seeds": stat["n"],
            "interval": "Student t over the per-seed differences" if stat["ci95"] is not None else "one seed: none"}


def verdict(stat: dict[str, Any] | None, unit: str = "points", digits: int = 2) -> str:
    """The one phrase every output uses for a difference to m = 0: "higher than m = 0 by d [lo, hi]" or
    "lower ..." where the 95% CI excludes 0, "no detectable difference (d [lo, hi])" where it holds 0."""
    if not stat or stat.get("mean") is None:
        return "not measured"
    mean, low, high = stat["mean"], stat.get("ci95_low"), stat.get("ci95_high")
    span = f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] {unit}" if low is not None else \
        f"{mean:+.{digits}f} {unit}, no CI"
    if low is None:
        return f"no CI to tell ({span})"
    if low > 0:
        return f"higher than m = 0 by {span}"
    if high < 0:
        return f"lower than m = 0 by {span}"
    return f"no detectable difference ({span})"

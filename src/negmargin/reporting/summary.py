"""The margin-sweep summary (``results/summary.md``): the sweep per dataset and arch, and plain statements
computed from its numbers."""

from __future__ import annotations

import os
from typing import Any

from negmargin.io import write_text
from negmargin.reporting.markdown import describe, format_margin, markdown_table, pm
from negmargin.stats import spearman


def _series(entries: list[dict[str, Any]], pick) -> list[tuple[float, dict[str, Any]]]:
    points = [(entry["margin"], pick(entry)) for entry in entries]
    return [(margin, stat) for margin, stat in points if stat and stat.get("mean") is not None]


def peak_statement(name: str, points: list[tuple[float, dict[str, Any]]]) -> str:
    """Does the series peak at a negative margin? Answered from the means, with the gap over m = 0."""
    if len(points) < 2:
        return f"- Does {name} peak at a negative margin? Fewer than two margins: no peak can be stated."
    best_margin, best = max(points, key=lambda point: point[1]["mean"])
    where = "negative" if best_margin < 0 else ("zero" if best_margin == 0 else "positive")
    answer = "Yes" if best_margin < 0 else "No"
    text = (f"- Does {name} peak at a negative margin? **{answer}**: it peaks at m = {format_margin(best_margin)} "
            f"({where}, {best['mean']:.2f})")
    zero = next((stat for margin, stat in points if margin == 0), None)
    if zero is not None and best_margin != 0:
        gap = best["mean"] - zero["mean"]
        if best.get("ci95") is not None and zero.get("ci95") is not None:
            overlap = best["mean"] - best["ci95"] <= zero["mean"] + zero["ci95"]
            verdict = "the seed CIs overlap" if overlap else "the seed CIs do not overlap"
        else:
            verdict = "no seed CI (one seed)"
        text += f", {gap:+.2f} over m = 0; {verdict}"
    return text + "."


def trend_statement(name: str, points: list[tuple[float, dict[str, Any]]]) -> str:
    """Does the series rise with the margin? Yes at every step, mostly (Spearman ρ > 0), or no."""
    if len(points) < 2:
        return f"- Does {name} rise with the margin? Fewer than two margins: no trend can be stated."
    points = sorted(points, key=lambda point: point[0])
    means = [stat["mean"] for _, stat in points]
    rho = spearman([margin for margin, _ in points], means)
    steps = [b - a for a, b in zip(means, means[1:], strict=False)]
    if all(step > 0 for step in steps):
        verdict = "**Yes**, at every step"
    elif rho is not None and rho > 0:
        verdict = "**Mostly**: it rises overall, but not at every step"
    elif all(step < 0 for step in steps):
        verdict = "**No**: it falls at every step"
    elif rho is not None and rho < 0:
        verdict = "**No**: it falls overall"
    else:
        verdict = "**No**: no monotone trend"
    rho_text = "undefined" if rho is None else f"{rho:+.2f}"
    return (f"- Does {name} rise with the margin? {verdict} (Spearman ρ = {rho_text}; {means[0]:.2f} at "
            f"m = {format_margin(points[0][0])}, {means[-1]:.2f} at m = {format_margin(points[-1][0])}).")


def render_summary(metrics: dict[str, Any]) -> str:
    """Per dataset and arch: the margin sweep with seed CIs, and plain statements computed from it."""
    ways = describe(run.get("ways") for run in metrics["runs"])
    lines = [
        "# Margin sweep summary",
        "",
        "Mean ± 95% CI across training seeds (Student t; n = seeds; no CI with one seed). Accuracies in %, "
        f"novel accuracy on {ways}-way test episodes, base accuracy on held-out base-class images, "
        "discriminability = inter/intra-class variance ratio of L2-normalised features.",
        "",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in metrics["aggregate"]:
        groups.setdefault((entry["dataset"], entry["arch"]), []).append(entry)
    for (dataset, arch), entries in sorted(groups.items()):
        entries = sorted(entries, key=lambda entry: entry["margin"])
        shots = sorted({int(shot) for entry in entries for shot in entry["novel"]})
        header = ["margin"] + [f"novel {shot}-shot" for shot in shots] + [
            "base acc", "base discr.", "novel discr."]
        rows = [
            [format_margin(entry["margin"])]
            + [pm(entry["novel"].get(str(shot))) for shot in shots]
            + [pm(entry.get("base_accuracy")), pm(entry.get("base_discriminability"), 3),
               pm(entry.get("novel_discriminability"), 3)]
            for entry in entries
        ]
        statements = [peak_statement(f"novel {shot}-shot accuracy", _series(entries, lambda e, s=shot: e["novel"].get(str(s))))
                      for shot in shots]
        statements.append(trend_statement("base accuracy", _series(entries, lambda e: e.get("base_accuracy"))))
        statements.append(trend_statement("base discriminability",
                                          _series(entries, lambda e: e.get("base_discriminability"))))
        statements.append(peak_statement("novel discriminability",
                                         _series(entries, lambda e: e.get("novel_discriminability"))))
        lines += [f"## {dataset} / {arch}", "", *markdown_table(header, rows), "", *statements, ""]
    return "\n".join(lines)


def write_summary(metrics: dict[str, Any], out: str | os.PathLike) -> str:
    text = render_summary(metrics)
    write_text(out, text)
    return text

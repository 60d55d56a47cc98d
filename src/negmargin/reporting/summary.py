"""The margin-sweep summary (``results/summary.md``): per dataset and model, the sweep, each margin's paired
difference to m = 0, and plain statements computed from those numbers.

Every sentence about a margin comes from :func:`negmargin.stats.verdict` on a paired difference: "higher (or
lower) than m = 0 by d [lo, hi]" only where the 95% CI excludes 0, "no detectable difference" otherwise. The
README and the report show these same sentences (the README copies them; a test checks the copy).
"""

from __future__ import annotations

import os
from typing import Any

from negmargin.io import write_text
from negmargin.reporting.markdown import format_margin, markdown_table
from negmargin.reporting.metrics import task_of
from negmargin.stats import spearman, verdict

PICK_NAMES = {"best": "best-validation checkpoint (the paper's rule)", "final": "final checkpoint (last epoch)"}


def task_name(task: str) -> str:
    ways, shots = task_of(task)
    return f"novel {ways}-way {shots}-shot"


def seed_cell(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """A mean over seeds: ``mean ± ci (n)`` from three seeds on; with fewer, the seeds' own values."""
    if not stat or stat.get("mean") is None:
        return "–"
    if stat.get("ci95") is not None and stat["n"] >= 3:
        return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f} (n={stat['n']})"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f} (1 seed)"
    values = ", ".join(f"{v:.{digits}f}" for v in stat.get("values", []))
    return f"{stat['mean']:.{digits}f} (seeds: {values})"


def delta_cell(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    if stat.get("ci95_low") is None:
        return f"{stat['mean']:+.{digits}f} (no CI)"
    mark = "" if stat["ci95_low"] <= 0 <= stat["ci95_high"] else " *"
    return f"{stat['mean']:+.{digits}f} [{stat['ci95_low']:+.{digits}f}, {stat['ci95_high']:+.{digits}f}]{mark}"


def _numbers(entry: dict[str, Any], pick: str) -> dict[str, Any]:
    return entry["checkpoints"].get(pick, {})


def _paired(entry: dict[str, Any], pick: str, key: str) -> dict[str, Any] | None:
    return _numbers(entry, pick).get("paired_vs_zero", {}).get(key)


def peak_statement(name: str, entries: list[dict[str, Any]], pick: str, task: str) -> str:
    """Does novel accuracy peak at a negative margin? The highest mean, and whether its paired difference to
    m = 0 is detectable."""
    points = [(e["margin"], _numbers(e, pick).get("tasks", {}).get(task)) for e in entries]
    points = [(m, stat) for m, stat in points if stat and stat.get("mean") is not None]
    question = f"- Does {name} accuracy peak at a negative margin?"
    if len(points) < 2 or not any(m == 0 for m, _ in points):
        return f"{question} Not measured: it needs m = 0 and another margin."
    best_margin, _ = max(points, key=lambda point: point[1]["mean"])
    if best_margin == 0:
        lower = [format_margin(e["margin"]) for e in entries
                 if verdict(_paired(e, pick, task)).startswith("lower")]
        tail = f" Detectably lower than m = 0 at m = {', '.join(lower)}." if lower else ""
        return f"{question} **No**: the highest mean is at m = 0.{tail}"
    said = verdict(_paired(next(e for e in entries if e["margin"] == best_margin), pick, task))
    where = f"m = {format_margin(best_margin)}"
    if best_margin > 0:
        return f"{question} **No**: the highest mean is at {where} (positive), {said}."
    if said.startswith("higher"):
        return f"{question} **Yes**: the highest mean is at {where}, {said}."
    return f"{question} **Not resolved**: the highest mean is at {where}, but it shows {said}."


def trend_statement(name: str, entries: list[dict[str, Any]], pick: str, key: str, paired_key: str,
                    digits: int = 2, unit: str = "points") -> str:
    """Does a quantity rise with the margin? Spearman's ρ over the means, and the paired differences of the
    most negative and the most positive margin to m = 0."""
    points = [(e["margin"], _numbers(e, pick).get(key)) for e in entries]
    points = sorted(((m, s) for m, s in points if s and s.get("mean") is not None), key=lambda p: p[0])
    question = f"- Does {name} rise with the margin?"
    if len(points) < 2:
        return f"{question} Not measured: fewer than two margins."
    rho = spearman([m for m, _ in points], [s["mean"] for _, s in points])
    answer = ("**Yes**" if rho is not None and rho > 0.5 else "**No**" if rho is not None and rho < -0.5
              else "**No clear trend**")
    rho_text = "undefined" if rho is None else f"{rho:+.2f}"
    ends = []
    for margin in (points[0][0], points[-1][0]):
        if margin != 0:
            entry = next(e for e in entries if e["margin"] == margin)
            ends.append(f"at m = {format_margin(margin)} {verdict(_paired(entry, pick, paired_key), unit, digits)}")
    return f"{question} {answer} (Spearman ρ = {rho_text} over the means; {'; '.join(ends)})."


def _section(dataset: str, arch: str, entries: list[dict[str, Any]], pick: str) -> list[str]:
    entries = sorted(entries, key=lambda entry: entry["margin"])
    tasks = sorted({t for e in entries for t in _numbers(e, pick).get("tasks", {})}, key=task_of)
    header = ["margin"] + [task_name(t) for t in tasks] + ["base acc", "base discr.", "novel discr."]
    rows = [[format_margin(e["margin"])] + [seed_cell(_numbers(e, pick)["tasks"].get(t)) for t in tasks]
            + [seed_cell(_numbers(e, pick).get("base_accuracy")),
               seed_cell(_numbers(e, pick).get("base_discriminability"), 3),
               seed_cell(_numbers(e, pick).get("novel_discriminability"), 3)]
            for e in entries if pick in e["checkpoints"]]
    delta_header = ["margin"] + [f"Δ {task_name(t)}" for t in tasks] + ["Δ base acc", "Δ base discr.",
                                                                         "Δ novel discr."]
    delta_rows = [[format_margin(e["margin"])] + [delta_cell(_paired(e, pick, t)) for t in tasks]
                  + [delta_cell(_paired(e, pick, "base")), delta_cell(_paired(e, pick, "base_discriminability"), 3),
                     delta_cell(_paired(e, pick, "novel_discriminability"), 3)]
                  for e in entries if e["margin"] != 0 and pick in e["checkpoints"]]
    statements = [peak_statement(task_name(t), entries, pick, t) for t in tasks]
    statements.append(trend_statement("base accuracy", entries, pick, "base_accuracy", "base"))
    statements.append(trend_statement("base discriminability", entries, pick, "base_discriminability",
                                      "base_discriminability", 3, "(ratio)"))
    statements.append(trend_statement("novel discriminability", entries, pick, "novel_discriminability",
                                      "novel_discriminability", 3, "(ratio)"))
    first = entries[0]
    heading = f"## {dataset} / {arch} ({first.get('metric')} head, T = {first.get('temperature'):g}): {PICK_NAMES[pick]}"
    return [heading, "", *markdown_table(header, rows), "", "Difference to m = 0 (paired):", "",
            *markdown_table(delta_header, delta_rows), "", *statements, ""]


def render_summary(metrics: dict[str, Any]) -> str:
    """Per dataset and model: the sweep, the paired differences to m = 0 and the statements, for the
    best-validation checkpoint and, where it was meta-tested, the final one."""
    lines = [
        "# Margin sweep summary",
        "",
        "Accuracies in %. Novel accuracy on test episodes of the novel classes; base accuracy of the trained head "
        "on held-out images of the base classes; discriminability = inter/intra-class variance ratio of "
        "L2-normalised features.",
        "",
        "- Per margin: mean over training seeds, ± the Student-t 95% CI over seeds from 3 seeds on; with fewer "
        "seeds their values are listed, since a t-interval from 2 seeds says next to nothing.",
        "- Difference to m = 0: measured *paired*, on the same test episodes (novel) or the same held-out images "
        "(base) as m = 0, seed by seed; shown as mean [95% CI] in points, pooled over seeds with a Student-t "
        "interval over the per-seed paired means (it holds seed and episode variance). `*` marks an interval "
        "that excludes 0. Discriminability is paired seed by seed only.",
        "- The statements below are computed from those differences: \"higher/lower than m = 0 by d [lo, hi]\" "
        "only where the interval excludes 0, \"no detectable difference\" otherwise.",
        "",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in metrics["aggregate"]:
        groups.setdefault((entry["dataset"], entry["arch"]), []).append(entry)
    for (dataset, arch), entries in sorted(groups.items()):
        for pick in PICK_NAMES:
            if any(pick in entry["checkpoints"] for entry in entries):
                lines += _section(dataset, arch, entries, pick)
    return "\n".join(lines)


def write_summary(metrics: dict[str, Any], out: str | os.PathLike) -> str:
    text = render_summary(metrics)
    write_text(out, text)
    return text

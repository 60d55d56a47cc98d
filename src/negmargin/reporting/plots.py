"""Margin-analysis plots (spec section 6) and the t-SNE of novel-class features.

Figures are built on ``matplotlib.figure.Figure`` (Agg canvas, no pyplot, no global style change), coloured
with seaborn's colour-blind-safe palette, and saved atomically as PNG and SVG. Every plotted number is
also written to a CSV next to the figures.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from negmargin.analysis import l2_normalize
from negmargin.errors import UserError
from negmargin.io import atomic_path, load_features, write_text
from negmargin.reporting.markdown import format_margin
from negmargin.reporting.metrics import dataset_runs, task_of
from negmargin.reporting.summary import task_name

DPI = 150
EXACT_TSNE_MAX = 1000
MARGIN_CSV_FIELDS = ("checkpoint", "quantity", "margin", "mean", "ci_low", "ci_high", "n_seeds", "seed_values",
                     "delta", "delta_ci_low", "delta_ci_high")
TSNE_CSV_FIELDS = ("panel", "margin", "class", "x", "y")
BASE = "base accuracy"
DISCRIMINABILITY = ("base discriminability", "novel discriminability")
MIN_SEEDS_FOR_BAND = 3  # a Student-t band from fewer seeds says next to nothing: the seeds are drawn as points


# ------------------------------------------------------------------------------------------------ output


def _palette(n: int) -> list[tuple[float, float, float]]:
    import seaborn as sns

    return list(sns.color_palette("colorblind", n_colors=max(n, 1)))


def _new_figure(ncols: int, width_per_panel: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_per_panel * ncols, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, stem: str | os.PathLike) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` atomically; the SVG carries no date and fixed ids."""
    import matplotlib

    stem = Path(stem)
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "negmargin", "svg.fonttype": "none"}):
        for fmt, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
            path = stem.with_suffix(f".{fmt}")
            with atomic_path(path, suffix=f".{fmt}") as tmp:
                figure.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata)
            paths.append(path)
    return paths


def write_csv(path: str | os.PathLike, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({field: "" if row.get(field) is None else row[field] for field in fields})
    write_text(path, buffer.getvalue())
    return Path(path)


# ------------------------------------------------------------------------------------------- margin sweeps


def _quantities(entries: list[dict[str, Any]], pick: str) -> list[tuple[str, str, str]]:
    """(name, key in the aggregate, key in paired_vs_zero) of every plotted quantity."""
    tasks = sorted({t for e in entries for t in e["checkpoints"].get(pick, {}).get("tasks", {})}, key=task_of)
    quantities = [(task_name(t), t, t) for t in tasks] + [(BASE, "base_accuracy", "base")]
    return quantities + [(name, name.replace(" ", "_"), name.replace(" ", "_")) for name in DISCRIMINABILITY]


def margin_series(metrics: dict[str, Any], dataset: str, arch: str) -> list[dict[str, Any]]:
    """Rows of every number the margin plots show: per checkpoint, quantity and margin the mean over seeds,
    its Student-t CI (clipped to [0, 100] for accuracies; none below 3 seeds), the per-seed values, and the
    paired difference to m = 0 with its CI."""
    runs = dataset_runs(metrics, dataset)
    if not any(run["arch"] == arch for run in runs):
        known = sorted({run["arch"] for run in runs})
        raise UserError(f"arch {arch!r} has no {dataset} runs in the metrics (it has: {', '.join(known)})")
    entries = sorted((entry for entry in metrics["aggregate"]
                      if entry["dataset"] == dataset and entry["arch"] == arch), key=lambda entry: entry["margin"])
    rows = []
    for pick in ("best", "final"):
        for name, key, paired_key in _quantities(entries, pick):
            for entry in entries:
                numbers = entry["checkpoints"].get(pick)
                if numbers is None:
                    continue
                stat = numbers["tasks"].get(key) if key in numbers["tasks"] else numbers.get(key)
                if not stat or stat.get("mean") is None:
                    continue
                low = high = None
                if stat.get("ci95") is not None and stat["n"] >= MIN_SEEDS_FOR_BAND:
                    low, high = stat["mean"] - stat["ci95"], stat["mean"] + stat["ci95"]
                    if "discriminability" not in name:
                        low, high = max(low, 0.0), min(high, 100.0)
                paired = numbers.get("paired_vs_zero", {}).get(paired_key) or {}
                zero = 0.0 if entry["margin"] == 0 else None
                rows.append({
                    "checkpoint": pick, "quantity": name, "margin": entry["margin"], "mean": stat["mean"],
                    "ci_low": low, "ci_high": high, "n_seeds": stat["n"],
                    "seed_values": " ".join(f"{v:.4f}" for v in stat.get("values", [])),
                    "delta": paired.get("mean", zero), "delta_ci_low": paired.get("ci95_low", zero),
                    "delta_ci_high": paired.get("ci95_high", zero),
                })
    return rows


def _margin_axis(ax, metric: str | None) -> None:
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    ax.axvline(0.0, linestyle=":", color="0.35", linewidth=1.2)
    ax.set_xlabel("margin m (logit units)" if metric == "softmax" else "margin m (cosine units)")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))


def _panels(figure, n: int):
    import seaborn as sns

    cols = min(n, 3)
    rows = -(-n // cols)
    with sns.axes_style("whitegrid"):
        return [figure.add_subplot(rows, cols, i + 1) for i in range(n)]


def _draw(ax, points: list[dict[str, Any]], value: str, low: str, high: str, color, label: str, seeds: bool,
          dashed: bool = False) -> None:
    """A mean line, its CI band where there is one, and (``seeds``) every seed's value as a point."""
    margins = np.array([p["margin"] for p in points], dtype=float)
    means = np.array([np.nan if p[value] is None else p[value] for p in points], dtype=float)
    (line,) = ax.plot(margins, means, marker="o", color=color, label=label, linewidth=1.8, markersize=4,
                      linestyle="--" if dashed else "-")
    line.set_gid(label)
    lows = np.array([np.nan if p[low] is None else p[low] for p in points], dtype=float)
    highs = np.array([np.nan if p[high] is None else p[high] for p in points], dtype=float)
    if np.isfinite(lows).any():
        band = ax.fill_between(margins, lows, highs, color=color, alpha=0.18, linewidth=0, label="_nolegend_")
        band.set_gid(f"{label} ci")
    if seeds:
        xs = [p["margin"] for p in points for _ in p["seed_values"].split()]
        ys = [float(v) for p in points for v in p["seed_values"].split()]
        ax.scatter(xs, ys, s=9, color=color, alpha=0.55, linewidths=0, label="_nolegend_")


def _note(rows: list[dict[str, Any]]) -> str:
    seeds = sorted({row["n_seeds"] for row in rows})
    if max(seeds) < MIN_SEEDS_FOR_BAND:
        return f"{'/'.join(map(str, seeds))} training seed(s) per margin: points are the seeds, no band"
    return f"band: Student-t 95% CI over {'/'.join(map(str, seeds))} seeds (clipped to 0-100 %); points: the seeds"


def delta_figure(rows: list[dict[str, Any]], title: str, metric: str | None = None):
    """The figure that answers the paper's question: each accuracy's paired difference to m = 0 against the
    margin, with its 95% CI band and the zero line; best-validation checkpoint solid, final dashed."""
    names = [name for name in dict.fromkeys(r["quantity"] for r in rows) if "discriminability" not in name]
    colors = dict(zip(names, _palette(len(names)), strict=True))
    figure = _new_figure(min(len(names), 3), 4.3, 3.6 * -(-len(names) // 3))
    for ax, name in zip(_panels(figure, len(names)), names, strict=True):
        for pick, dashed in (("best", False), ("final", True)):
            points = [r for r in rows if r["quantity"] == name and r["checkpoint"] == pick and r["delta"] is not None]
            if points:
                _draw(ax, points, "delta", "delta_ci_low", "delta_ci_high", colors[name],
                      f"{pick} checkpoint", seeds=False, dashed=dashed)
        ax.axhline(0.0, color="0.2", linewidth=1.0)
        _margin_axis(ax, metric)
        ax.set_ylabel("accuracy − accuracy at m = 0 (points)")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    figure.suptitle(f"{title}: difference to m = 0, paired on the same episodes / images\n"
                    "band: 95% CI pooled over seeds (Student t over the per-seed paired means)", fontsize=10)
    return figure


def accuracy_figure(rows: list[dict[str, Any]], title: str, metric: str | None = None):
    """Novel accuracy of every task and base accuracy against the margin, one panel (and y-range) each;
    best-validation checkpoint, with the final checkpoint dashed where it was meta-tested."""
    names = [name for name in dict.fromkeys(r["quantity"] for r in rows) if "discriminability" not in name]
    colors = dict(zip(names, _palette(len(names)), strict=True))
    figure = _new_figure(min(len(names), 3), 4.3, 3.6 * -(-len(names) // 3))
    for ax, name in zip(_panels(figure, len(names)), names, strict=True):
        for pick, dashed in (("best", False), ("final", True)):
            points = [r for r in rows if r["quantity"] == name and r["checkpoint"] == pick]
            if points:
                _draw(ax, points, "mean", "ci_low", "ci_high", colors[name], f"{pick} checkpoint",
                      seeds=not dashed, dashed=dashed)
        _margin_axis(ax, metric)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(name if name != BASE else "base classes (held-out images)", fontsize=10)
        ax.legend(fontsize=7, loc="best")
    best = [r for r in rows if r["checkpoint"] == "best"]
    figure.suptitle(f"{title}: accuracy against the margin\n{_note(best)}", fontsize=10)
    return figure


def discriminability_figure(rows: list[dict[str, Any]], title: str, metric: str | None = None):
    """Base and novel discriminability against the margin, side by side (their scales differ)."""
    colors = _palette(2)
    figure = _new_figure(2, 4.6, 4.0)
    for ax, name, color in zip(_panels(figure, 2), DISCRIMINABILITY, colors, strict=True):
        points = [r for r in rows if r["quantity"] == name and r["checkpoint"] == "best"]
        if points:
            _draw(ax, points, "mean", "ci_low", "ci_high", color, name, seeds=True)
        _margin_axis(ax, metric)
        ax.set_ylabel("inter / intra-class variance ratio (unitless)")
        ax.set_title(name.replace("discriminability", "classes"), fontsize=10)
    best = [r for r in rows if r["checkpoint"] == "best" and r["quantity"] in DISCRIMINABILITY]
    figure.suptitle(f"{title}: feature discriminability (L2-normalised features), best-validation checkpoint\n"
                    f"{_note(best or rows)}", fontsize=10)
    return figure


def sweep_column(pick: str, quantity: str) -> str:
    """('best', 'novel 5-way 1-shot') -> 'best_novel_5way_1shot': a CSV column (and a DVC plot's y)."""
    return f"{pick}_" + quantity.replace("-way", "way").replace("-shot", "shot").replace(" ", "_")


def sweep_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """margin_analysis.csv pivoted to one row per margin, one mean column per (checkpoint, accuracy): the
    margin sweep as `dvc plots` draws it (x = margin, y = the accuracies)."""
    accuracy = [r for r in rows if "discriminability" not in r["quantity"]]
    columns = list(dict.fromkeys(sweep_column(r["checkpoint"], r["quantity"]) for r in accuracy))
    by_margin: dict[float, dict[str, Any]] = {}
    for row in accuracy:
        by_margin.setdefault(row["margin"], {"margin": row["margin"]})[
            sweep_column(row["checkpoint"], row["quantity"])] = row["mean"]
    return ["margin", *columns], [by_margin[m] for m in sorted(by_margin)]


def plot_margins(metrics: dict[str, Any], dataset: str, arch: str, out_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """``delta_vs_margin``, ``accuracy_vs_margin`` and ``discriminability_vs_margin`` (PNG + SVG),
    ``margin_analysis.csv`` (long: every plotted number with its CI and paired difference) and
    ``margin_sweep.csv`` (wide: one row per margin, the mean accuracies)."""
    out_dir = Path(out_dir)
    rows = margin_series(metrics, dataset, arch)
    if not rows:
        raise UserError(f"{dataset}/{arch}: the metrics hold no numbers to plot")
    metric = next((entry.get("metric") for entry in metrics["aggregate"]
                   if entry["dataset"] == dataset and entry["arch"] == arch), None)
    title = f"{dataset} / {arch}"
    outputs = {"csv": [write_csv(out_dir / "margin_analysis.csv", MARGIN_CSV_FIELDS, rows),
                       write_csv(out_dir / "margin_sweep.csv", *sweep_rows(rows))]}
    for stem, build in (("delta_vs_margin", delta_figure), ("accuracy_vs_margin", accuracy_figure),
                        ("discriminability_vs_margin", discriminability_figure)):
        outputs[stem] = save_figure(build(rows, title, metric), out_dir / stem)
    return outputs


# ---------------------------------------------------------------------------------------------------- t-SNE


def parse_labelled_path(text: str) -> tuple[float, Path]:
    """``MARGIN=PATH`` (the margin may start with '-'). A number holds no '=', so the first '=' ends the
    label and a path may itself contain '=' (e.g. ``-0.2=runs/m=-0.2/novel.npz``)."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise UserError(f"bad --features value {text!r}: expected MARGIN=FILE.npz, e.g. -0.2=novel.npz")
    try:
        margin = float(label)
    except ValueError:
        raise UserError(f"bad --features value {text!r}: the label {label!r} is not a margin (a number)") from None
    return margin, Path(path)


def tsne_embeddings(panels: Sequence[tuple[float, dict[str, np.ndarray]]], classes: int = 5, per_class: int = 20,
                    seed: int = 0) -> list[dict[str, Any]]:
    """2-D t-SNE of a few novel classes in each panel (one panel per margin).

    The classes are drawn with ``seed`` among the class names every panel shares, so all panels show the same
    classes; within a class, ``per_class`` samples are drawn with the same seed (the same images when the
    panels are features of the same split). Features are L2-normalised first (what the cosine head sees);
    sklearn's TSNE runs with init='pca', random_state=seed, perplexity min(30, (n - 1) / 3), exact up to
    EXACT_TSNE_MAX points.
    """
    from sklearn.manifold import TSNE

    if not panels:
        raise UserError("t-SNE needs at least one feature file")
    if classes < 1 or per_class < 2:
        raise UserError("t-SNE needs --classes >= 1 and --per-class >= 2")
    shared = set(panels[0][1]["class_names"].tolist())
    for _, arrays in panels[1:]:
        shared &= set(arrays["class_names"].tolist())
    shared_names = sorted(shared)
    if len(shared_names) < classes:
        raise UserError(f"the feature files share {len(shared_names)} classes, fewer than --classes {classes}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(shared_names), size=classes, replace=False).tolist())
    chosen_names = [shared_names[i] for i in chosen]

    rows = []
    for panel, (margin, arrays) in enumerate(panels):
        names = arrays["class_names"].tolist()
        panel_rng = np.random.default_rng(seed)
        indices, point_classes = [], []
        for name in chosen_names:
            members = np.flatnonzero(arrays["labels"] == names.index(name))
            take = panel_rng.choice(members, size=min(per_class, len(members)), replace=False)
            indices.extend(sorted(take.tolist()))
            point_classes.extend([name] * len(take))
        points = l2_normalize(arrays["features"][indices].astype(np.float64))
        if len(points) < 3:
            raise UserError(f"panel m = {format_margin(margin)}: {len(points)} samples, too few for t-SNE")
        # Exact gradients for the few hundred points a panel usually holds: faster there than Barnes-Hut.
        tsne = TSNE(n_components=2, perplexity=min(30.0, (len(points) - 1) / 3.0), init="pca",
                    random_state=seed, method="exact" if len(points) <= EXACT_TSNE_MAX else "barnes_hut")
        embedded = tsne.fit_transform(points)
        rows += [{"panel": panel, "margin": margin, "class": name, "x": float(x), "y": float(y)}
                 for name, (x, y) in zip(point_classes, embedded, strict=True)]
    return rows


def tsne_figure(rows: list[dict[str, Any]]):
    """One panel per margin, side by side; one colour (and marker) per class, shared legend."""
    import seaborn as sns

    panels = sorted({(row["panel"], row["margin"]) for row in rows})
    class_names = sorted({row["class"] for row in rows})
    colors = dict(zip(class_names, _palette(len(class_names)), strict=True))
    markers = dict(zip(class_names, "osD^vP*Xph" * (len(class_names) // 10 + 1), strict=False))
    figure = _new_figure(len(panels), 3.6, 3.9)
    with sns.axes_style("white"):
        axes = [figure.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    for ax, (panel, margin) in zip(axes, panels, strict=True):
        for name in class_names:
            points = [(row["x"], row["y"]) for row in rows if row["panel"] == panel and row["class"] == name]
            if points:
                xy = np.array(points)
                ax.scatter(xy[:, 0], xy[:, 1], s=14, color=colors[name], marker=markers[name], label=name,
                           alpha=0.85, linewidths=0)
        ax.set_title(f"m = {format_margin(margin)}", fontsize=10)
        ax.set_xlabel("t-SNE 1 (no unit)")
        ax.set_ylabel("t-SNE 2 (no unit)")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=8,
                  title="novel class")
    figure.suptitle("t-SNE of novel-class features (L2-normalised)", fontsize=10)
    return figure


def plot_tsne(feature_files: Sequence[tuple[float, str | os.PathLike]], out_dir: str | os.PathLike, classes: int = 5,
              per_class: int = 20, seed: int = 0) -> dict[str, list[Path]]:
    """``tsne_novel`` (PNG + SVG) and ``tsne.csv`` (panel, margin, class, x, y); panels sorted by margin."""
    margins = [margin for margin, _ in feature_files]
    if len(set(margins)) != len(margins):
        raise UserError(f"each margin may be given once, got {', '.join(map(format_margin, margins))}")
    panels = [(margin, load_features(path)) for margin, path in sorted(feature_files, key=lambda item: item[0])]
    rows = tsne_embeddings(panels, classes=classes, per_class=per_class, seed=seed)
    out_dir = Path(out_dir)
    return {
        "csv": [write_csv(out_dir / "tsne.csv", TSNE_CSV_FIELDS, rows)],
        "tsne_novel": save_figure(tsne_figure(rows), out_dir / "tsne_novel"),
    }

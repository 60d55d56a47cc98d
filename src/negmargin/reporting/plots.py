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
from negmargin.reporting.tables import dataset_runs, format_margin

DPI = 150
EXACT_TSNE_MAX = 1000
MARGIN_CSV_FIELDS = ("margin", "series", "mean", "ci_low", "ci_high", "n_seeds")
TSNE_CSV_FIELDS = ("panel", "margin", "class", "x", "y")
ACCURACY_SERIES = "base accuracy"
DISCRIMINABILITY_SERIES = ("base discriminability", "novel discriminability")


def novel_series(shot: int | str) -> str:
    return f"novel {shot}-shot"


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


def margin_series(metrics: dict[str, Any], dataset: str, arch: str) -> list[dict[str, Any]]:
    """Rows (margin, series, mean, ci_low, ci_high, n_seeds) of every number the margin plots show.

    Series: ``base accuracy``, ``novel <k>-shot`` (every shot present), ``base discriminability`` and
    ``novel discriminability`` (the inter/intra ratio). CI bounds are mean ± the across-seed Student-t
    half-width, None with one seed. Margins where a number is missing contribute no row to that series.
    """
    runs = dataset_runs(metrics, dataset)
    if not any(run["arch"] == arch for run in runs):
        known = sorted({run["arch"] for run in runs})
        raise UserError(f"arch {arch!r} has no {dataset} runs in the metrics (it has: {', '.join(known)})")
    entries = sorted((entry for entry in metrics["aggregate"]
                      if entry["dataset"] == dataset and entry["arch"] == arch), key=lambda entry: entry["margin"])
    shots = sorted({int(shot) for entry in entries for shot in entry["novel"]})
    rows = []

    def add(series: str, entry: dict[str, Any], stat: dict[str, Any] | None) -> None:
        if not stat or stat.get("mean") is None:
            return
        ci = stat.get("ci95")
        rows.append({
            "margin": entry["margin"], "series": series, "mean": stat["mean"],
            "ci_low": None if ci is None else stat["mean"] - ci, "ci_high": None if ci is None else stat["mean"] + ci,
            "n_seeds": stat["n"],
        })

    for entry in entries:
        add(ACCURACY_SERIES, entry, entry.get("base_accuracy"))
        for shot in shots:
            add(novel_series(shot), entry, entry["novel"].get(str(shot)))
        add(DISCRIMINABILITY_SERIES[0], entry, entry.get("base_discriminability"))
        add(DISCRIMINABILITY_SERIES[1], entry, entry.get("novel_discriminability"))
    return rows


def _margin_axis(ax, metric: str | None) -> None:
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    ax.axvline(0.0, linestyle=":", color="0.35", linewidth=1.2, label="m = 0")
    ax.set_xlabel("margin m (logit units)" if metric == "softmax" else "margin m (cosine units)")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))


def _draw_series(ax, rows: list[dict[str, Any]], series: str, label: str, color, marker: str) -> None:
    points = [row for row in rows if row["series"] == series]
    if not points:
        return
    margins = np.array([row["margin"] for row in points], dtype=float)
    means = np.array([row["mean"] for row in points], dtype=float)
    (line,) = ax.plot(margins, means, marker=marker, color=color, label=label, linewidth=1.8, markersize=5)
    line.set_gid(series)
    low = np.array([np.nan if row["ci_low"] is None else row["ci_low"] for row in points], dtype=float)
    high = np.array([np.nan if row["ci_high"] is None else row["ci_high"] for row in points], dtype=float)
    if np.isfinite(low).any():
        band = ax.fill_between(margins, low, high, color=color, alpha=0.2, linewidth=0, label="_nolegend_")
        band.set_gid(f"{series} ci")


def _seed_note(rows: list[dict[str, Any]]) -> str:
    seeds = sorted({row["n_seeds"] for row in rows})
    if seeds == [1]:
        return "one training seed per margin: no CI band"
    return f"bands: 95% CI over {'/'.join(map(str, seeds))} training seeds (Student t)"


def accuracy_figure(rows: list[dict[str, Any]], title: str, metric: str | None = None, ways: int | None = None,
                    base_classes: int | None = None):
    """Base accuracy and novel k-shot accuracy against the margin, one axis in %."""
    import seaborn as sns

    series = [ACCURACY_SERIES] + sorted({row["series"] for row in rows if row["series"].startswith("novel ")
                                         and row["series"].endswith("-shot")},
                                        key=lambda name: int(name.split()[1].split("-")[0]))
    colors = _palette(len(series))
    base_way = f"{base_classes}-way" if base_classes else "all base classes"
    novel_way = f"{ways}-way " if ways else ""
    labels = {ACCURACY_SERIES: f"base classes (held-out images, {base_way})"}
    figure = _new_figure(1, 6.4, 5.0)
    with sns.axes_style("whitegrid"):
        ax = figure.add_subplot(1, 1, 1)
    for index, name in enumerate(series):
        label = labels.get(name, f"novel classes, {novel_way}{name.split()[1]}")
        _draw_series(ax, rows, name, label, colors[index], "osD^v"[index % 5])
    _margin_axis(ax, metric)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}: accuracy against the margin\n{_seed_note(rows)}", fontsize=10)
    figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    return figure


def discriminability_figure(rows: list[dict[str, Any]], title: str, metric: str | None = None):
    """Base and novel discriminability against the margin, side by side (their scales differ)."""
    import seaborn as sns

    colors = _palette(2)
    figure = _new_figure(2, 4.6, 4.0)
    with sns.axes_style("whitegrid"):
        axes = [figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)]
    for ax, series, color, marker, heading in zip(
        axes, DISCRIMINABILITY_SERIES, colors, "os", ("base classes (held-out images)", "novel classes"),
        strict=True,
    ):
        _draw_series(ax, rows, series, series, color, marker)
        _margin_axis(ax, metric)
        ax.set_ylabel("inter / intra-class variance ratio (unitless)")
        ax.set_title(heading, fontsize=10)
    figure.suptitle(f"{title}: feature discriminability (L2-normalised features)\n{_seed_note(rows)}", fontsize=10)
    return figure


def sweep_column(series: str) -> str:
    """'novel 1-shot' -> 'novel_1shot', 'base accuracy' -> 'base_accuracy': a CSV column (and DVC plot y)."""
    return series.replace("-shot", "shot").replace(" ", "_")


def sweep_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The long rows of margin_analysis.csv pivoted to one row per margin, one mean column per series
    (the margin sweep as `dvc plots` draws it: x = margin, y = the accuracies)."""
    series = list(dict.fromkeys(row["series"] for row in rows))
    by_margin: dict[float, dict[str, Any]] = {}
    for row in rows:
        by_margin.setdefault(row["margin"], {"margin": row["margin"]})[sweep_column(row["series"])] = row["mean"]
    return ["margin", *map(sweep_column, series)], [by_margin[m] for m in sorted(by_margin)]


def plot_margins(metrics: dict[str, Any], dataset: str, arch: str, out_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """``accuracy_vs_margin`` and ``discriminability_vs_margin`` (PNG + SVG), ``margin_analysis.csv`` (long:
    every plotted number with its CI) and ``margin_sweep.csv`` (wide: one row per margin, the means)."""
    out_dir = Path(out_dir)
    rows = margin_series(metrics, dataset, arch)
    if not rows:
        raise UserError(f"{dataset}/{arch}: the metrics hold no numbers to plot")
    metric = next((entry.get("metric") for entry in metrics["aggregate"]
                   if entry["dataset"] == dataset and entry["arch"] == arch), None)
    runs = [run for run in dataset_runs(metrics, dataset) if run["arch"] == arch]
    ways = {run.get("ways") for run in runs}
    base_classes = {run.get("num_classes") for run in runs}
    title = f"{dataset} / {arch}"
    outputs = {"csv": [write_csv(out_dir / "margin_analysis.csv", MARGIN_CSV_FIELDS, rows),
                       write_csv(out_dir / "margin_sweep.csv", *sweep_rows(rows))]}
    figure = accuracy_figure(rows, title, metric, ways=ways.pop() if len(ways) == 1 else None,
                             base_classes=base_classes.pop() if len(base_classes) == 1 else None)
    outputs["accuracy_vs_margin"] = save_figure(figure, out_dir / "accuracy_vs_margin")
    figure = discriminability_figure(rows, title, metric)
    outputs["discriminability_vs_margin"] = save_figure(figure, out_dir / "discriminability_vs_margin")
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

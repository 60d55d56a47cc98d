"""Tests of negmargin.reporting.plots: margin plots, their CSV, the t-SNE panels, and the CLI verbs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error

from negmargin.cli import main
from negmargin.errors import UserError
from negmargin.reporting.metrics import aggregate_runs
from negmargin.reporting.plots import (
    accuracy_figure,
    discriminability_figure,
    margin_series,
    parse_labelled_path,
    plot_margins,
)

MARGINS = (-0.2, -0.1, 0.0, 0.1)


def _metrics() -> dict:
    """metrics.json in the schema of `negmargin metrics`: two seeds per margin, one seed at m = 0.1."""
    runs = []
    for index, margin in enumerate(MARGINS):
        for seed in (0, 1) if margin != 0.1 else (0,):
            shift = seed * 0.8
            runs.append({
                "dataset": "omniglot", "arch": "conv4", "margin": margin, "seed": seed, "metric": "cosine",
                "temperature": 10.0, "image_size": 28, "batch_size": 64, "epochs": 3, "num_classes": 1028,
                "ways": 5,
                "shots": {"1": {"accuracy_mean": 90.0 - 10 * (margin + 0.1) ** 2 * 100 + shift},
                          "5": {"accuracy_mean": 97.0 - index + shift}},
                "base_accuracy": 80.0 + 50 * margin + shift,
                "base_discriminability": {"ratio": 1.0 + margin + seed * 0.01},
                "novel_discriminability": {"ratio": 0.5 - abs(margin + 0.1) + seed * 0.01},
            })
    return {"format": "negmargin-metrics/1", "runs": runs, "aggregate": aggregate_runs(runs)}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_margin_series_match_the_aggregate():
    metrics = _metrics()
    rows = margin_series(metrics, "omniglot", "conv4")
    assert {row["series"] for row in rows} == {"base accuracy", "novel 1-shot", "novel 5-shot",
                                                "base discriminability", "novel discriminability"}
    for entry in metrics["aggregate"]:
        row = next(r for r in rows if r["margin"] == entry["margin"] and r["series"] == "novel 1-shot")
        stat = entry["novel"]["1"]
        assert row["mean"] == stat["mean"] and row["n_seeds"] == stat["n"]
        if stat["ci95"] is None:
            assert row["ci_low"] is None and row["ci_high"] is None
        else:
            assert row["ci_low"] == pytest.approx(stat["mean"] - stat["ci95"])
            assert row["ci_high"] == pytest.approx(stat["mean"] + stat["ci95"])


def test_plot_margins_files_csv_and_plotted_data(tmp_path):
    metrics = _metrics()
    outputs = plot_margins(metrics, "omniglot", "conv4", tmp_path)
    for stem in ("accuracy_vs_margin", "discriminability_vs_margin"):
        png, svg = tmp_path / f"{stem}.png", tmp_path / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert "<svg" in svg.read_text()[:500]
        assert outputs[stem] == [png, svg]
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporaries

    # the CSV holds exactly the aggregate numbers
    rows = _read_csv(tmp_path / "margin_analysis.csv")
    assert list(rows[0]) == ["margin", "series", "mean", "ci_low", "ci_high", "n_seeds"]
    by_key = {(float(r["margin"]), r["series"]): r for r in rows}
    for entry in metrics["aggregate"]:
        for series, stat in (("base accuracy", entry["base_accuracy"]), ("novel 5-shot", entry["novel"]["5"]),
                             ("novel discriminability", entry["novel_discriminability"])):
            row = by_key[(entry["margin"], series)]
            assert float(row["mean"]) == stat["mean"]
            assert int(row["n_seeds"]) == stat["n"]
            if stat["ci95"] is None:
                assert row["ci_low"] == row["ci_high"] == ""
            else:
                assert float(row["ci_high"]) - float(row["mean"]) == pytest.approx(stat["ci95"])

    # the wide sweep (what `dvc plots` draws): one row per margin, the same means
    sweep = _read_csv(tmp_path / "margin_sweep.csv")
    assert list(sweep[0]) == ["margin", "base_accuracy", "novel_1shot", "novel_5shot", "base_discriminability",
                              "novel_discriminability"]
    assert [float(r["margin"]) for r in sweep] == sorted(entry["margin"] for entry in metrics["aggregate"])
    for entry, row in zip(sorted(metrics["aggregate"], key=lambda e: e["margin"]), sweep, strict=True):
        assert float(row["base_accuracy"]) == entry["base_accuracy"]["mean"]
        assert float(row["novel_1shot"]) == entry["novel"]["1"]["mean"]
        assert float(row["novel_5shot"]) == entry["novel"]["5"]["mean"]
        assert float(row["novel_discriminability"]) == entry["novel_discriminability"]["mean"]


def test_figures_plot_the_metric_numbers():
    metrics = _metrics()
    rows = margin_series(metrics, "omniglot", "conv4")
    figure = accuracy_figure(rows, "omniglot / conv4", "cosine", ways=5, base_classes=1028)
    ax = figure.axes[0]
    lines = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
    assert set(lines) == {"base accuracy", "novel 1-shot", "novel 5-shot"}
    expected_margins = [entry["margin"] for entry in metrics["aggregate"]]
    for series, pick in (("base accuracy", lambda e: e["base_accuracy"]["mean"]),
                         ("novel 1-shot", lambda e: e["novel"]["1"]["mean"])):
        assert list(lines[series].get_xdata()) == expected_margins
        assert list(lines[series].get_ydata()) == [pick(e) for e in metrics["aggregate"]]
    # a dotted vertical line at m = 0, CI bands, axis labels with units
    zero = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert zero and list(zero[0].get_xdata()) == [0.0, 0.0]
    assert any(collection.get_gid() == "novel 1-shot ci" for collection in ax.collections)
    assert ax.get_ylabel() == "accuracy (%)" and "margin m" in ax.get_xlabel()

    figure = discriminability_figure(rows, "omniglot / conv4", "cosine")
    base_ax, novel_ax = figure.axes[:2]
    base_line = next(line for line in base_ax.get_lines() if line.get_gid() == "base discriminability")
    assert list(base_line.get_ydata()) == [e["base_discriminability"]["mean"] for e in metrics["aggregate"]]
    assert any(line.get_gid() == "novel discriminability" for line in novel_ax.get_lines())


def test_single_seed_sweep_has_no_bands():
    runs = [dict(run) for run in _metrics()["runs"] if run["seed"] == 0]
    metrics = {"runs": runs, "aggregate": aggregate_runs(runs)}
    figure = accuracy_figure(margin_series(metrics, "omniglot", "conv4"), "t")
    assert not figure.axes[0].collections


def test_plot_margins_bad_input(tmp_path):
    with pytest.raises(UserError, match="'cub' is not in the metrics"):
        plot_margins(_metrics(), "cub", "conv4", tmp_path)
    with pytest.raises(UserError, match="arch 'resnet12' has no omniglot runs"):
        plot_margins(_metrics(), "omniglot", "resnet12", tmp_path)


# ---------------------------------------------------------------------------------------------------- t-SNE


def test_parse_labelled_path():
    assert parse_labelled_path("-0.2=results/n.npz") == (-0.2, Path("results/n.npz"))
    assert parse_labelled_path("0=n.npz") == (0.0, Path("n.npz"))
    assert parse_labelled_path("1e-2=n.npz") == (0.01, Path("n.npz"))
    assert parse_labelled_path("-0.2=runs/m=-0.2/n.npz") == (-0.2, Path("runs/m=-0.2/n.npz"))
    for bad in ("n.npz", "=n.npz", "-0.2=", "low=n.npz"):
        with pytest.raises(UserError, match="--features"):
            parse_labelled_path(bad)


@pytest.fixture()
def novel_files(tmp_path):
    rng = np.random.default_rng(0)
    names = np.array([f"n{k:02d}" for k in range(8)])
    labels = np.repeat(np.arange(8), 12)
    files = {}
    for margin in ("-0.2", "0", "0.2"):
        centres = rng.normal(size=(8, 16))
        features = centres[labels] + 0.3 * rng.normal(size=(96, 16))
        files[margin] = tmp_path / f"novel_m{margin}.npz"
        np.savez(files[margin], features=features.astype(np.float32), labels=labels, class_names=names)
    return files


def test_plot_tsne_cli_negative_labels_and_requested_classes(novel_files, tmp_path, capsys):
    out = tmp_path / "plots"
    rc = main(["plot-tsne", "--features", f"-0.2={novel_files['-0.2']}", f"0={novel_files['0']}",
               f"--features=0.2={novel_files['0.2']}", "--classes", "3", "--per-class", "10", "--seed", "1",
               "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "tsne_novel.png").stat().st_size > 5000 and "<svg" in (out / "tsne_novel.svg").read_text()[:500]
    rows = _read_csv(out / "tsne.csv")
    assert list(rows[0]) == ["panel", "margin", "class", "x", "y"]
    assert sorted({(r["panel"], float(r["margin"])) for r in rows}) == [("0", -0.2), ("1", 0.0), ("2", 0.2)]
    classes = {panel: {r["class"] for r in rows if r["panel"] == panel} for panel in ("0", "1", "2")}
    assert len(classes["0"]) == 3 and classes["0"] == classes["1"] == classes["2"]
    for panel in ("0", "1", "2"):
        for name in classes[panel]:
            assert sum(1 for r in rows if r["panel"] == panel and r["class"] == name) == 10
    assert all(np.isfinite(float(r["x"])) and np.isfinite(float(r["y"])) for r in rows)


def test_plot_cli_bad_input(novel_files, tmp_path, capsys):
    out = str(tmp_path / "plots")
    assert "not a margin" in one_line_error(
        capsys, ["plot-tsne", "--features", f"low={novel_files['0']}", "--out-dir", out])
    assert "feature file not found" in one_line_error(
        capsys, ["plot-tsne", "--features", "-0.1=missing.npz", "--out-dir", out])
    assert "fewer than --classes" in one_line_error(
        capsys, ["plot-tsne", "--features", f"0={novel_files['0']}", "--classes", "9", "--out-dir", out])
    assert "given once" in one_line_error(
        capsys, ["plot-tsne", "--features", f"0={novel_files['0']}", f"0.0={novel_files['0']}", "--out-dir", out])
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(_metrics()))
    assert "not in the metrics" in one_line_error(
        capsys, ["plot-margins", "--metrics", str(metrics), "--dataset", "cub", "--arch", "conv4", "--out-dir", out])
    assert "file not found" in one_line_error(
        capsys, ["plot-margins", "--metrics", str(tmp_path / "no.json"), "--dataset", "cub", "--arch", "conv4",
                 "--out-dir", out])
    assert not Path(out).exists()


def test_plot_margins_cli(tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(_metrics()))
    rc = main(["plot-margins", "--metrics", str(metrics), "--dataset", "omniglot", "--arch", "conv4",
               "--out-dir", str(tmp_path / "plots")])
    assert rc == 0
    assert "accuracy_vs_margin.svg" in capsys.readouterr().out


def test_plot_files_are_reproducible(tmp_path):
    plot_margins(_metrics(), "omniglot", "conv4", tmp_path / "a")
    plot_margins(_metrics(), "omniglot", "conv4", tmp_path / "b")
    for name in ("accuracy_vs_margin.svg", "accuracy_vs_margin.png", "margin_analysis.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

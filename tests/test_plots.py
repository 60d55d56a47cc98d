"""Tests of negmargin.reporting.plots: margin plots, their CSV, the t-SNE panels, and the CLI verbs."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error
from result_folders import episodes, make_run

from negmargin.cli import main
from negmargin.errors import UserError
from negmargin.reporting.metrics import collect_metrics
from negmargin.reporting.plots import (
    accuracy_figure,
    delta_figure,
    discriminability_figure,
    margin_series,
    parse_labelled_path,
    plot_margins,
)

MARGINS = (-0.2, -0.1, 0.0, 0.1)


def _metrics(seeds=(0, 1, 2)) -> dict:
    return json.loads(_metrics_text(tuple(seeds)))


@functools.lru_cache(maxsize=2)
def _metrics_text(seeds: tuple[int, ...], root: Path | None = None) -> str:
    """metrics.json as `negmargin metrics` writes it, from real run folders: a sweep over MARGINS with a base
    accuracy near 100 % at m = 0.1 (its CI band must be clipped) and the final checkpoint meta-tested too."""
    import tempfile

    root = Path(root or tempfile.mkdtemp())
    runs = []
    for margin in MARGINS:
        for seed in seeds:
            one = 90.0 - 1000 * (margin + 0.1) ** 2 + seed * 0.8
            correct = [1] * (int(380 + 150 * margin) + 4 * seed) + [0] * 400
            runs.append(make_run(root / f"m{margin}s{seed}", dataset="omniglot", margin=margin, seed=seed,
                                 tasks={(5, 1): [v + one - 90.0 for v in episodes(90.0, spread=6.0, seed=seed)],
                                        (20, 5): 97.0 + margin + seed * 0.1},
                                 base_correct=correct[:400], base_ratio=1.0 + margin + seed * 0.01,
                                 novel_ratio=0.5 - abs(margin + 0.1) + seed * 0.01, picks=("best", "final")))
    return json.dumps(collect_metrics(runs, root))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_margin_series_match_the_aggregate():
    metrics = _metrics()
    rows = margin_series(metrics, "omniglot", "conv4")
    assert {row["quantity"] for row in rows} == {"novel 5-way 1-shot", "novel 20-way 5-shot", "base accuracy",
                                                  "base discriminability", "novel discriminability"}
    for entry in metrics["aggregate"]:
        row = next(r for r in rows if r["margin"] == entry["margin"] and r["quantity"] == "novel 5-way 1-shot"
                   and r["checkpoint"] == "best")
        stat = entry["checkpoints"]["best"]["tasks"]["5way-1shot"]
        assert row["mean"] == stat["mean"] and row["n_seeds"] == stat["n"] == 3
        assert row["ci_low"] == pytest.approx(max(stat["mean"] - stat["ci95"], 0.0))
        paired = entry["checkpoints"]["best"].get("paired_vs_zero", {}).get("5way-1shot")
        assert row["delta"] == (0.0 if entry["margin"] == 0 else pytest.approx(paired["mean"]))


def test_bands_stay_inside_0_and_100_percent():
    rows = margin_series(_metrics(), "omniglot", "conv4")
    accuracy = [r for r in rows if "discriminability" not in r["quantity"] and r["ci_low"] is not None]
    assert accuracy and all(0.0 <= r["ci_low"] and r["ci_high"] <= 100.0 for r in accuracy)
    clipped = [r for r in accuracy if r["quantity"] == "base accuracy" and r["margin"] == 0.1]
    assert clipped[0]["ci_high"] == 100.0  # base accuracy of ~97.5 with a wide seed interval


def test_plot_margins_files_csv_and_plotted_data(tmp_path):
    metrics = _metrics()
    outputs = plot_margins(metrics, "omniglot", "conv4", tmp_path)
    for stem in ("delta_vs_margin", "accuracy_vs_margin", "discriminability_vs_margin"):
        png, svg = tmp_path / f"{stem}.png", tmp_path / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert "<svg" in svg.read_text()[:500]
        assert outputs[stem] == [png, svg]
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporaries
    rows = _read_csv(tmp_path / "margin_analysis.csv")
    assert list(rows[0]) == ["checkpoint", "quantity", "margin", "mean", "ci_low", "ci_high", "n_seeds",
                             "seed_values", "delta", "delta_ci_low", "delta_ci_high"]
    by_key = {(r["checkpoint"], r["quantity"], float(r["margin"])): r for r in rows}
    for entry in metrics["aggregate"]:
        stat = entry["checkpoints"]["final"]["base_accuracy"]
        row = by_key[("final", "base accuracy", entry["margin"])]
        assert float(row["mean"]) == stat["mean"] and [float(v) for v in row["seed_values"].split()] == \
            pytest.approx(stat["values"], abs=1e-4)
    sweep = _read_csv(tmp_path / "margin_sweep.csv")
    assert list(sweep[0])[:4] == ["margin", "best_novel_5way_1shot", "best_novel_20way_5shot", "best_base_accuracy"]
    assert [float(r["margin"]) for r in sweep] == list(MARGINS)


def test_each_accuracy_has_its_own_axis_and_the_delta_plot_a_zero_line():
    metrics = _metrics()
    rows = margin_series(metrics, "omniglot", "conv4")
    figure = accuracy_figure(rows, "omniglot / conv4", "cosine")
    assert [ax.get_title() for ax in figure.axes] == ["novel 5-way 1-shot", "novel 20-way 5-shot",
                                                       "base classes (held-out images)"]
    lows = [ax.get_ylim()[0] for ax in figure.axes]
    assert len(set(lows)) == 3  # no shared 0-100 axis
    best = next(line for line in figure.axes[0].get_lines() if line.get_gid() == "best checkpoint")
    assert list(best.get_xdata()) == list(MARGINS)
    assert list(best.get_ydata()) == [e["checkpoints"]["best"]["tasks"]["5way-1shot"]["mean"]
                                      for e in metrics["aggregate"]]
    assert figure.axes[0].collections  # the band and the seed points
    delta = delta_figure(rows, "omniglot / conv4", "cosine")
    zero = [line for line in delta.axes[0].get_lines() if list(line.get_ydata()) == [0.0, 0.0]]
    assert zero, "the difference plot draws its zero line"
    line = next(line for line in delta.axes[0].get_lines() if line.get_gid() == "best checkpoint")
    expected = [0.0 if e["margin"] == 0 else e["checkpoints"]["best"]["paired_vs_zero"]["5way-1shot"]["mean"]
                for e in metrics["aggregate"]]
    assert list(line.get_ydata()) == pytest.approx(expected)
    figure = discriminability_figure(rows, "omniglot / conv4", "cosine")
    assert len(figure.axes) == 2


def test_two_seeds_are_points_not_a_band():
    figure = accuracy_figure(margin_series(_metrics(seeds=(0, 1)), "omniglot", "conv4"), "t")
    ax = figure.axes[0]
    assert [c.get_gid() for c in ax.collections if c.get_gid()] == []  # no band
    assert any(len(c.get_offsets()) == 2 * len(MARGINS) for c in ax.collections)  # the seeds as points
    assert "points are the seeds, no band" in figure.get_suptitle()


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
    metrics = _metrics()
    plot_margins(metrics, "omniglot", "conv4", tmp_path / "a")
    plot_margins(metrics, "omniglot", "conv4", tmp_path / "b")
    for name in ("accuracy_vs_margin.svg", "accuracy_vs_margin.png", "margin_analysis.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

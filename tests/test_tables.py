"""Tests of negmargin.reporting.tables: run metrics, results tables, the summary, and their CLI verbs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from cli_helpers import one_line_error

from negmargin.cli import main
from negmargin.errors import UserError
from negmargin.reporting.metrics import collect_metrics, load_metrics
from negmargin.reporting.summary import render_summary
from negmargin.reporting.tables import parse_reference, render_table

T_975_DF1 = 12.706204736174698  # t_{0.975, 1}


def make_run(folder: Path, *, dataset="cub", arch="conv4", margin=-0.01, seed=0, novel=None, base=None,
             base_ratio=None, novel_ratio=None, temperature=10.0, image_size=84) -> Path:
    """A run folder in the real layout: train/train.json (+ log.csv, checkpoint), selection, meta-test
    and (when base numbers are given) analysis.json. ``novel`` maps shot -> (accuracy_mean, accuracy_ci95)."""
    novel = {1: (60.0, 0.5), 5: (78.0, 0.4)} if novel is None else novel
    train = folder / "train"
    train.mkdir(parents=True)
    config = {"dataset": dataset, "arch": arch, "metric": "cosine", "margin": margin, "temperature": temperature,
              "seed": seed, "epochs": 3, "batch_size": 64, "image_size": image_size, "num_classes": 100}
    (train / "train.json").write_text(json.dumps({
        "config": config,
        "best": {"1": {"epoch": 3, "val_accuracy": 55.5, "val_ci95": 1.1, "checkpoint": "best_1shot.pt"}},
        "final_epoch": 3, "history": [], "elapsed_s": 1.0,
    }))
    (train / "log.csv").write_text("epoch,loss\n1,2.0\n")
    (train / "best_1shot.pt").write_bytes(b"not a real checkpoint")
    for shot, (mean, ci) in novel.items():
        (folder / f"selected_{shot}shot.json").write_text(json.dumps({
            "checkpoint": str(train / "best_1shot.pt"), "shot": shot, "mode": "shared", "val_shot": 1,
            "epoch": 3, "val_accuracy": 55.5}))
        (folder / f"metatest_{shot}shot.json").write_text(json.dumps({
            "accuracy_mean": mean, "accuracy_ci95": ci, "episode_accuracies": [mean], "ways": 5, "shots": shot,
            "queries": 15, "episodes": 2000, "seed": 0, "finetune": {}, "features": "f.npz"}))
    if base is not None:
        (folder / "analysis.json").write_text(json.dumps({
            "base_accuracy": base, "base_accuracy_ci95": 0.7, "n_base": 400,
            "base_discriminability": {"inter": 1.0, "intra": 1.0 / base_ratio, "ratio": base_ratio},
            "novel_discriminability": {"inter": 1.0, "intra": 1.0 / novel_ratio, "ratio": novel_ratio}}))
    return folder


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    """A repository root as the working directory, with a small margin sweep of CUB runs."""
    monkeypatch.chdir(tmp_path)
    sweep = {  # margin -> per seed: (1-shot, 5-shot, base acc, base ratio, novel ratio)
        -0.1: [(62.0, 79.0, 70.0, 0.50, 0.40), (63.0, 80.0, 71.0, 0.52, 0.42)],
        0.0: [(60.0, 78.0, 75.0, 0.60, 0.35), (61.0, 77.0, 76.0, 0.62, 0.36)],
        0.1: [(57.0, 75.0, 80.0, 0.70, 0.30), (58.0, 74.0, 81.0, 0.71, 0.31)],
    }
    runs = []
    for margin, seeds in sweep.items():
        for seed, (one, five, base, base_ratio, novel_ratio) in enumerate(seeds):
            # the folder name deliberately disagrees with nothing it could be parsed from: identity is in train.json
            runs.append(make_run(Path("results") / "cub" / "conv4" / f"run{len(runs)}", margin=margin, seed=seed,
                                 novel={1: (one, 0.45), 5: (five, 0.35)}, base=base, base_ratio=base_ratio,
                                 novel_ratio=novel_ratio))
    return tmp_path, runs


# ------------------------------------------------------------------------------------------------- metrics


def test_collect_metrics_schema_and_identity(repo):
    _, runs = repo
    metrics = collect_metrics(runs)
    assert metrics["format"] == "negmargin-metrics/1"
    assert len(metrics["runs"]) == 6 and len(metrics["aggregate"]) == 3
    first = metrics["runs"][0]
    assert (first["dataset"], first["arch"], first["margin"], first["seed"]) == ("cub", "conv4", -0.1, 0)
    assert (first["temperature"], first["image_size"], first["batch_size"], first["ways"]) == (10.0, 84, 64, 5)
    assert first["shots"]["1"]["accuracy_mean"] == 62.0
    assert first["shots"]["1"]["episodes"] == 2000 and first["shots"]["1"]["episodes_seed"] == 0
    assert first["shots"]["1"]["checkpoint"] == "results/cub/conv4/run0/train/best_1shot.pt"
    assert first["train_log"] == "results/cub/conv4/run0/train/log.csv"
    assert first["base_accuracy"] == 70.0 and first["novel_discriminability"]["ratio"] == 0.40
    assert first["best_val"]["1"]["val_accuracy"] == 55.5


def test_collect_metrics_aggregate_is_a_student_t_interval(repo):
    _, runs = repo
    entry = collect_metrics(runs)["aggregate"][0]
    assert entry["margin"] == -0.1 and entry["seeds"] == [0, 1]
    # two seeds 62 and 63: mean 62.5, s = sqrt(0.5), ci = t_{.975,1} * s / sqrt(2) = 12.706 * 0.5
    assert entry["novel"]["1"]["mean"] == pytest.approx(62.5)
    assert entry["novel"]["1"]["ci95"] == pytest.approx(T_975_DF1 * math.sqrt(0.5) / math.sqrt(2))
    assert entry["base_accuracy"]["mean"] == pytest.approx(70.5)
    assert entry["base_discriminability"]["mean"] == pytest.approx(0.51)


def test_collect_metrics_accuracy_overview_is_the_aggregate_means(repo):
    """The `accuracy` mapping (what `dvc metrics show` prints) repeats every aggregate mean, keyed by name."""
    _, runs = repo
    metrics = collect_metrics(runs)
    for entry in metrics["aggregate"]:
        values = metrics["accuracy"][entry["dataset"]][entry["arch"]][f"m{entry['margin']}"]
        assert values["novel_1shot"] == entry["novel"]["1"]["mean"]
        assert values["base"] == entry["base_accuracy"]["mean"]
    assert metrics["accuracy"]["cub"]["conv4"]["m-0.1"]["novel_1shot"] == pytest.approx(62.5)


def test_collect_metrics_bad_input(repo, tmp_path):
    _, runs = repo
    with pytest.raises(UserError, match="no run folders"):
        collect_metrics([])
    with pytest.raises(UserError, match="same run"):
        collect_metrics([runs[0], runs[0]])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no train/train.json"):
        collect_metrics([empty])
    bad = make_run(tmp_path / "bad", seed=9)
    (bad / "metatest_1shot.json").write_text(json.dumps({"accuracy_mean": 1.0}))
    with pytest.raises(UserError, match="missing keys"):
        collect_metrics([bad])


def test_runs_without_analysis_have_null_base_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = collect_metrics([make_run(Path("r0"))])
    assert metrics["runs"][0]["base_accuracy"] is None and metrics["runs"][0]["analysis"] is None
    assert metrics["aggregate"][0]["base_accuracy"]["n"] == 0
    assert metrics["aggregate"][0]["novel"]["1"]["ci95"] is None  # one seed: no CI


# --------------------------------------------------------------------------------------------------- table


def _table_rows(text: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return header, rows


def test_render_table_columns_reference_note_and_links(repo):
    root, runs = repo
    metrics = collect_metrics(runs)
    out = Path("results/tables/cub.md")
    text = render_table(metrics, "cub", {("conv4", 1): 64.08}, out, margin=-0.1,
                        reference_source="mmfewshot neg_margin README")
    assert out.read_text() == text
    header, rows = _table_rows(text, "| Arch | Input Size")
    assert header == ["Arch", "Input Size", "Batch Size", "way", "shot", "mean Acc", "std", "ckpt", "log", "seed",
                      "reference", "Δ"]
    assert len(rows) == 4  # (1-shot, 5-shot) x 2 seeds at m = -0.1
    one_shot_seed0 = rows[0]
    assert one_shot_seed0[:7] == ["conv4", "84x84", "64", "5", "1", "62.00", "0.45"]
    assert one_shot_seed0[9:] == ["0", "64.08", "-2.08"]
    five_shot = next(row for row in rows if row[4] == "5")
    assert five_shot[10:] == ["–", "–"]  # no reference for 5-shot
    # links are relative to the table file and point at the real files
    for cell in one_shot_seed0[7:9]:
        target = re.fullmatch(r"\[(?:ckpt|log)\]\((.+)\)", cell).group(1)
        assert (root / "results/tables" / target).resolve().is_file()
    assert "1.96·std/√episodes" in text and "2000 per row" in text and "episode seed 0" in text
    assert "mmfewshot neg_margin README" in text
    assert "Numbers come from `results/metrics.json`" in text
    # mean over seeds, and the full sweep with every (margin, seed, shot)
    _, mean_rows = _table_rows(text, "| Arch | shot | seeds")
    assert mean_rows[0][:4] == ["conv4", "1", "2", "62.50"]
    _, sweep = _table_rows(text, "| Arch | margin | seed")
    assert {(row[1], row[2], row[4]) for row in sweep} == {
        (m, s, k) for m in ("-0.1", "0", "0.1") for s in ("0", "1") for k in ("1", "5")}


def test_render_table_bad_input(repo):
    _, runs = repo
    metrics = collect_metrics(runs)
    with pytest.raises(UserError, match="several margins"):
        render_table(metrics, "cub", {}, "t.md")
    with pytest.raises(UserError, match="no runs at margin 0.5"):
        render_table(metrics, "cub", {}, "t.md", margin=0.5)
    with pytest.raises(UserError, match="'mini' is not in the metrics"):
        render_table(metrics, "mini", {}, "t.md", margin=0.0)
    with pytest.raises(UserError, match="resnet12:1 matches no"):
        render_table(metrics, "cub", {("resnet12", 1): 78.54}, "t.md", margin=0.0)
    assert not Path("t.md").exists()


def test_parse_reference():
    assert parse_reference("conv4:1=64.08") == (("conv4", 1), 64.08)
    for bad in ("conv4=64", "conv4:one=64", ":1=64", "conv4:1="):
        with pytest.raises(UserError, match="ARCH:SHOT=ACC"):
            parse_reference(bad)


# ------------------------------------------------------------------------------------------------- summary


def test_summary_statements_follow_the_numbers(repo):
    _, runs = repo
    text = render_summary(collect_metrics(runs))
    assert "## cub / conv4" in text
    assert ("Does novel 1-shot accuracy peak at a negative margin? **Yes**: it peaks at m = -0.1 "
            "(negative, 62.50), +2.00 over m = 0; the seed CIs overlap.") in text
    assert "Does base accuracy rise with the margin? **Yes**, at every step (Spearman ρ = +1.00" in text
    assert "| -0.1 | 62.50 ± " in text


def test_summary_says_so_when_the_peak_is_positive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [make_run(Path(f"r{i}"), margin=m, novel={1: (acc, 0.4)}, base=base, base_ratio=0.5, novel_ratio=0.3)
            for i, (m, acc, base) in enumerate([(-0.1, 50.0, 80.0), (0.0, 52.0, 78.0), (0.1, 55.0, 70.0)])]
    text = render_summary(collect_metrics(runs))
    assert "peak at a negative margin? **No**: it peaks at m = 0.1 (positive, 55.00), +3.00 over m = 0" in text
    assert "no seed CI (one seed)" in text
    assert "Does base accuracy rise with the margin? **No**: it falls at every step" in text


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_metrics_table_summary(repo, capsys):
    _, runs = repo
    assert main(["metrics", "--runs", *map(str, runs), "--out", "results/metrics.json"]) == 0
    assert len(load_metrics("results/metrics.json")["runs"]) == 6
    assert main(["table", "--metrics", "results/metrics.json", "--dataset", "cub", "--margin", "-0.1",
                 "--reference", "conv4:1=64.08", "--reference", "conv4:5=80.69",
                 "--reference-source", "mmfewshot", "--out", "results/tables/cub.md"]) == 0
    assert "+" not in Path("results/tables/cub.md").read_text().split("| 80.69 |")[1].split("|")[0]
    assert main(["summary", "--metrics", "results/metrics.json", "--out", "results/summary.md"]) == 0
    assert "peak at a negative margin? **Yes**" in Path("results/summary.md").read_text()


def test_cli_bad_input_is_one_line(repo, capsys):
    _, runs = repo
    assert "no train/train.json" in one_line_error(capsys, ["metrics", "--runs", "results", "--out", "m.json"])
    assert "not found" in one_line_error(capsys, ["table", "--metrics", "nope.json", "--dataset", "cub",
                                                    "--out", "t.md"])
    main(["metrics", "--runs", *map(str, runs), "--out", "m.json"])
    capsys.readouterr()
    assert "not in the metrics" in one_line_error(capsys, ["table", "--metrics", "m.json", "--dataset", "mini",
                                                           "--out", "t.md"])
    assert "ARCH:SHOT=ACC" in one_line_error(capsys, ["table", "--metrics", "m.json", "--dataset", "cub",
                                                       "--margin", "0", "--reference", "conv4=1", "--out", "t.md"])
    Path("wrong.json").write_text(json.dumps({"runs": []}))
    assert "missing keys" in one_line_error(capsys, ["summary", "--metrics", "wrong.json", "--out", "s.md"])


def test_table_margin_per_arch(tmp_path, monkeypatch, capsys):
    """tiered-ImageNet's configs use one margin per backbone (conv4 -0.02, resnet12 -0.01)."""
    monkeypatch.chdir(tmp_path)
    runs = [make_run(Path("a"), dataset="tiered", arch="conv4", margin=-0.02, novel={1: (54.0, 0.5)}),
            make_run(Path("b"), dataset="tiered", arch="conv4", margin=-0.01, novel={1: (50.0, 0.5)}),
            make_run(Path("c"), dataset="tiered", arch="resnet12", margin=-0.01, novel={1: (66.0, 0.5)})]
    assert main(["metrics", "--runs", *map(str, runs), "--out", "m.json"]) == 0
    assert main(["table", "--metrics", "m.json", "--dataset", "tiered", "--margin=conv4=-0.02",
                 "--margin=resnet12=-0.01", "--reference", "conv4:1=54.07", "--out", "t.md"]) == 0
    text = Path("t.md").read_text()
    assert "## Margin m = conv4 -0.02, resnet12 -0.01" in text
    _, rows = _table_rows(text, "| Arch |")
    main_rows = [(row[0], row[5]) for row in rows[:2]]
    assert main_rows == [("conv4", "54.00"), ("resnet12", "66.00")]
    capsys.readouterr()
    assert "names arch 'wrn'" in one_line_error(capsys, ["table", "--metrics", "m.json", "--dataset", "tiered",
                                                         "--margin=wrn=-0.1", "--out", "t.md"])

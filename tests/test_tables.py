"""Tests of negmargin.reporting.tables: run metrics, results tables, the summary, and their CLI verbs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error
from result_folders import episodes, make_run

from negmargin.cli import main
from negmargin.errors import UserError
from negmargin.reporting.metrics import collect_metrics, load_metrics
from negmargin.reporting.summary import render_summary
from negmargin.reporting.tables import parse_reference, render_table

T_975_DF1 = 12.706204736174698  # t_{0.975, 1}
Z_95 = 1.959963984540054


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    """A repository root as the working directory, with a small margin sweep of CUB runs (2 seeds)."""
    monkeypatch.chdir(tmp_path)
    sweep = {  # margin -> per seed: (5-way 1-shot, 5-way 5-shot, base acc, base ratio, novel ratio)
        -0.1: [(62.0, 79.0, 70.0, 0.50, 0.40), (63.0, 80.0, 71.0, 0.52, 0.42)],
        0.0: [(60.0, 78.0, 75.0, 0.60, 0.35), (61.0, 77.0, 76.0, 0.62, 0.36)],
        0.1: [(57.0, 75.0, 80.0, 0.70, 0.30), (58.0, 74.0, 81.0, 0.71, 0.31)],
    }
    runs = []
    for margin, seeds in sweep.items():
        for seed, (one, five, base, base_ratio, novel_ratio) in enumerate(seeds):
            # the folder name deliberately says nothing: identity is in train.json
            runs.append(make_run(Path("results") / "cub" / "conv4" / f"run{len(runs)}", margin=margin, seed=seed,
                                 tasks={(5, 1): one, (5, 5): five}, base=base, base_ratio=base_ratio,
                                 novel_ratio=novel_ratio, picks=("best", "final")))
    return tmp_path, runs


# ------------------------------------------------------------------------------------------------- metrics


def test_collect_metrics_schema_and_identity(repo):
    _, runs = repo
    metrics = collect_metrics(runs)
    assert metrics["format"] == "negmargin-metrics/2"
    assert len(metrics["runs"]) == 6 and len(metrics["aggregate"]) == 3
    first = metrics["runs"][0]
    assert (first["dataset"], first["arch"], first["backbone"], first["margin"], first["seed"]) == (
        "cub", "conv4", "conv4", -0.1, 0)
    best = first["checkpoints"]["best"]
    task = best["tasks"]["5way-1shot"]
    assert task["accuracy_mean"] == pytest.approx(62.0) and task["episodes"] == 40 and task["episodes_seed"] == 0
    assert task["checkpoint"] == "results/cub/conv4/run0/train/best_1shot.pt" and task["epoch"] == 2
    assert first["checkpoints"]["final"]["tasks"]["5way-1shot"]["checkpoint"].endswith("train/last.pt")
    assert best["base_accuracy"] == 70.0 and best["novel_discriminability"]["ratio"] == 0.40
    assert first["best_val"]["1"]["val_accuracy"] == 55.5
    assert "history" not in first and "episode_accuracies" not in json.dumps(metrics)


def test_collect_metrics_aggregate_is_a_student_t_interval(repo):
    _, runs = repo
    entry = collect_metrics(runs)["aggregate"][0]
    assert entry["margin"] == -0.1 and entry["seeds"] == [0, 1]
    one = entry["checkpoints"]["best"]["tasks"]["5way-1shot"]
    # two seeds 62 and 63: mean 62.5, s = sqrt(0.5), ci = t_{.975,1} * s / sqrt(2)
    assert one["mean"] == pytest.approx(62.5) and one["values"] == pytest.approx([62.0, 63.0])
    assert one["ci95"] == pytest.approx(T_975_DF1 * math.sqrt(0.5) / math.sqrt(2))
    assert entry["checkpoints"]["best"]["base_accuracy"]["mean"] == pytest.approx(70.5)
    assert entry["checkpoints"]["final"]["tasks"]["5way-1shot"]["mean"] == pytest.approx(61.5)


def test_paired_difference_to_zero_is_measured_episode_by_episode(tmp_path, monkeypatch):
    """Per seed: mean and normal CI of the per-episode differences; pooled: t over the per-seed means."""
    monkeypatch.chdir(tmp_path)
    zero = {0: [50.0, 60.0, 70.0, 80.0], 1: [55.0, 65.0, 75.0, 85.0]}
    neg = {0: [52.0, 61.0, 73.0, 80.0], 1: [56.0, 67.0, 75.0, 86.0]}
    runs = [make_run(Path(f"r{m}{s}"), margin=m, seed=s, tasks={(5, 1): values[s]}, base_correct=[1, 1, 0, 0]
                     if m == 0 else [1, 1, 1, 0]) for m, values in ((0.0, zero), (-0.2, neg)) for s in (0, 1)]
    entry = next(e for e in collect_metrics(runs)["aggregate"] if e["margin"] == -0.2)
    paired = entry["checkpoints"]["best"]["paired_vs_zero"]["5way-1shot"]
    d0, d1 = np.array([2.0, 1.0, 3.0, 0.0]), np.array([1.0, 2.0, 0.0, 1.0])
    half0 = Z_95 * d0.std(ddof=1) / 2
    assert paired["per_seed"][0] == pytest.approx({"seed": 0, "mean": 1.5, "ci95_low": 1.5 - half0,
                                                   "ci95_high": 1.5 + half0, "n": 4})
    means = np.array([d0.mean(), d1.mean()])
    half = T_975_DF1 * means.std(ddof=1) / math.sqrt(2)
    assert (paired["mean"], paired["ci95_low"], paired["ci95_high"]) == pytest.approx(
        (means.mean(), means.mean() - half, means.mean() + half))
    assert (paired["n_seeds"], paired["n_episodes"]) == (2, 4)
    base = entry["checkpoints"]["best"]["paired_vs_zero"]["base"]
    assert base["mean"] == pytest.approx(25.0)  # one more of 4 images right, in both seeds
    assert "paired_vs_zero" not in next(e for e in collect_metrics(runs)["aggregate"] if e["margin"] == 0.0)[
        "checkpoints"]["best"]


def test_pairs_need_the_same_episodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [make_run(Path("a"), margin=0.0, tasks={(5, 1): [50.0, 60.0]}),
            make_run(Path("b"), margin=-0.1, tasks={(5, 1): [50.0, 60.0, 70.0]})]
    with pytest.raises(UserError, match="ran on different episodes"):
        collect_metrics(runs)


def test_collect_metrics_accuracy_overview_is_the_aggregate_means(repo):
    """The `accuracy` mapping (what `dvc metrics show` prints) repeats every aggregate mean, keyed by name."""
    _, runs = repo
    metrics = collect_metrics(runs)
    for entry in metrics["aggregate"]:
        values = metrics["accuracy"][entry["dataset"]][entry["arch"]][f"m{entry['margin']}"]
        assert values["best_5way-1shot"] == entry["checkpoints"]["best"]["tasks"]["5way-1shot"]["mean"]
        assert values["best_base"] == entry["checkpoints"]["best"]["base_accuracy"]["mean"]
    assert metrics["accuracy"]["cub"]["conv4"]["m-0.1"]["final_5way-1shot"] == pytest.approx(61.5)


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
    (bad / "best" / "metatest_5way_1shot.json").write_text(json.dumps({"accuracy_mean": 1.0}))
    with pytest.raises(UserError, match="missing keys"):
        collect_metrics([bad])


def test_runs_without_analysis_have_null_base_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = collect_metrics([make_run(Path("r0"))])
    best = metrics["runs"][0]["checkpoints"]["best"]
    assert best["base_accuracy"] is None and best["analysis"] is None
    aggregate = metrics["aggregate"][0]["checkpoints"]["best"]
    assert aggregate["base_accuracy"]["n"] == 0 and aggregate["tasks"]["5way-1shot"]["ci95"] is None  # one seed


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
    Path("results/train_logs.csv").write_text("dataset,arch\n")
    out = Path("results/tables/cub.md")
    text = render_table(metrics, "cub", {("conv4", 1): 64.08}, out, margin=-0.1,
                        reference_source="mmfewshot neg_margin README", train_logs="results/train_logs.csv")
    assert out.read_text() == text
    header, rows = _table_rows(text, "| Arch | Head")
    assert header == ["Arch", "Head", "Input Size", "Batch Size", "way", "shot", "mean Acc", "std", "ckpt", "log",
                      "seed", "final Acc", "reference", "Δ"]
    assert len(rows) == 4  # (1-shot, 5-shot) x 2 seeds at m = -0.1
    one_shot_seed0 = rows[0]
    assert one_shot_seed0[:8] == ["conv4", "cosine, T=10", "84x84", "64", "5", "1", "62.00", "0.40"]
    assert one_shot_seed0[8] == "best_1shot.pt (epoch 2)"  # named, not linked: checkpoints live in DVC
    assert one_shot_seed0[10:] == ["0", "61.00", "64.08", "-2.08"]
    five_shot = next(row for row in rows if row[5] == "5")
    assert five_shot[12:] == ["–", "–"]  # no reference for 5-shot
    target = re.fullmatch(r"\[log\]\((.+)\)", one_shot_seed0[9]).group(1)
    assert (root / "results/tables" / target).resolve() == (root / "results/train_logs.csv").resolve()
    assert "1.96·std/√episodes" in text and "40 per row" in text and "episode seed 0" in text
    assert "mmfewshot neg_margin README" in text and "`dvc pull`" in text
    # mean over seeds: two seeds are listed, not given a t-interval
    _, mean_rows = _table_rows(text, "| Arch | way | shot | seeds")
    assert mean_rows[0][:5] == ["conv4", "5", "1", "2", "62.50 (seeds: 62.00, 63.00)"]
    assert "±" not in "".join(row[4] for row in mean_rows)
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


def test_summary_statements_follow_the_paired_differences(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = []
    for seed in (0, 1, 2):
        for margin, shift, base in ((-0.2, 3.0, 60.0), (0.0, 0.0, 70.0), (0.2, -0.1, 75.0)):
            tasks = {(5, 1): [v + shift + seed for v in episodes(70.0, seed=seed)]}
            runs.append(make_run(Path(f"r{margin}{seed}"), margin=margin, seed=seed, tasks=tasks, base=base))
    text = render_summary(collect_metrics(runs))
    assert "## cub / conv4 (cosine head, T = 10): best-validation checkpoint (the paper's rule)" in text
    assert ("- Does novel 5-way 1-shot accuracy peak at a negative margin? **Yes**: the highest mean is at "
            "m = -0.2, higher than m = 0 by +3.00 [+3.00, +3.00] points.") in text
    assert "Does base accuracy rise with the margin? **Yes** (Spearman ρ = +1.00" in text
    assert "at m = -0.2 lower than m = 0 by -10.00" in text
    assert "| 0.2 | -0.10 [-0.10, -0.10] * |" in text  # a tiny but consistent difference is detectable
    assert "± " in text and "(n=3)" in text


def test_summary_says_not_resolved_when_the_interval_holds_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = []
    for seed, shifts in enumerate(((1.0, 0.0), (-0.5, 0.0))):
        for margin, shift in zip((-0.1, 0.0), shifts, strict=True):
            runs.append(make_run(Path(f"r{margin}{seed}"), margin=margin, seed=seed,
                                 tasks={(5, 1): [v + shift for v in episodes(60.0)]}))
    text = render_summary(collect_metrics(runs))
    assert "peak at a negative margin? **Not resolved**: the highest mean is at m = -0.1, but it shows no " \
           "detectable difference (+0.25 [" in text
    assert "60.25 (seeds: 61.00, 59.50)" in text  # two seeds: their values, no t-interval


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_metrics_table_summary(repo, capsys):
    _, runs = repo
    assert main(["metrics", "--runs", *map(str, runs), "--out", "results/metrics.json",
                 "--train-logs", "results/train_logs.csv"]) == 0
    assert len(load_metrics("results/metrics.json")["runs"]) == 6
    logs = Path("results/train_logs.csv").read_text().splitlines()
    assert logs[0].startswith("dataset,arch,margin,seed,epoch") and len(logs) == 1 + 6 * 3
    assert main(["table", "--metrics", "results/metrics.json", "--dataset", "cub", "--margin", "-0.1",
                 "--reference", "conv4:1=64.08", "--reference", "conv4:5=80.69",
                 "--reference-source", "mmfewshot", "--out", "results/tables/cub.md"]) == 0
    assert "+" not in Path("results/tables/cub.md").read_text().split("| 80.69 |")[1].split("|")[0]
    assert main(["summary", "--metrics", "results/metrics.json", "--out", "results/summary.md"]) == 0
    assert "peak at a negative margin? **Not resolved**" in Path("results/summary.md").read_text()


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
    runs = [make_run(Path("a"), dataset="tiered", arch="conv4", margin=-0.02, tasks={(5, 1): 54.0}),
            make_run(Path("b"), dataset="tiered", arch="conv4", margin=-0.01, tasks={(5, 1): 50.0}),
            make_run(Path("c"), dataset="tiered", arch="resnet12", margin=-0.01, tasks={(5, 1): 66.0})]
    assert main(["metrics", "--runs", *map(str, runs), "--out", "m.json"]) == 0
    assert main(["table", "--metrics", "m.json", "--dataset", "tiered", "--margin=conv4=-0.02",
                 "--margin=resnet12=-0.01", "--reference", "conv4:1=54.07", "--out", "t.md"]) == 0
    text = Path("t.md").read_text()
    assert "## Margin m = conv4 -0.02, resnet12 -0.01" in text
    _, rows = _table_rows(text, "| Arch |")
    main_rows = [(row[0], row[6]) for row in rows[:2]]
    assert main_rows == [("conv4", "54.00"), ("resnet12", "66.00")]
    capsys.readouterr()
    assert "names arch 'wrn'" in one_line_error(capsys, ["table", "--metrics", "m.json", "--dataset", "tiered",
                                                         "--margin=wrn=-0.1", "--out", "t.md"])

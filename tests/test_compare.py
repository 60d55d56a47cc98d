"""negmargin.reporting.compare: CI's check that regenerated results equal the committed ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from result_folders import make_run

from negmargin.reporting.compare import Mismatch, compare_results, main
from negmargin.reporting.metrics import write_metrics
from negmargin.reporting.summary import write_summary
from negmargin.reporting.tables import render_table


@pytest.fixture()
def committed(tmp_path, monkeypatch):
    """A results folder as the workflow writes it: metrics.json, train_logs.csv, a table and the summary."""
    monkeypatch.chdir(tmp_path)
    runs = [make_run(Path("results") / "cub" / "conv4" / f"m{m}s{s}", margin=m, seed=s, base=70.0 + 10 * m)
            for m in (-0.1, 0.0) for s in (0, 1)]
    metrics = write_metrics(runs, "results/metrics.json", train_logs="results/train_logs.csv")
    render_table(metrics, "cub", {}, "results/tables/cub.md", margin=-0.1, train_logs="results/train_logs.csv")
    write_summary(metrics, "results/summary.md")
    shutil.copytree("results", "fresh")
    return tmp_path


def test_identical_results_pass_and_timings_are_ignored(committed, capsys):
    metrics = json.loads(Path("fresh/metrics.json").read_text())
    metrics["elapsed_s"] = 123.4
    Path("fresh/metrics.json").write_text(json.dumps(metrics))
    assert compare_results("results", "fresh") == 4
    assert main(["results", "fresh"]) == 0
    assert "4 result files equal the committed ones" in capsys.readouterr().out


def test_a_number_edited_by_hand_fails_and_is_named(committed, capsys):
    path = Path("results/metrics.json")
    text = path.read_text()
    edited = text.replace('"accuracy_mean": 60.0', '"accuracy_mean": 60.01', 1)
    assert edited != text
    path.write_text(edited)
    with pytest.raises(Mismatch, match=r"metrics.json.runs\[0\].checkpoints.best.tasks.5way-1shot.accuracy_mean: "
                                       r"60.01 committed, 60.0 regenerated"):
        compare_results("results", "fresh")
    assert main(["results", "fresh"]) == 1
    assert "accuracy_mean" in capsys.readouterr().err


def test_an_edited_table_number_is_named_with_its_line(committed):
    table = Path("results/tables/cub.md")
    lines = table.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("| conv4 | cosine"))
    lines[row] = lines[row].replace("| 60.00 |", "| 61.00 |", 1)
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(Mismatch, match=rf"tables/cub.md:{row + 1}: 61.00 committed, 60.00 regenerated"):
        compare_results("results", "fresh")
    assert compare_results("results", "fresh", tolerance=1.5) == 4


def test_a_file_on_one_side_only_fails(committed):
    Path("fresh/summary.md").unlink()
    with pytest.raises(Mismatch, match="summary.md: not regenerated"):
        compare_results("results", "fresh")


def _set_environment(path: str, **changes) -> None:
    metrics = json.loads(Path(path).read_text())
    metrics["environment"] = {**metrics["environment"], **changes}
    Path(path).write_text(json.dumps(metrics))


def test_metrics_record_the_environment_the_numbers_hold_in(committed):
    import torch

    environment = json.loads(Path("results/metrics.json").read_text())["environment"]
    assert environment["torch"] == torch.__version__
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_another_environment_compares_the_structure_only_and_says_so(committed, capsys):
    _set_environment("results/metrics.json", cpu_capability="AVX2-elsewhere")
    path = Path("fresh/metrics.json")
    path.write_text(path.read_text().replace('"accuracy_mean": 60.0', '"accuracy_mean": 61.5', 1))
    assert main(["results", "fresh"]) == 0
    captured = capsys.readouterr()
    assert "another environment" in captured.err and "AVX2-elsewhere" in captured.err
    assert "numbers not compared" in captured.out
    # --strict compares the numbers all the same
    assert main(["results", "fresh", "--strict"]) == 1
    # a missing run is still a failure in the other environment
    metrics = json.loads(path.read_text())
    metrics["runs"].pop()
    path.write_text(json.dumps(metrics))
    assert main(["results", "fresh"]) == 1


def test_within_one_environment_an_edited_number_still_fails(committed):
    _set_environment("results/metrics.json", torch="same")
    _set_environment("fresh/metrics.json", torch="same")
    path = Path("fresh/metrics.json")
    path.write_text(path.read_text().replace('"accuracy_mean": 60.0', '"accuracy_mean": 61.5', 1))
    assert main(["results", "fresh"]) == 1

"""The Snakemake workflow: lint, formatting, dry runs of the default and paper configurations, DVC files,
and an end-to-end run of the real Snakefile on .test/config.yaml in a copy of the repository.

The end-to-end run takes a few minutes on 2 CPU cores; it runs once per session (the `e2e` fixture in
conftest.py, shared with tests/test_dvc.py and tests/test_slurm.py) and the tests after it read its outputs.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_helpers import (
    copy_workflow,
    expected_jobs,
    grid,
    job_counts,
    job_env,
    merged_config,
    read_markdown_tables,
    snakemake,
    tool,
)

pytestmark = pytest.mark.slow  # a system test: the real workflow (tests in tiers, pyproject.toml)

REPO = Path(__file__).resolve().parents[1]
REPORTING_RULES = {"metrics", "table", "plot_margins", "plot_tsne", "summary", "all"}


# ------------------------------------------------------------------------------------------------ helpers


def margin_label(value: float) -> str:
    label = f"{float(value) + 0.0:.6f}".rstrip("0")
    return f"{label}0" if label.endswith(".") else label


@pytest.fixture(scope="module")
def dry_copy(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("dry") / "repo")


# ------------------------------------------------------------------------------------ lint and formatting


def test_snakemake_lint_has_no_findings():
    result = snakemake("--lint", cwd=REPO, check=False)
    output = result.stdout + result.stderr
    findings = re.findall(r"(?m)^Lints for .*$|^\s+\* (.*):$", output)
    assert result.returncode == 0 and "Congratulations" in output and not findings, output


def test_snakefmt_check():
    snakefmt = shutil.which("snakefmt", path=str(Path(sys.executable).parent)) or shutil.which("snakefmt")
    if snakefmt is None:
        pytest.skip("snakefmt is not installed (pip install snakefmt)")
    result = subprocess.run(
        [snakefmt, "--check", "Snakefile", "workflow"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- dry runs


# --------------------------------------------------------------------------------- the workflow profile


def test_the_default_profile_is_loaded_and_a_failed_jobs_log_reaches_the_console(tmp_path):
    """`snakemake --cores all`, exactly as the README types it, in a copy whose Omniglot archive is damaged:
    Snakemake reads profiles/default by itself, and its show-failed-logs prints the failed job's log - the
    verb's one-line error - on the console instead of leaving it in logs/."""
    repo = copy_workflow(tmp_path / "repo")
    (repo / "resources" / "omniglot" / "omniglot_105.npz").write_bytes(b"not the Omniglot archive")
    result = subprocess.run(["snakemake", "--cores", "all"], cwd=repo, env=job_env(), capture_output=True,
                            text=True, timeout=600)
    console = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Using workflow specific profile profiles/default for setting default command line arguments" in console
    assert re.search(r"negmargin prepare: error: resources/omniglot/omniglot_105\.npz: sha256 is [0-9a-f]{64}, "
                     r"expected 5e8688706581db95", console), console[-3000:]


def test_what_to_download_for_mini_imagenet_reaches_the_console(dry_copy):
    """The guidance for a missing ImageNet source used to sit in logs/prepare/mini_imagenet.log only."""
    result = snakemake("--cores", "1", "--configfile=config/paper.yaml", "data/mini_imagenet/prepared.json",
                       cwd=dry_copy, check=False)
    assert result.returncode != 0
    assert "negmargin prepare: error: no mini-ImageNet source configured (datasets.mini_imagenet.prepare.source)" \
        in result.stdout + result.stderr


def test_offline_cub_preparation_under_snakemake_fails_fast_and_says_where_the_archive_goes(dry_copy, tmp_path):
    """As `negmargin prepare cub` offline (tests/test_prepare_cub.py), through the rule: the default retries
    wait 7.5 s per URL in all, and the console shows the line that says where to put the archive by hand."""
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: a refused connection, as with no route
    overlay = tmp_path / "offline.yaml"
    overlay.write_text(yaml.safe_dump({"run_datasets": ["cub"], "datasets": {"cub": {"prepare": {
        "source": f"http://127.0.0.1:{port}/records/x/files/CUB_200_2011.tgz?download=1",
        "mirrors": ["http://cub.invalid/CUB-200-2011/CUB_200_2011.tgz"], "options": {"fixture": True}}}}}))
    started = time.monotonic()
    result = snakemake("data/cub/prepared.json", "--cores", "1", "--configfile", "config/paper.yaml",
                       str(overlay), cwd=dry_copy, check=False)
    elapsed = time.monotonic() - started
    console = result.stdout + result.stderr
    assert result.returncode != 0
    assert ("negmargin prepare: error: cannot download CUB_200_2011.tgz for cub; without a network here, download "
            f"http://127.0.0.1:{port}/") in console
    assert "put it at data/raw/CUB_200_2011.tgz, or set datasets.cub.prepare.source (--source)" in console
    waits = sum(float(s) for s in re.findall(r"retrying in ([0-9.]+)s", console))
    assert waits <= 2 * 7.5, waits
    print(f"offline CUB under Snakemake: failed after {elapsed:.1f} s (Snakemake start included)")


def test_the_reports_landing_page_says_what_ran_and_with_which_config(tmp_path):
    """`snakemake --report`'s first page: the workflow, the grid that ran, and the merged configuration. A
    report of the prepare step alone is enough to render it (the landing page used to be empty)."""
    repo = copy_workflow(tmp_path / "repo")
    snakemake("--cores", "1", "--configfile=.test/config.yaml", "data/omniglot/prepared.json", cwd=repo)
    snakemake("--report", "report.html", "--configfile=.test/config.yaml", "data/omniglot/prepared.json",
              cwd=repo)
    page = " ".join((repo / "report.html").read_text().replace("\\n", " ").split())  # the page's text, one line
    assert "Negative Margin Matters, reproduced" in page and "What was run" in page
    assert "<strong>omniglot</strong>: backbones conv4; margins -0.2, 0.0, 0.2; training seeds 0; epochs conv4 1" \
        in page
    assert "5 and 10-way episodes with 1 and 5 shot(s) and 15 queries per class, 20 episodes" in page
    assert "With which configuration" in page and "&quot;max_classes&quot;: 100" in page


def test_dry_run_of_the_default_config(dry_copy):
    result = snakemake("-n", cwd=dry_copy)
    config = merged_config(dry_copy / "config" / "config.yaml")
    assert job_counts(result.stdout) == expected_jobs(config)
    omniglot = config["datasets"]["omniglot"]
    assert len(grid(config)) == len(omniglot["archs"]) * len(omniglot["margins"]) * len(omniglot["seeds"])
    assert min(omniglot["margins"]) < 0 < max(omniglot["margins"]) and len(omniglot["seeds"]) >= 2
    assert "gpu=" not in result.stdout  # a CPU run requests no GPU resource at all


def test_dry_run_of_the_paper_config(dry_copy):
    result = snakemake("-n", "-p", "--configfile", "config/paper.yaml", cwd=dry_copy)
    config = merged_config(dry_copy / "config" / "config.yaml", dry_copy / "config" / "paper.yaml")
    counts = job_counts(result.stdout)
    assert counts == expected_jobs(config)
    assert (
        counts["train"] == 6
    )  # {cub, mini_imagenet, tiered_imagenet} x {conv4, resnet12} x 1 margin x 1 seed
    # mmfewshot's hyper-parameters reach the command line, and training asks for a GPU
    train_commands = re.findall(r"python -m negmargin train .*", result.stdout)
    assert len(train_commands) == 6
    tiered_conv4 = next(c for c in train_commands if re.search(r"data/tiered_imagenet .*--arch conv4 ", c))
    for flag in (
        "--margin=-0.02",
        "--num-classes 351",
        "--epochs 100",
        "--lr-steps 30 60",
        "--warmup-iters 5000",
        "--warmup-ratio 0.25",
        "--lr 0.05",
        "--momentum 0.9",
        "--weight-decay 0.0001",
        "--batch-size 64",
        "--temperature 10.0",
        "--val-every 5",
        "--val-episodes 100",
        "--val-shots 1",
        "--device cuda",
    ):
        assert flag in tiered_conv4, (flag, tiered_conv4)
    mini = next(c for c in train_commands if re.search(r"data/mini_imagenet .*--arch resnet12 ", c))
    assert "--num-classes 100" in mini and "--margin=-0.005" in mini and "--lr-steps 60 120" in mini
    gpu_jobs = re.findall(r"(?m)^\s+resources:.*\bgpu=1\b", result.stdout)
    assert len(gpu_jobs) == counts["train"] + counts["features"]
    cub = re.search(r"python -m negmargin prepare cub .*", result.stdout).group(0)
    assert "--source" not in cub  # the verb takes the registry's official archive, md5 and size
    tiered = re.search(r"python -m negmargin prepare tiered-imagenet .*", result.stdout).group(0)
    assert "--source" not in tiered and "--md5" not in tiered
    # mini-ImageNet has no source until the user sets one: the job would stop with a message naming the key
    assert "datasets.mini_imagenet.prepare.source is not set" in result.stderr


def test_dry_run_with_per_shot_selection(dry_copy):
    result = snakemake("-n", "-p", "--config", "selection_mode=per-shot", cwd=dry_copy)
    config = merged_config(dry_copy / "config" / "config.yaml")
    assert job_counts(result.stdout) == expected_jobs(config, mode="per-shot")
    assert "--val-shots 1 5" in result.stdout
    assert "best/features/5shot_novel.npz" in result.stdout


def test_an_invalid_config_is_rejected(dry_copy, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  omniglot:\n    margins: [-0.1, oops]\n")
    result = snakemake("-n", "--configfile", str(bad), cwd=dry_copy, check=False)
    assert result.returncode != 0 and "oops" in result.stdout + result.stderr


# -------------------------------------------------------------------------------------------------- DVC


def test_dvc_files_parse():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stage = dvc_yaml["stages"]["workflow"]
    assert stage["cmd"].startswith("snakemake")
    assert {"Snakefile", "workflow", "src", "resources"} <= set(stage["deps"])
    # params come from the config itself, every key but the scheduler's `resources`
    (params,) = stage["params"]
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert set(params["config/config.yaml"]) == set(config) - {"resources"}
    outs = {next(iter(entry)): next(iter(entry.values())) for entry in stage["outs"] + stage["metrics"]}
    assert all(options.get("persist") is True for options in outs.values())  # DVC never deletes them
    assert {path for path, options in outs.items() if options.get("cache") is False} == {
        "results/tables", "results/summary.md", "results/plots", "results/metrics.json", "results/train_logs.csv"}
    assert [next(iter(entry)) for entry in stage["metrics"]] == ["results/metrics.json"]
    study = dvc_yaml["stages"]["study"]
    assert study["cmd"] == "snakemake --cores all --configfile=config/study.yaml"
    study_outs = [next(iter(entry)) for entry in study["outs"] + study["metrics"]]
    assert all(path.startswith("results/study/") for path in study_outs)  # never one of the default's
    sweeps = [next(iter(entry.values())) for entry in dvc_yaml["plots"] if isinstance(entry, dict)]
    assert sweeps[0]["x"] == "margin" and list(sweeps[0]["y"]) == ["results/plots/omniglot/conv4/margin_sweep.csv"]
    data = yaml.safe_load((REPO / "data.dvc").read_text())
    (out,) = data["outs"]
    assert out["path"] == "data" and re.fullmatch(r"[0-9a-f]{32}\.dir", out["md5"])


def test_dvc_repro_dry_run(tmp_path):
    dvc = tool("dvc")
    repo = copy_workflow(tmp_path / "repo")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=repo, check=True, env=job_env())
    result = subprocess.run([dvc, "repro", "--dry"], cwd=repo, capture_output=True, text=True, env=job_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "snakemake --cores all" in result.stdout


def test_data_dvc_pins_the_prepared_default_data(tmp_path):
    """data.dvc holds the hash of what the default configuration's prepare step writes, byte for byte."""
    dvc = tool("dvc")
    repo = copy_workflow(tmp_path / "repo")
    snakemake("--cores", "1", "data/omniglot/prepared.json", cwd=repo)
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=repo, check=True, env=job_env())
    subprocess.run([dvc, "add", "-q", "data"], cwd=repo, check=True, env=job_env())
    ours = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    pinned = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert ours["md5"] == pinned["md5"], "preparation changed: regenerate data.dvc (see docs/workflow.md)"


# --------------------------------------------------------------------------------- end-to-end (.test run)


# The `e2e` fixture (conftest.py) is this run; tests/test_dvc.py and tests/test_slurm.py compare theirs with it.


def test_e2e_outputs_exist(e2e):
    config = merged_config(e2e / "config" / "config.yaml", e2e / ".test" / "config.yaml")
    for dataset, arch, margin, seed in grid(config):
        run = e2e / "results" / dataset / arch / f"m{margin_label(margin)}" / f"s{seed}"
        names = ["train/train.json"]
        for pick in ("best", "final"):  # .test meta-tests both checkpoints, 5- and 10-way
            names += [f"{pick}/selected_1shot.json", f"{pick}/selected_5shot.json", f"{pick}/analysis.json",
                      f"{pick}/features/1shot_novel.npz", f"{pick}/features/1shot_base_holdout.npz"]
            names += [f"{pick}/metatest_{w}way_{k}shot.json" for w in (5, 10) for k in (1, 5)]
        for name in names:
            assert (run / name).is_file(), run / name
        assert not (run / "best" / "features" / "5shot_novel.npz").exists(), "shared selection extracts once"
    plots = e2e / "results" / "plots" / "omniglot" / "conv4"
    for name in ["delta_vs_margin", "accuracy_vs_margin", "discriminability_vs_margin", "tsne_novel"]:
        for ext in ("png", "svg"):
            assert (plots / f"{name}.{ext}").stat().st_size > 1000
    assert (e2e / "results" / "summary.md").read_text().strip()
    assert (e2e / "results" / "train_logs.csv").read_text().startswith("dataset,arch,margin,seed,epoch")
    for family in ("prepare", "train", "select", "features", "metatest", "analyze", "report"):
        assert list((e2e / "logs" / family).rglob("*.log")), family
        assert list((e2e / "logs" / "benchmarks" / family).rglob("*.tsv")), family


def test_e2e_table_holds_the_metrics(e2e):
    metrics = json.loads((e2e / "results" / "metrics.json").read_text())
    runs = {(r["arch"], r["margin"], r["seed"]): r for r in metrics["runs"] if r["dataset"] == "omniglot"}
    headline, *rest = read_markdown_tables(e2e / "results" / "tables" / "omniglot.md")
    sweep = rest[-1]
    table_margin = yaml.safe_load((e2e / ".test" / "config.yaml").read_text())["datasets"]["omniglot"][
        "table_margin"
    ]

    assert len(headline) == 4  # conv4 x {5, 10} ways x {1, 5} shots x 1 seed at the table margin
    for row in headline:
        run = runs[(row["Arch"], float(table_margin), int(row["seed"]))]
        name = f"best/metatest_{row['way']}way_{row['shot']}shot.json"
        metatest = json.loads((e2e / run["run_dir"] / name).read_text())
        assert float(row["mean Acc"]) == pytest.approx(metatest["accuracy_mean"], abs=0.006)
        assert float(row["std"]) == pytest.approx(metatest["accuracy_ci95"], abs=0.006)
        final = json.loads((e2e / run["run_dir"] / name.replace("best/", "final/")).read_text())
        assert float(row["final Acc"]) == pytest.approx(final["accuracy_mean"], abs=0.006)

    assert len(sweep) == len(runs) * 4
    for row in sweep:
        run = runs[(row["Arch"], float(row["margin"]), int(row["seed"]))]
        metatest = json.loads((e2e / run["run_dir"] / f"best/metatest_{row['way']}way_{row['shot']}shot.json")
                              .read_text())
        assert float(row["mean Acc"]) == pytest.approx(metatest["accuracy_mean"], abs=0.006)
        assert metatest["episodes"] == 20 and metatest["ways"] == int(row["way"])
        assert metatest["shots"] == int(row["shot"])
        analysis = json.loads((e2e / run["run_dir"] / "best" / "analysis.json").read_text())
        assert float(row["base Acc"]) == pytest.approx(analysis["base_accuracy"], abs=0.006)


def test_e2e_plot_data_holds_the_metrics(e2e):
    metrics = json.loads((e2e / "results" / "metrics.json").read_text())
    aggregate = {
        entry["margin"]: entry
        for entry in metrics["aggregate"]
        if entry["dataset"] == "omniglot" and entry["arch"] == "conv4"
    }
    with open(e2e / "results" / "plots" / "omniglot" / "conv4" / "margin_analysis.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    novel = [row for row in rows if row["quantity"].startswith("novel") and "shot" in row["quantity"]]
    assert {float(row["margin"]) for row in novel} == set(aggregate)
    for row in novel:
        ways, shots = re.search(r"(\d+)-way (\d+)-shot", row["quantity"]).groups()
        numbers = aggregate[float(row["margin"])]["checkpoints"][row["checkpoint"]]
        assert math.isclose(float(row["mean"]), numbers["tasks"][f"{ways}way-{shots}shot"]["mean"], abs_tol=1e-9)
    with open(e2e / "results" / "plots" / "omniglot" / "conv4" / "tsne.csv", newline="") as f:
        panels = {float(row["margin"]) for row in csv.DictReader(f)}
    assert panels == {-0.2, 0.0, 0.2}  # most negative, zero, most positive


def test_e2e_nothing_left_to_do(e2e):
    result = snakemake("-n", "--configfile", ".test/config.yaml", cwd=e2e)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_e2e_reporting_changes_rerun_only_reporting(e2e, tmp_path):
    overlay = tmp_path / "reporting.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "tsne": {"seed": 1},
                "datasets": {
                    "omniglot": {
                        "table_margin": -0.2,
                        "references": {"source": "test", "accuracy": {"conv4": {1: 50.0}}},
                    }
                },
            }
        )
    )
    result = snakemake("-n", "--configfile", ".test/config.yaml", str(overlay), cwd=e2e)
    assert set(job_counts(result.stdout)) == {"table", "plot_tsne", "all"}


def test_e2e_editing_a_report_rule_reruns_only_that_rule(e2e):
    rules = e2e / "workflow" / "rules" / "report.smk"
    original = rules.read_text()
    edited = original.replace(
        '--train-logs {input.train_logs} --out {output.table}',
        '--train-logs {input.train_logs} --root . --out {output.table}',
    )
    assert edited != original
    rules.write_text(edited)
    try:
        result = snakemake("-n", "--configfile", ".test/config.yaml", cwd=e2e)
    finally:
        rules.write_text(original)
    assert set(job_counts(result.stdout)) == {"table", "all"}


def test_e2e_training_changes_retrain(e2e, tmp_path):
    """The converse: a training hyper-parameter is a param of `train`, so changing it retrains."""
    overlay = tmp_path / "train.yaml"
    overlay.write_text(yaml.safe_dump({"datasets": {"omniglot": {"train": {"conv4": {"epochs": 2}}}}}))
    result = snakemake("-n", "--configfile", ".test/config.yaml", str(overlay), cwd=e2e)
    assert job_counts(result.stdout)["train"] == 3


def test_e2e_report_renders_every_table_and_figure(e2e):
    snakemake("--report", "results/report.html", "--configfile", ".test/config.yaml", cwd=e2e)
    html = (e2e / "results" / "report.html").read_text()
    for caption in (
        "Results table of",
        "Accuracy against the training margin",
        "Feature discriminability",
        "t-SNE of novel-class backbone features",
        "Summary of the margin sweep",
    ):
        assert caption in html, caption

"""DVC over the Snakemake workflow, as a user runs it, in temporary git repositories on the tiny config.

One module fixture builds a git repository from this checkout (config/config.yaml replaced by the tiny
configuration, which is what `dvc repro` reads) and runs `dvc repro` in it twice. The tests then push to
the default remote (a folder beside the clone), pull into a second clone, run an experiment, and show
metrics and plots. The run is compared with the plain `snakemake` run of the same configuration
(the `e2e` fixture in conftest.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from workflow_helpers import job_env, merged_config, snakemake, tool

pytestmark = pytest.mark.slow  # a system test: the real workflow (tests in tiers, pyproject.toml)

REPO = Path(__file__).resolve().parents[1]
RUN = Path("results/omniglot/conv4/m0.0/s0")


def env() -> dict[str, str]:
    out = job_env()
    out.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    return out


def run(*args: str, cwd: Path, timeout: float = 1200) -> str:
    result = subprocess.run(list(args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{output[-5000:]}"
    return output


def dvc(*args: str, cwd: Path) -> str:
    return run(tool("dvc"), *args, cwd=cwd)


def git(*args: str, cwd: Path) -> str:
    return run(tool("git"), *args, cwd=cwd)


def make_project(dest: Path) -> Path:
    """This checkout's files as git sees them (tracked and new, not ignored), without the committed default
    results, in a new git repository whose config/config.yaml is the tiny configuration."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        source = REPO / rel
        if not source.is_file() or (rel.startswith("results/") and rel != "results/.gitignore"):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / rel)
    tiny = merged_config(REPO / "config" / "config.yaml", REPO / ".test" / "config.yaml")
    (dest / "config" / "config.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    # Without the study stage (100 minutes of CPU, and its committed results are left out above): the tests
    # are about the workflow stage, which a clone without the study's cache can reproduce and pull alone.
    stages = yaml.safe_load((dest / "dvc.yaml").read_text())
    del stages["stages"]["study"]
    stages["plots"] = [plot for plot in stages["plots"] if "results/study/" not in yaml.safe_dump(plot)]
    (dest / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    lock = yaml.safe_load((dest / "dvc.lock").read_text()) if (dest / "dvc.lock").exists() else None
    if lock and "study" in lock.get("stages", {}):
        del lock["stages"]["study"]
        (dest / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    git("init", "-q", "-b", "main", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-q", "-m", "tiny configuration", cwd=dest)
    return dest


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns
            for top in ("data", "results") for p in sorted((root / top).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("dvc")
    first_clone = make_project(root / "first")
    first = dvc("repro", "workflow", cwd=first_clone)
    before = mtimes(first_clone)
    second = dvc("repro", "workflow", cwd=first_clone)
    return SimpleNamespace(root=root, first_clone=first_clone, first=first, second=second,
                           before_second=before, after_second=mtimes(first_clone))


@pytest.fixture(scope="module")
def pulled(project) -> Path:
    """Commit the run, push it to the default remote, clone the repository again and `dvc pull`."""
    a = project.first_clone
    dvc("commit", "-f", "-q", "data.dvc", cwd=a)  # the prepared data/ into the cache, so that it is pushed
    git("add", "-A", cwd=a)
    git("commit", "-q", "-m", "results of the tiny run", cwd=a)
    dvc("push", cwd=a)
    b = project.root / "second"
    git("clone", "-q", str(a), str(b), cwd=project.root)
    dvc("pull", cwd=b)
    return b


def test_dvc_repro_runs_the_workflow_with_the_results_of_snakemake(project, e2e):
    """`dvc repro` in a fresh clone runs every rule; its outputs equal those of `snakemake --cores all`."""
    assert "Running stage 'workflow'" in project.first and "snakemake --cores all" in project.first
    a = project.first_clone
    for rel in ("results/metrics.json", "results/tables/omniglot.md", "results/summary.md",
                "results/plots/omniglot/conv4/margin_sweep.csv", "results/plots/omniglot/conv4/margin_analysis.csv"):
        assert (a / rel).read_bytes() == (e2e / rel).read_bytes(), rel
    for shot in (1, 5):  # every number and digest of the meta-test, every episode; only the timing differs
        ours, theirs = (json.loads((root / RUN / f"best/metatest_5way_{shot}shot.json").read_text())
                        for root in (a, e2e))
        assert ours.pop("elapsed_s") >= 0 and theirs.pop("elapsed_s") >= 0
        assert ours == theirs
    lock = yaml.safe_load((a / "dvc.lock").read_text())["stages"]["workflow"]
    assert {out["path"] for out in lock["outs"]} >= {"results/omniglot", "results/metrics.json", "results/plots"}
    assert lock["params"]["config/config.yaml"]["datasets"]["omniglot"]["margins"] == [-0.2, 0.0, 0.2]
    # checkpoints are in DVC's cache, the run folders are ignored by git (DVC wrote results/.gitignore)
    assert (a / RUN / "train" / "best.pt").is_file()
    assert "results/omniglot" not in git("status", "--porcelain", "--untracked-files=all", cwd=a)


def test_a_second_dvc_repro_does_nothing(project):
    assert "didn't change, skipping" in project.second
    assert "Data and pipelines are up to date" in project.second
    assert project.after_second == project.before_second  # not one file rewritten


def test_push_then_pull_restores_results_and_checkpoints_and_nothing_reruns(project, pulled):
    a, b = project.first_clone, pulled
    for rel in (RUN / "train" / "best.pt", RUN / "train" / "last.pt", RUN / "best" / "features",
                RUN / "best" / "metatest_5way_1shot.json",
                Path("data/omniglot/prepared.json"), Path("results/mtimes.json"), Path(".snakemake/metadata")):
        assert (b / rel).exists(), rel
        if (a / rel).is_file():
            assert (b / rel).read_bytes() == (a / rel).read_bytes(), rel
    # The pitfall: a restore writes files in its own order, so an input can come back after its outputs.
    # Here the first input of the DAG (from git) comes back last, after the prepared data made from it.
    # Without the recorded times put back, Snakemake would prepare and retrain everything ...
    for rel in ("data/omniglot/prepared.json", "resources/omniglot/omniglot_105.npz"):
        (b / rel).write_bytes((b / rel).read_bytes())
    stale = snakemake("-n", "--config", "restore_mtimes=False", cwd=b)
    assert re.search(r"^train\s+3$", stale.stdout, re.M), stale.stdout[-3000:]
    # ... and with them (the default) it has nothing to do
    fresh = snakemake("-n", cwd=b)
    assert "Nothing to be done" in fresh.stdout + fresh.stderr, fresh.stdout[-3000:]
    assert "restored the recorded modification time" in fresh.stderr


def test_metrics_show_prints_the_accuracies(project):
    shown = dvc("metrics", "show", "--json", cwd=project.first_clone)
    metrics = json.loads(shown)
    data = next(iter(metrics.values()))["data"]["results/metrics.json"]["data"]
    expected = json.loads((project.first_clone / "results" / "metrics.json").read_text())
    for entry in expected["aggregate"]:
        values = data["accuracy"]["omniglot"]["conv4"][f"m{entry['margin']}"]
        for task in ("5way-1shot", "5way-5shot"):
            assert values[f"best_{task}"] == entry["checkpoints"]["best"]["tasks"][task]["mean"]
    table = dvc("metrics", "show", cwd=project.first_clone)
    first = expected["aggregate"][0]["checkpoints"]["best"]["tasks"]["5way-1shot"]["mean"]
    assert "best_5way-1shot" in table and f"{first:.5g}"[:5] in table


def test_plots_show_writes_html_that_renders_offline(project, tmp_path):
    out = tmp_path / "plots"
    dvc("plots", "show", "-o", str(out), cwd=project.first_clone)
    html = (out / "index.html").read_text()
    # nothing is fetched from the network: no external script, stylesheet or image
    external = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert not external and "cdn.jsdelivr" not in html
    assert html.count("<script>/* vega") == 3  # vega, vega-lite and vega-embed inlined from the template
    assert "vegaEmbed(" in html
    # the margin-sweep chart carries the sweep's numbers, x = margin
    sweep = (project.first_clone / "results/plots/omniglot/conv4/margin_sweep.csv").read_text().splitlines()
    assert '"margin"' in html and "best_novel_5way_1shot" in html
    for row in sweep[1:]:
        assert f'"margin": "{row.split(",")[0]}"' in html or f'"margin": {row.split(",")[0]}' in html
    # the project's figures are linked as local files that exist
    images = re.findall(r'<img src="(static/[^"]+)"', html)
    assert len(images) == 4 and all((out / src).is_file() for src in images)
    assert html.count("vegaEmbed('#") == 1  # one chart: the sweep (not every CSV under results/plots)


def test_exp_run_with_a_margin_key_is_listed(project, pulled):
    """A one-off experiment on the pulled clone. The pulled provenance records (.snakemake/metadata) let
    Snakemake see the changed param: the table is redone, nothing is retrained."""
    b = pulled
    checkpoint = (b / RUN / "train" / "best.pt").read_bytes()
    output = dvc("exp", "run", "workflow", "-n", "table-m0.2", "-S", "config/config.yaml:datasets.omniglot.table_margin=0.2", cwd=b)
    assert "rule train" not in output and "rule table" in output
    assert (b / RUN / "train" / "best.pt").read_bytes() == checkpoint
    shown = dvc("exp", "show", "--no-pager", "--md", cwd=b)
    assert "table-m0.2" in shown
    assert "m = 0.2" in (b / "results" / "tables" / "omniglot.md").read_text()

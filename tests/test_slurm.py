"""The workflow on a real Slurm cluster: Debian's slurm-wlm on this machine, one node, brought up and torn
down by tools/local-slurm.sh, driven by Snakemake's Slurm executor plugin with profiles/slurm.

1. The tiny configuration (.test/config.yaml) end to end: every job that is not a localrule runs as a
   Slurm job (its id is in Slurm's own records and in its log), and every number equals the local run's
   (the `e2e` fixture, `snakemake --cores 2` on the same configuration).
2. A training job cancelled after its first epoch is submitted again by --retries with twice the time
   limit, and the new job continues from train/last.pt.

Needs root, `apt-get install slurm-wlm munge` and snakemake-executor-plugin-slurm; elsewhere it is skipped
with the reason, except with NEGMARGIN_REQUIRE_SLURM=1 (set by .ci/run), where a missing Slurm fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from workflow_helpers import copy_workflow, expected_jobs, job_env, merged_config

pytestmark = pytest.mark.slow  # a system test: the real workflow (tests in tiers, pyproject.toml)

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "tools" / "local-slurm.sh"
PARTITION = "debug"  # tools/local-slurm.sh's partition
REMOTE_RULES = {"prepare", "train", "features", "metatest", "analyze"}  # the rest are localrules
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")
# Per-run measurements that are not results: wall-clock times and throughput, and the checkpoint's hash
# (the checkpoint holds the training history, timings included; its weights are compared instead).
TIMING_KEYS = {"images_per_s", "epoch_s", "elapsed_s", "elapsed_s_this_invocation", "checkpoint_sha256"}


def slurm_unavailable() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (it starts slurmctld, slurmd and munged)"
    missing = [
        t for t in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel") if not shutil.which(t)
    ]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[workflow]')"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node Slurm; its daemons are stopped by their process ids afterwards."""
    reason = slurm_unavailable()
    if reason:
        if os.environ.get("NEGMARGIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"NEGMARGIN_REQUIRE_SLURM=1, but no Slurm here: {reason}")
        pytest.skip(f"no Slurm here: {reason}")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        [str(LOCAL_SLURM), "start", str(state)], capture_output=True, text=True, timeout=120
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        subprocess.run([str(LOCAL_SLURM), "stop", str(state)], timeout=120)


def slurm_snakemake(*args: str, cwd: Path, limit: int = 1200) -> subprocess.Popen:
    """`snakemake --executor slurm --workflow-profile profiles/slurm`, with what this cluster needs on top:
    its partition, squeue as status command (no accounting daemon) and short polling. `timeout` bounds it:
    a Snakemake waiting for a job it lost track of ignores SIGTERM."""
    command = [
        "timeout", "-k", "10", str(limit),
        sys.executable, "-m", "snakemake",
        "--executor", "slurm",
        "--workflow-profile", "profiles/slurm",
        "--default-resources", f"slurm_partition={PARTITION}",
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "2",
        "--latency-wait", "5",
        *args,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=cwd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate()
    assert process.returncode == 0, f"snakemake failed ({process.returncode}):\n{output[-6000:]}"
    return output


def submissions(output: str) -> list[tuple[str, str, Path, Path]]:
    """(rule, Slurm job id, Slurm log, rule log) of every submission, in order."""
    blocks = re.findall(r"(?m)^rule (\w+):\n((?:    .*\n)+)", output)
    jobs = {}
    for rule, body in blocks:
        fields = dict(re.findall(r"(?m)^    (\w+): (.*)$", body))
        jobs[fields["jobid"]] = (rule, Path(fields["log"]))
    return [
        (*jobs[job][:1], slurm_id, Path(log), jobs[job][1])
        for job, slurm_id, log in SUBMITTED.findall(output)
    ]


def slurm_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld still knows (finished ones too: MinJobAge is an hour): id -> state, limit."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i|%T|%l|%j"], capture_output=True, text=True, check=True
    ).stdout
    jobs = {}
    for line in out.splitlines():
        job_id, state, limit, name = line.split("|")
        jobs[job_id] = {"state": state, "limit": limit, "name": name}
    return jobs


def completion_log(cluster: Path) -> dict[str, dict[str, str]]:
    """Slurm's record of every job that ended (JobCompType=jobcomp/filetxt): id -> its fields (JobState,
    Name, TimeLimit in minutes, ...)."""
    records = {}
    for line in (cluster / "log" / "jobcomp.log").read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        records[fields["JobId"]] = fields
    return records


def results(root: Path) -> dict[str, object]:
    """Every JSON result of a run, timings left out, keyed by path (not results/mtimes.json: file times)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return {
        str(path.relative_to(root)): strip(json.loads(path.read_text()))
        for path in sorted((root / "results").rglob("*.json"))
        if path != root / "results" / "mtimes.json"
    }


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    repo = copy_workflow(tmp_path_factory.mktemp("slurm_e2e") / "repo")
    output = finish(slurm_snakemake("--configfile", ".test/config.yaml", cwd=repo))
    return repo, output


def test_every_job_ran_as_a_slurm_job(cluster, slurm_run):
    repo, output = slurm_run
    submitted = submissions(output)
    config = merged_config(repo / "config" / "config.yaml", repo / ".test" / "config.yaml")
    expected = {rule: n for rule, n in expected_jobs(config).items() if rule in REMOTE_RULES}
    assert {rule: sum(1 for s in submitted if s[0] == rule) for rule in expected} == expected, output[-4000:]
    ids = [slurm_id for _, slurm_id, _, _ in submitted]
    assert len(set(ids)) == len(ids)

    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    known, ended = slurm_jobs(), completion_log(cluster)
    for rule, slurm_id, slurm_log, rule_log in submitted:
        # Slurm knows the job, ran it to completion under this run's name, with the rule's resources
        assert known[slurm_id]["state"] == "COMPLETED", (rule, slurm_id, known.get(slurm_id))
        record = ended[slurm_id]
        assert record["JobState"] == "COMPLETED" and record["Name"] == run_id, record
        family = "report" if rule not in config["resources"] else rule
        resources = config["resources"][family]
        assert int(record["TimeLimit"]) == resources["runtime"], (rule, record)
        assert int(record["ProcCnt"]) == resources["threads"], (rule, record)
        assert f"mem={resources['mem_mb']}M" in record["Tres"], (rule, record)
        # its Slurm log is named after it and ran the rule; the command inside ran in that Slurm job
        assert slurm_log.name == f"{slurm_id}.log" and f"rule_{rule}" in slurm_log.parts, slurm_log
        text = slurm_log.read_text()
        assert f"rule {rule}:" in text and "Finished job" in text, text[-2000:]
        assert f": Slurm job {slurm_id}\n" in (repo / rule_log).read_text(), rule_log
    for rule in ("select", "metrics", "table", "plot_margins", "plot_tsne", "summary"):
        assert re.search(rf"(?m)^localrule {rule}:", output), f"{rule} is not a localrule"
    logs = [repo / line.split()[1] for line in re.findall(r"(?m)^    log: .*$", output)]
    local_logs = [log for log in logs if "/select/" in str(log) or "/report/" in str(log)]
    assert local_logs and not any("Slurm job" in log.read_text() for log in local_logs)


def test_slurm_results_equal_the_local_run(slurm_run, e2e):
    repo, _ = slurm_run
    ours, local = results(repo), results(e2e)
    assert ours.keys() == local.keys() and len(ours) >= 19  # metrics.json, 6 per run
    for path in ours:
        assert ours[path] == local[path], path
    for table in ("results/tables/omniglot.md", "results/summary.md"):
        assert (repo / table).read_text() == (e2e / table).read_text(), table
    # the trained weights and the cached features, bit for bit
    from negmargin.io import load_features
    from negmargin.models import read_checkpoint

    checkpoints = sorted((repo / "results").rglob("train/*.pt"))
    features = sorted((repo / "results").rglob("features/*.npz"))
    assert len(checkpoints) >= 6 and len(features) == 12  # 3 runs x {best, final} x {novel, base_holdout}
    for path in checkpoints:
        ours, local = (read_checkpoint(root / path.relative_to(repo))["model"] for root in (repo, e2e))
        assert ours.keys() == local.keys()
        assert all(torch.equal(ours[k], local[k]) for k in ours), path
    for path in features:
        ours, local = (load_features(root / path.relative_to(repo)) for root in (repo, e2e))
        assert np.array_equal(ours["features"], local["features"]), path
        assert np.array_equal(ours["labels"], local["labels"]), path


def test_a_cancelled_training_job_is_resubmitted_and_resumes(cluster, slurm_run):
    """scancel after the first epoch: --retries submits the job again with twice the time limit, and the
    new job continues from train/last.pt (the trainer says so in the rule's log) to the last epoch."""
    repo, _ = slurm_run
    overlay = repo / "resume.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "datasets": {
                    "omniglot": {"margins": [0.1], "table_margin": 0.1, "train": {"conv4": {"epochs": 2}}}
                }
            }
        )
    )
    run = repo / "results" / "omniglot" / "conv4" / "m0.1" / "s0" / "train"
    process = slurm_snakemake(
        "--configfile", ".test/config.yaml", str(overlay), "--", str(run.relative_to(repo) / "train.json"), cwd=repo
    )  # fmt: skip
    try:
        while not (run / "last.pt").exists():  # written at the end of each epoch
            assert process.poll() is None, process.communicate()[0][-4000:]
            time.sleep(0.2)
        running = [j for j, info in slurm_jobs().items() if info["state"] == "RUNNING"]
        assert len(running) == 1, slurm_jobs()
        subprocess.run(["scancel", running[0]], check=True)
        output = finish(process)
    finally:
        if process.poll() is None:
            process.kill()

    submitted = submissions(output)
    assert [s[0] for s in submitted] == ["train", "train"], output[-4000:]
    first, second = submitted[0][1], submitted[1][1]
    assert first == running[0]
    ended = completion_log(cluster)
    assert ended[first]["JobState"] == "CANCELLED" and ended[second]["JobState"] == "COMPLETED"
    assert int(ended[second]["TimeLimit"]) == 2 * int(ended[first]["TimeLimit"])  # runtime x attempt
    log = (repo / submitted[1][3]).read_text()
    assert f": Slurm job {second}\n" in log and f"resuming {run.relative_to(repo)} after epoch 1/2" in log, (
        log
    )
    summary = json.loads((run / "train.json").read_text())
    assert summary["final_epoch"] == 2
    epochs = [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


# ------------------------------------------------------------- what the paper profile asks of Slurm (dry run)


def job_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job of a dry run."""
    jobs = []
    for rule, body in re.findall(r"(?m)^(?:local)?rule (\w+):\n((?:    .*\n)+)", output):
        line = re.search(r"(?m)^    resources: (.*)$", body)
        jobs.append((rule, dict(item.split("=", 1) for item in line.group(1).split(", ")) if line else {}))
    return jobs


@pytest.mark.parametrize("gpu_request", ["gpus", "gres"])
def test_paper_profile_sizes_every_job(tmp_path, gpu_request):
    repo = copy_workflow(tmp_path / "repo")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", "config/paper.yaml",
         "--config", f"compute={{gpu_request: {gpu_request}, gpu_model: a100}}"],
        cwd=repo, env=job_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = merged_config(repo / "config" / "config.yaml", repo / "config" / "paper.yaml")
    jobs = job_resources(result.stdout)
    assert len(jobs) == sum(expected_jobs(config).values())
    for rule, resources in jobs:
        if rule == "all":
            continue
        family = rule if rule in config["resources"] else "report"
        wanted = config["resources"][family]
        assert int(resources["cpus_per_task"]) == wanted["threads"], (rule, resources)
        assert int(resources["mem_mb"]) == wanted["mem_mb"], (rule, resources)
        assert int(resources["runtime"]) == wanted["runtime"], (rule, resources)  # first attempt
        if rule in ("train", "features"):
            if gpu_request == "gpus":
                assert (
                    resources["gpu"] == "1" and resources["gpu_model"] == "a100" and "gres" not in resources
                )
            else:
                assert resources["gres"] == "gpu:a100:1" and "gpu" not in resources
        else:
            assert not {"gpu", "gpu_model", "gres"} & set(resources), (rule, resources)

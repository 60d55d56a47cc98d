"""Fault injection: one test (or one parametrised test) per case of the README's "Reliability" section.

Real code paths throughout: the real Snakefile on a tiny Omniglot configuration in copies of the
repository, real SIGKILLs of running jobs, a real file-size limit (RLIMIT_FSIZE) for a full disk, real
archives and images in the datasets' formats, and a real HTTP server on 127.0.0.1 that misbehaves.

The workflow tests share three pipeline runs (module fixtures): ``baseline`` (uninterrupted),
``second_run`` (started while a contender tries the same folder) and ``killed_run`` (training SIGKILLed
mid-epoch, then ``--rerun-incomplete``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from archives import make_cub_tgz
from cli_helpers import one_line_error
from http_server import FileServer
from workflow_helpers import copy_workflow, job_counts, job_env, snakemake

from negmargin.data.download import download
from negmargin.data.extract import extract
from negmargin.errors import UserError

pytestmark = pytest.mark.slow  # a system test: the real workflow (tests in tiers, pyproject.toml)

REPO = Path(__file__).resolve().parents[1]
RUN = Path("results/omniglot/conv4/m0.0/s0")
TRAIN_LOG = Path("logs/train/omniglot/conv4/m0.0/s0.log")
METRICS = Path("results/metrics.json")
TABLE = Path("results/tables/omniglot.md")
TARGETS = [str(METRICS), str(TABLE)]

# The tiny pipeline of .test/config.yaml cut further: 30 characters per split, one margin, one seed, one
# shot, 5 episodes; two epochs (so that a run killed in the second has a checkpoint to resume from).
FAULT_CONFIG = {
    "metatest": {"episodes": 5, "ways": [5], "shots": [1], "checkpoints": ["best"]},
    "datasets": {
        "omniglot": {
            "prepare": {"options": {"max_classes": 30}},
            "margins": [0.0],
            "table_margin": 0.0,
            "train": {"conv4": {"epochs": 2, "batch_size": 32, "lr_steps": [2]}},
        }
    },
}


def new_repo(root: Path) -> Path:
    repo = copy_workflow(root / "repo")
    (repo / "fault.yaml").write_text(yaml.safe_dump(FAULT_CONFIG))
    return repo


def config_args() -> list[str]:
    return ["--configfile", ".test/config.yaml", "fault.yaml"]


def start_snakemake(repo: Path, *args: str) -> subprocess.Popen:
    """snakemake in its own session (process group), so that it and its jobs can be killed together."""
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", *args],
        cwd=repo,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, what: str, process: subprocess.Popen | None = None, limit: float = 600) -> None:
    """Poll ``condition`` (no timing is asserted: ``limit`` only keeps a broken run from hanging CI)."""
    deadline = time.monotonic() + limit
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"snakemake ended before {what}:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``: pid -> command line (Linux /proc)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands.get(child, "")
                frontier.append(child)
    return found


def job_pids(process: subprocess.Popen, verb: str) -> list[int]:
    return [pid for pid, cmd in descendants(process.pid).items() if f"negmargin {verb} " in cmd]


def kill_all(process: subprocess.Popen, verb: str) -> None:
    """SIGKILL snakemake and every process of its job (a node crash, an OOM kill, a scancel -9)."""
    pids = job_pids(process, verb)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    process.stdout.close()


def kill_job(process: subprocess.Popen, verb: str) -> str:
    """SIGKILL the job's processes only (an OOM kill): Snakemake sees the job fail and stops; its output."""
    for pid in job_pids(process, verb):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output, _ = process.communicate(timeout=600)
    return output


def without_timing(data: bytes) -> bytes:
    """A meta-test record without ``elapsed_s`` (its wall-clock time, the one field that may differ)."""
    return re.sub(rb'\n  "elapsed_s": [0-9.]+,', b"", data)


def sha256s(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------- shared pipeline runs


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    repo = new_repo(tmp_path_factory.mktemp("baseline"))
    snakemake(*TARGETS, "--cores", "2", *config_args(), cwd=repo, timeout=1200)
    return {"repo": repo, "metrics": (repo / METRICS).read_bytes(), "table": (repo / TABLE).read_bytes()}


@pytest.fixture(scope="module")
def second_run(tmp_path_factory) -> dict:
    """A second uninterrupted run; while its first job runs, a contender starts in the same folder."""
    repo = new_repo(tmp_path_factory.mktemp("second"))
    first = start_snakemake(repo, *TARGETS, "--cores", "2", *config_args())
    wait_for(lambda: job_pids(first, "prepare") or job_pids(first, "train"), "the first job", first)
    contender = snakemake(*TARGETS, "--cores", "1", *config_args(), cwd=repo, check=False)
    output, _ = first.communicate(timeout=1200)
    assert first.returncode == 0, output[-4000:]
    return {"repo": repo, "contender": contender, "metrics": (repo / METRICS).read_bytes()}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> dict:
    repo = new_repo(tmp_path_factory.mktemp("killed"))
    first = start_snakemake(repo, *TARGETS, "--cores", "2", *config_args())
    log = repo / RUN / "train" / "log.jsonl"
    # last.pt and log.jsonl are written at the end of epoch 1: kill at once, inside epoch 2.
    wait_for(lambda: log.exists() and log.read_text().strip(), "the first epoch's checkpoint", first)
    first_output = kill_job(first, "train")
    killed_at = torch.load(repo / RUN / "train" / "last.pt", weights_only=True)["epoch"]
    summary_after_kill = (repo / RUN / "train" / "train.json").exists()
    rerun = snakemake(*TARGETS, "--cores", "2", "--rerun-incomplete", *config_args(), cwd=repo, timeout=1200)
    return {
        "repo": repo,
        "killed_at": killed_at,
        "first_returncode": first.returncode,
        "first_output": first_output,
        "summary_after_kill": summary_after_kill,
        "rerun": rerun,
        "metrics": (repo / METRICS).read_bytes(),
    }


# --------------------------------------------------------------------------------------------- the cases


def test_case1_training_killed_under_snakemake_resumes_to_the_same_metrics(killed_run, baseline):
    repo = killed_run["repo"]
    assert killed_run["killed_at"] == 1, "the kill should land in epoch 2 of 2"
    assert killed_run["first_returncode"] != 0 and "Error in rule train" in killed_run["first_output"]
    assert not killed_run["summary_after_kill"], "train.json (the job's output) must not exist after the kill"
    # The rerun resumes the train job from last.pt instead of starting over ...
    assert "resuming" in (repo / TRAIN_LOG).read_text() and "after epoch 1/2" in (repo / TRAIN_LOG).read_text()
    history = json.loads((repo / RUN / "train" / "train.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    # and the final metrics equal those of the uninterrupted run, byte for byte
    assert killed_run["metrics"] == baseline["metrics"]
    full = torch.load(baseline["repo"] / RUN / "train" / "last.pt", weights_only=True)
    resumed = torch.load(repo / RUN / "train" / "last.pt", weights_only=True)
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])


@pytest.mark.parametrize(
    ("rule", "verb", "output"),
    [
        ("features", "features", RUN / "best" / "features" / "1shot_novel.npz"),
        ("metatest", "metatest", RUN / "best" / "metatest_5way_1shot.json"),
        ("table", "table", TABLE),
    ],
)
def test_case2_killed_features_metatest_or_table_job_leaves_no_partial_output(baseline, rule, verb, output):
    repo = baseline["repo"]
    before = (repo / output).read_bytes()
    process = start_snakemake(repo, str(output), "--cores", "1", "--forcerun", rule, *config_args())
    wait_for(lambda: job_pids(process, verb), f"the {rule} job", process)
    kill_all(process, verb)  # Snakemake too: nothing gets to clean up
    # Whenever the kill landed, the output is either absent or whole: never a truncated file.
    if (repo / output).exists():
        assert without_timing((repo / output).read_bytes()) == without_timing(before)
    leftovers = [p.name for p in (repo / output).parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert all(name.endswith(".tmp" + output.suffix) or name.endswith(".tmp") for name in leftovers)
    # The killed Snakemake left its lock behind: --unlock, then a rerun redoes that job and nothing else.
    snakemake("--unlock", *config_args(), cwd=repo)
    rerun = snakemake(str(output), "--cores", "2", "--rerun-incomplete", *config_args(), cwd=repo)
    assert job_counts(rerun.stdout + rerun.stderr) == {rule: 1}
    assert without_timing((repo / output).read_bytes()) == without_timing(before)  # the same result again
    assert (repo / METRICS).read_bytes() == baseline["metrics"]


def _train_cli(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "negmargin", "train", "--data", str(data), "--out", str(out), "--epochs", "4",
            "--batch-size", "16", "--margin=-0.1", "--lr-steps", "3", "--warmup-iters", "5", "--val-every", "1",
            "--val-episodes", "5", "--device", "cpu", "--threads", "1"]


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_case3_write_failure_is_one_clear_error_and_keeps_checkpoints(tiny_omniglot, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_train_cli(tiny_omniglot, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "log.jsonl"
    wait_for(lambda: log.exists() and log.read_text().strip(), "the first epoch")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 4
    before = sha256s(out)
    # The disk "fills up": no file may grow past 64 KiB (a checkpoint is ~0.5 MB). Python ignores
    # SIGXFSZ, so the write fails with EFBIG, as it would with ENOSPC on a full disk.
    failed = subprocess.run(_train_cli(tiny_omniglot, out), capture_output=True, text=True,
                            preexec_fn=_limit_file_size(64 * 1024))
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = failed.stderr.strip().splitlines()
    assert "Traceback" not in failed.stderr
    assert re.fullmatch(r"negmargin train: error: cannot write \S+\.pt: File too large .*", lines[-1]), lines[-1]
    assert str(out) in lines[-1] and "previous version" in lines[-1]
    # Everything written before is intact, and no temporary file is left behind.
    assert sha256s(out) == before
    # With space again, the same command resumes from the intact checkpoint and finishes.
    resumed = subprocess.run(_train_cli(tiny_omniglot, out), capture_output=True, text=True, check=True)
    assert f"after epoch {done}/4" in resumed.stderr
    assert json.loads((out / "train.json").read_text())["final_epoch"] == 4


@pytest.fixture(scope="module")
def cub_with_bad_images(tmp_path_factory) -> dict:
    """A CUB folder (real layout, real class names) with one truncated and one garbage JPEG."""
    root = tmp_path_factory.mktemp("badcub")
    tgz = root / "CUB_200_2011.tgz"
    make_cub_tgz(tgz, [1, 3, 5, 2, 4], images_per_class=5)
    with tarfile.open(tgz) as tar:
        tar.extractall(root / "src", filter="data")
    images = root / "src" / "CUB_200_2011" / "images"
    truncated = sorted((images / "001.Black_footed_Albatross").iterdir())[2]
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = sorted((images / "004.Groove_billed_Ani").iterdir())[0]
    garbage.write_bytes(b"this is not a JPEG" * 10)
    return {"source": root / "src", "truncated": truncated, "garbage": garbage}


def test_case4_corrupt_image_error_names_the_file_and_its_class(cub_with_bad_images, tmp_path, capsys):
    args = ["prepare", "cub", "--source", str(cub_with_bad_images["source"]), "--out", str(tmp_path / "cub"),
            "--raw-dir", str(tmp_path / "raw"), "--fixture", "--image-size", "16", "--base-holdout", "2",
            "--workers", "1"]
    from negmargin.cli import main

    assert main(args) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert "Traceback" not in stderr and len(errors) == 1 and stderr.strip().endswith(errors[0])
    err = errors[0]  # progress lines of the splits already written come before it
    bad = cub_with_bad_images["truncated"]
    assert str(bad) in err and "(class 001.Black_footed_Albatross)" in err and "cannot decode" in err
    assert "skip_bad_images" in err
    assert not (tmp_path / "cub" / "prepared.json").exists()


def test_case4_corrupt_images_are_skipped_and_counted_with_the_switch(cub_with_bad_images, tmp_path):
    out = tmp_path / "cub"
    result = subprocess.run(
        [sys.executable, "-m", "negmargin", "prepare", "cub", "--source", str(cub_with_bad_images["source"]),
         "--out", str(out), "--raw-dir", str(tmp_path / "raw"), "--fixture", "--image-size", "16",
         "--base-holdout", "2", "--workers", "1", "--skip-bad-images"],
        capture_output=True, text=True, check=True,
    )
    log = result.stdout + result.stderr
    assert "skipped 2 unreadable image(s)" in log
    assert f"skipping unreadable image {cub_with_bad_images['truncated']} (class 001.Black_footed_Albatross)" in log
    assert f"{cub_with_bad_images['garbage']} (class 004.Groove_billed_Ani)" in log
    prepared = json.loads((out / "prepared.json").read_text())
    skipped = [item for items in prepared["skipped_images"].values() for item in items]
    assert len(skipped) == 2
    # The splits hold exactly the readable images: 25 files, 2 unreadable.
    assert sum(counts["images"] for counts in prepared["splits"].values()) == 23
    from negmargin.data.store import load_split

    novel = load_split(out / "novel")  # classes 004 and 008 -> only 004 here; it lost one image
    assert len(novel) == 4 and novel.meta["num_images"] == 4 and len(novel.meta["skipped_images"]) == 1


def test_case4_the_switch_is_a_workflow_key(tmp_path):
    repo = copy_workflow(tmp_path / "repo")
    overlay = tmp_path / "skip.yaml"
    overlay.write_text(yaml.safe_dump({"run_datasets": ["cub"],
                                       "datasets": {"cub": {"prepare": {"skip_bad_images": True}}}}))
    result = snakemake("data/cub/prepared.json", "-n", "-p", "--configfile", "config/paper.yaml", str(overlay),
                       cwd=repo)
    assert re.search(r"python -m negmargin prepare cub .*--skip-bad-images", result.stdout)


def _tar_with(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("data/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member = tarfile.TarInfo({"traversal": "data/../../escaped.txt", "absolute": "/tmp/escaped.txt"}
                                 .get(kind, "data/member"))
        if kind in ("traversal", "absolute"):
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
            return path
        member.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE,
                       "blockdev": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
        member.linkname = {"symlink": "../../outside", "hardlink": "/etc/passwd"}.get(kind, "")
        member.devmajor, member.devminor = (1, 3) if kind in ("chardev", "blockdev") else (0, 0)
        tar.addfile(member)
    return path


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("traversal", r"'\.\.' in path"),
        ("absolute", "absolute path"),
        ("symlink", "lies outside the archive"),
        ("hardlink", "link to absolute path"),
        ("chardev", "device file or FIFO"),
        ("blockdev", "device file or FIFO"),
        ("fifo", "device file or FIFO"),
        ("zip-traversal", r"'\.\.' in path"),
    ],
)
def test_case5_hostile_archives_are_refused_and_nothing_is_written_outside(tmp_path, kind, why):
    if kind == "zip-traversal":
        archive = tmp_path / "in" / "a.zip"
        archive.parent.mkdir()
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("data/ok.txt", "ok")
            zf.writestr("data/../../escaped.txt", "evil")
    else:
        archive = _tar_with((tmp_path / "in").mkdir() or tmp_path / "in" / "a.tar", kind)
    target = tmp_path / "box" / "target"
    target.parent.mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=rf"{re.escape(str(archive))}: unsafe member .*{why}"):
        extract(archive, target)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # not even the target folder
    assert not Path("/tmp/escaped.txt").exists() or Path("/tmp/escaped.txt").read_bytes() != b"evil"


DATA = os.urandom(256 * 1024 + 7)
MD5 = hashlib.md5(DATA).hexdigest()
FAST = {"retries": 2, "backoff": 0.01, "timeout": 0.5}


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [
        ("wrong", r"md5 is [0-9a-f]{32}, expected " + MD5),
        ("404", r"HTTP 404"),
        ("500", r"HTTP 500 .*gave up after 3 attempts"),
        ("hang", r"timed out.*gave up after 3 attempts"),
        ("reset", "ok"),
        ("stall", "ok"),
    ],
)
def test_case6_network_faults_retry_resume_or_fail_clearly(tmp_path, mode, outcome):
    out = tmp_path / "file.bin"
    with FileServer() as server:
        url = server.add("/file.bin", DATA, mode=mode)
        if outcome == "ok":  # reset or stalled mid-transfer: resumed where it stopped, and verified
            assert download(url, out, md5=MD5, size=len(DATA), **FAST) == out
            ranges = server.requests_for("/file.bin")
            assert out.read_bytes() == DATA and ranges[0] is None and len(ranges) == 2
            if mode == "stall":  # what arrived before the stall is kept: the retry asks for the rest only
                assert 0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) < len(DATA)
            return
        with pytest.raises(UserError, match=outcome) as error:
            download(url, out, md5=MD5, size=len(DATA), **FAST)
        attempts = len(server.requests_for("/file.bin"))
    assert str(url) in str(error.value) and "\n" not in str(error.value)
    assert attempts == (3 if mode in ("500", "hang") else 1)  # bounded: 1 + retries, 404 and bad bytes not retried
    assert not out.exists()  # a partial or wrong file is never taken for the real one
    if mode == "wrong":
        assert not (tmp_path / "file.bin.part").exists()


@pytest.fixture(scope="module")
def config_repo(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("config") / "repo")


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"run_datasets": ["imagenet1k"]},
         "run_datasets names 'imagenet1k': unknown dataset; allowed: cub, mini_imagenet, omniglot, tiered_imagenet"),
        ({"datasets": {"omniglot": {"archs": ["vgg16"]}}},
         "datasets.omniglot.archs[0]: 'vgg16': expected a backbone (conv4, resnet12), "
         "optionally with -<variant> (e.g. conv4-softmax)"),
        ({"metatest": {"episodes": 0}}, "metatest.episodes: 0 is less than the minimum of 1"),
        ({"metatest": {"episodes": -5}}, "metatest.episodes: -5 is less than the minimum of 1"),
        ({"metatest": {"ways": [5, 30]}, "datasets": {"omniglot": {"prepare": {"options": {"max_classes": 20}}}}},
         "metatest.ways 30: the novel split of omniglot has 20 classes (prepare.options.max_classes 20); "
         "allowed: 2 to 20"),
        ({"metatest": {"shots": [1, 10], "queries": 15}},
         "metatest.shots 10 + metatest.queries 15 = 25 images per class, but the novel split of omniglot has 20 "
         "per class; allowed: shots + queries <= 20"),
        ({"datasets": {"omniglot": {"margins": [-0.1, "0.2"]}}},
         "datasets.omniglot.margins[1]: '0.2' is not of type 'number' (write the number without quotes)"),
    ],
    ids=["unknown-dataset", "unknown-arch", "zero-episodes", "negative-episodes", "ways-above-classes",
         "shots-plus-queries-above-images", "margin-as-string"],
)
def test_case7_invalid_config_is_rejected_before_any_job_runs(config_repo, tmp_path, overlay, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    result = snakemake("--cores", "1", "--configfile", str(bad), cwd=config_repo, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "invalid configuration:\n" in output and f"\n  {message}\n" in output, output[-3000:]
    assert not (config_repo / "data").exists() and not (config_repo / "logs").exists()  # no job ran


def _checkpoint(path: Path, arch: str = "conv4", dataset: str = "omniglot") -> Path:
    from negmargin.models import CHECKPOINT_FORMAT, Classifier, ModelSpec

    spec = ModelSpec(arch, 1, 28, 5)
    torch.save({"format": CHECKPOINT_FORMAT, "model_spec": spec.to_dict(), "config": {"dataset": dataset},
                "model": Classifier(spec).state_dict()}, path)
    return path


class Payload:
    """Anything but tensors and plain containers: weights_only loading must refuse to unpickle it."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_case8_wrong_checkpoint_gets_a_clear_error(tiny_omniglot, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    split = str(tiny_omniglot / "novel")
    good = _checkpoint(tmp_path / "good.pt")
    # another arch
    err = one_line_error(capsys, ["features", "--checkpoint", str(good), "--split", split, "--arch", "resnet12",
                                  "--out", "f.npz", "--device", "cpu"])
    assert "holds a conv4 model, but arch 'resnet12' was asked for" in err
    # another dataset
    other = _checkpoint(tmp_path / "cub.pt", dataset="cub")
    err = one_line_error(capsys, ["features", "--checkpoint", str(other), "--split", split, "--out", "f.npz",
                                  "--device", "cpu"])
    assert "trained on cub, but" in err and "is a split of omniglot" in err
    # truncated
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    err = one_line_error(capsys, ["features", "--checkpoint", str(truncated), "--split", split, "--out", "f.npz"])
    assert "not a readable checkpoint, truncated or not a torch file" in err
    # a pickled object: refused, and its code never runs
    evil = tmp_path / "evil.pt"
    torch.save({"format": "negmargin-ckpt/1", "payload": Payload()}, evil)
    err = one_line_error(capsys, ["features", "--checkpoint", str(evil), "--split", split, "--out", "f.npz"])
    assert "refused: it holds a pickled Python object" in err and "weights_only=True" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "f.npz").exists()
    # every torch.load of the package is a weights_only load
    loads = [(p, line) for p in (REPO / "src").rglob("*.py") for line in p.read_text().splitlines()
             if re.search(r"\btorch\.load\(", line)]
    assert loads and all("weights_only=True" in line for _, line in loads), loads


def test_case9_second_run_in_the_same_folder_is_stopped_by_the_lock(second_run, baseline):
    contender = second_run["contender"]
    output = contender.stdout + contender.stderr
    assert contender.returncode != 0 and "Directory cannot be locked" in output, output[-3000:]
    # the first run went on undisturbed and its results are whole
    assert second_run["metrics"] == baseline["metrics"]
    assert not list((second_run["repo"] / ".snakemake" / "locks").glob("*"))


def test_case10_two_runs_give_byte_identical_metrics_and_the_same_episodes(second_run, baseline):
    from negmargin.episodes import sample_episodes
    from negmargin.io import load_features

    assert second_run["metrics"] == baseline["metrics"]
    for repo in (baseline["repo"], second_run["repo"]):
        record = json.loads((repo / RUN / "best" / "metatest_5way_1shot.json").read_text())
        # The episodes are a function of the seed (and the novel labels) alone: drawn again here, outside
        # the workflow, they are the same. tests/test_metatest.py pins one digest across machines.
        labels = load_features(repo / RUN / "best" / "features" / "1shot_novel.npz")["labels"]
        drawn = sample_episodes(labels, record["ways"], 1, record["queries"], record["episodes"], seed=0)
        assert record["episodes_sha256"] == drawn.digest()
    # The features (float32 arrays in a fixed-date .npz) are byte-identical too, and so is every field of
    # the meta-test record but its wall-clock time.
    for name in ("best/features/1shot_novel.npz", "best/features/1shot_base_holdout.npz"):
        assert (baseline["repo"] / RUN / name).read_bytes() == (second_run["repo"] / RUN / name).read_bytes(), name
    first, second = ((repo / RUN / "best" / "metatest_5way_1shot.json").read_bytes()
                     for repo in (baseline["repo"], second_run["repo"]))
    assert without_timing(first) == without_timing(second) and b'"elapsed_s"' in first
    shutil.rmtree(second_run["repo"] / "results", ignore_errors=True)  # done with it; keep /tmp small

"""negmargin.runtime: devices and progress lines."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from negmargin.errors import UserError
from negmargin.runtime import (
    EpochProgress,
    Progress,
    claim_gpu,
    release_gpu,
    resolve_device,
    visible_gpu_names,
)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_progress_prints_plain_lines_off_a_terminal():
    stream = io.StringIO()
    progress = Progress("download x", 2048, interval=0.0, stream=stream)
    progress.update(1024)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("download x: 1.0 KiB / 2.0 KiB (50.0%)") and "done in" in lines[-1]


def test_epoch_progress_logs_every_k_iterations(capsys):
    progress = EpochProgress(total=5, epoch=1, epochs=3, every=2)
    for iteration in range(1, 6):
        progress.update(iteration, 0.5, 100.0)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[3] for line in lines] == ["2/5", "4/5", "5/5"]


# ------------------------------------------------------------------------- GPU claims (no CUDA needed)
# Each holder is a real process that claims one of `count` GPUs with the real lock files, prints its index
# and keeps the claim until its stdin closes or it is killed: the kernel's flock is what is under test.

HOLDER = """
import sys
from negmargin.runtime import claim_gpu
claim = claim_gpu(int(sys.argv[1]), visible=sys.argv[2] or None, lock_dir=sys.argv[3], poll=0.05)
print(claim.index, claim.name, flush=True)
sys.stdin.read()
"""


def _holder(count: int, lock_dir, visible: str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(count), visible, str(lock_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _claimed(process: subprocess.Popen) -> tuple[int, str]:
    index, name = process.stdout.readline().split()
    return int(index), name


def test_concurrent_jobs_claim_different_gpus_and_a_killed_job_frees_its_own(tmp_path):
    first, second = _holder(2, tmp_path), _holder(2, tmp_path)
    try:
        first_claim, second_claim = _claimed(first), _claimed(second)
        assert sorted([first_claim, second_claim]) == [(0, "0"), (1, "1")]
        # Both GPUs held: a third job either gives up with one line, or waits.
        with pytest.raises(UserError, match=r"all 2 GPUs are claimed by other jobs .*--resources gpu=2"):
            claim_gpu(2, visible="", lock_dir=tmp_path, wait=False)
        third = _holder(2, tmp_path)
        assert "waiting for one to come free" in third.stderr.readline()
        holder_of_0 = first if first_claim[0] == 0 else second
        holder_of_0.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
        assert _claimed(third) == (0, "0")
        third.stdin.close()
        third.wait(timeout=30)
    finally:
        for process in (first, second):
            process.kill()
            process.wait(timeout=30)


def test_the_claim_follows_the_physical_gpu_named_by_cuda_visible_devices(tmp_path):
    """Jobs that see the same GPU under different indices (CUDA_VISIBLE_DEVICES=5,3 and =3) share its lock."""
    assert visible_gpu_names(2, "GPU-8f1a,GPU-77c2") == ["GPU-8f1a", "GPU-77c2"]
    assert visible_gpu_names(2, "") == ["0", "1"]
    sees_two, sees_one = _holder(2, tmp_path, "5,3"), None
    try:
        assert _claimed(sees_two) == (0, "5")
        sees_one = _holder(1, tmp_path, "3")
        assert _claimed(sees_one) == (0, "3")
        with pytest.raises(UserError, match="all 2 GPUs are claimed"):
            claim_gpu(2, visible="3,5", lock_dir=tmp_path, wait=False)
    finally:
        for process in (sees_two, sees_one):
            if process is not None:
                process.kill()
                process.wait(timeout=30)


def test_a_process_keeps_one_claim_until_it_releases_it(tmp_path):
    claim = claim_gpu(3, visible="", lock_dir=tmp_path)
    try:
        assert claim_gpu(3, visible="", lock_dir=tmp_path) is claim and claim.index == 0
    finally:
        release_gpu(tmp_path)
    assert claim_gpu(3, visible="", lock_dir=tmp_path).index == 0
    release_gpu(tmp_path)

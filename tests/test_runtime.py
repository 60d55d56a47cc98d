"""negmargin.runtime: devices and progress lines."""

from __future__ import annotations

import io

import pytest
import torch

from negmargin.errors import UserError
from negmargin.runtime import EpochProgress, Progress, resolve_device


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

"""What every verb needs from its surroundings: the torch device (and, on a machine with several GPUs, which
one this job may use), CPU threads, and progress display.

Progress shows as a tqdm bar on a terminal and as plain lines otherwise (logs of workflow jobs), on stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch



def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _human_time(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """A counter of bytes (or of other ``unit``s): a tqdm bar on a terminal, otherwise a plain line every ``interval`` seconds.

    The plain lines (and the closing one) go to stderr, so that logs of a workflow run show how far a
    long download got without a carriage-return bar.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        initial: int = 0,
        interval: float = 30.0,
        stream=None,
        unit: str = "B",
    ) -> None:
        self.label, self.total, self.done, self.unit = label, total, initial, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._start, self._start_bytes = time.monotonic(), initial
        self._last_print = self._start
        self._bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            scaled = unit == "B"
            self._bar = tqdm(
                total=total,
                initial=initial,
                unit=unit,
                unit_scale=scaled,
                unit_divisor=1024,
                desc=label,
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )

    def reset(self, done: int, total: int | None = None) -> None:
        """Start counting again from ``done`` bytes (after a restart or a resumed request)."""
        self.done = done
        if total is not None:
            self.total = total
        self._start, self._start_bytes = time.monotonic(), done
        if self._bar is not None:
            self._bar.reset(total=self.total)
            self._bar.update(done)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_print >= self.interval:
            self._last_print = now
            self._print_line()

    def _amount(self, n: float) -> str:
        return _human_bytes(n) if self.unit == "B" else f"{n:,.0f} {self.unit}"

    def _print_line(self, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.done - self._start_bytes) / elapsed
        text = f"{self.label}: {self._amount(self.done)}"
        if self.total:
            text += f" / {self._amount(self.total)} ({100.0 * self.done / self.total:.1f}%)"
        text += f", {self._amount(rate)}/s"
        if final:
            text += f", done in {_human_time(elapsed)}"
        elif self.total and rate > 0:
            text += f", ETA {_human_time((self.total - self.done) / rate)}"
        print(text, file=self.stream, flush=True)

    def close(self, final: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif final:
            self._print_line(final=True)


def set_threads(threads: int | None) -> None:
    """Limit torch's CPU threads (the workflow passes each job's share of the cores)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA where there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` or ``cuda`` on a machine with several GPUs claims one that no other job holds (:func:`claim_gpu`),
    so that concurrent jobs of one Snakemake run, or of several, do not all land on GPU 0. ``cuda:N`` is taken
    as it is."""
    import torch

    from negmargin.errors import UserError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if device == "cuda" and torch.cuda.device_count() > 1:
        claim = claim_gpu(torch.cuda.device_count())
        torch.cuda.set_device(claim.index)  # so that anything that says plain "cuda" means this GPU too
        return torch.device("cuda", claim.index)
    return torch.device(device)


# ------------------------------------------------------------------------------------------ GPU claims
#
# One GPU per job on a machine with several: Snakemake's `--resources gpu=N` bounds how many GPU jobs run at
# once, but it does not tell a job *which* GPU is free. Each job therefore claims one by taking an exclusive
# lock (flock) on a file per GPU in a folder shared by every job on the machine. The kernel releases the lock
# when the process ends, however it ends (SIGKILL included), so a claim never outlives its job. A job that
# finds every GPU claimed waits for one to come free.

GPU_LOCK_DIR_ENV = "NEGMARGIN_GPU_LOCK_DIR"


@dataclass(frozen=True)
class GpuClaim:
    """A GPU this process holds until it exits: ``index`` among the visible devices (``cuda:index``),
    ``name`` its identity on the machine (its CUDA_VISIBLE_DEVICES entry, else its index), ``lock`` the file."""

    index: int
    name: str
    lock: Path


_held: dict[Path, tuple[GpuClaim, int]] = {}  # lock folder -> (claim, open descriptor), for the process's life


def gpu_lock_dir() -> Path:
    """``$NEGMARGIN_GPU_LOCK_DIR``, else ``<temp dir>/negmargin-gpu-locks`` (shared by every user's jobs)."""
    return Path(os.environ.get(GPU_LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "negmargin-gpu-locks")


def visible_gpu_names(count: int, visible: str | None = None) -> list[str]:
    """The machine-wide names of the ``count`` visible GPUs: the entries of CUDA_VISIBLE_DEVICES (indices or
    UUIDs), so that two jobs that see the same physical GPU under different indices still share one lock."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [entry.strip() for entry in (visible or "").split(",") if entry.strip()]
    return entries[:count] if len(entries) >= count else [str(index) for index in range(count)]


def _lock_path(folder: Path, name: str) -> Path:
    return folder / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.lock"


def _lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: a read-only descriptor can hold a flock too
        return os.open(path, os.O_RDONLY)


def claim_gpu(count: int, visible: str | None = None, lock_dir: Path | None = None, wait: bool = True,
              poll: float = 2.0) -> GpuClaim:
    """Claim the first of ``count`` visible GPUs that no other process holds; the claim lasts until this
    process exits (a second call returns the same claim). With every GPU held, wait for one (``wait``), or
    raise UserError."""
    from negmargin.errors import UserError

    folder = Path(lock_dir) if lock_dir is not None else gpu_lock_dir()
    if folder in _held:
        return _held[folder][0]
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # sticky and writable for all, as /tmp: other users' jobs lock here too
            os.chmod(folder, 0o1777)
    names = visible_gpu_names(count, visible)
    waiting = False
    while True:
        for index, name in enumerate(names):
            descriptor = _lock_file(_lock_path(folder, name))
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                continue
            claim = GpuClaim(index, name, _lock_path(folder, name))
            _held[folder] = (claim, descriptor)
            print(f"using GPU {index} of {count} (cuda:{index}, device {name}; claimed with {claim.lock})",
                  file=sys.stderr, flush=True)
            return claim
        if not wait:
            raise UserError(f"all {count} GPUs are claimed by other jobs (lock files in {folder}); run fewer GPU "
                            f"jobs at once (snakemake --resources gpu={count})")
        if not waiting:
            print(f"all {count} GPUs are claimed by other jobs (lock files in {folder}); waiting for one to "
                  "come free", file=sys.stderr, flush=True)
            waiting = True
        time.sleep(poll)


def release_gpu(lock_dir: Path | None = None) -> None:
    """Give up this process's claim early (tests; a job's claim otherwise ends with the process)."""
    folder = Path(lock_dir) if lock_dir is not None else gpu_lock_dir()
    if folder in _held:
        _, descriptor = _held.pop(folder)
        os.close(descriptor)  # closing the last descriptor releases the flock


class EpochProgress:
    """A tqdm bar on a terminal; plain log lines (every ``every`` iterations) otherwise."""

    def __init__(self, total: int, epoch: int, epochs: int, every: int) -> None:
        self.tty = sys.stderr.isatty()
        self.total, self.epoch, self.epochs, self.every = total, epoch, epochs, max(1, every)
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="it", leave=False)

    def update(self, iteration: int, loss: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_s:.0f}")
        elif iteration % self.every == 0 or iteration == self.total:
            print(
                f"epoch {self.epoch}/{self.epochs} iter {iteration}/{self.total} loss {loss:.4f} "
                f"img/s {images_per_s:.0f}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""What every verb needs from its surroundings: the torch device, CPU threads, and progress display.

Progress shows as a tqdm bar on a terminal and as plain lines otherwise (logs of workflow jobs), on stderr.
"""

from __future__ import annotations

import sys
import time
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
    """``auto`` (CUDA where there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    from negmargin.errors import UserError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return torch.device(device)


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

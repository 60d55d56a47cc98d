"""A new preparation replaces the one in ``out`` only once it is complete.

``negmargin prepare`` writes every split and ``prepared.json`` into a staging folder inside ``out``
(``out/.prepare-XXXX.new``, the same file system, so the final step is a handful of renames). Only when the
dataset module has returned does the staged preparation take the place of the old one: the old
``prepared.json`` goes first, then the old entries of the same names (and the split folders the old
``prepared.json`` names), then the new entries come in, ``prepared.json`` last. A re-run that fails before
that point (bad archive, full disk, Ctrl-C) leaves the earlier preparation exactly as it was.

The price: while a dataset is re-prepared, the old and the new preparation are both on disk.

No numpy or torch: the standard library and negmargin.io only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREPARED = "prepared.json"
STAGING_PREFIX = ".prepare-"


def _old_split_folders(out: Path) -> list[str]:
    """The split folders the preparation now in ``out`` names (its ``prepared.json``), where it can be read."""
    try:
        splits = json.loads((out / PREPARED).read_text(encoding="utf-8")).get("splits", {})
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in splits if isinstance(name, str) and name and os.sep not in name and name[0] != "."]


def _remove_leftovers(out: Path) -> None:
    """Staging folders of a run that was killed before it could clean up (SIGKILL, power loss)."""
    for leftover in out.glob(f"{STAGING_PREFIX}*"):
        if leftover.is_dir():
            print(f"removing {leftover}, left by an interrupted preparation", file=sys.stderr, flush=True)
            shutil.rmtree(leftover, ignore_errors=True)


def swap_in(staging: Path, out: Path) -> None:
    """Replace the preparation in ``out`` by the complete one in ``staging``; on a failed rename, put back
    what was moved and raise."""
    from negmargin.io import write_error

    new_names = sorted(entry.name for entry in staging.iterdir())
    if PREPARED not in new_names:
        raise ValueError(f"{staging}: the staged preparation has no {PREPARED}")
    old_names = {PREPARED, *_old_split_folders(out), *new_names}
    aside = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".old", dir=out))
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        # prepared.json first: from here until the new one lands, out does not claim to hold a whole preparation.
        for name in sorted(old_names, key=lambda n: n != PREPARED):
            if (out / name).exists() or (out / name).is_symlink():
                os.replace(out / name, aside / name)
                moved_aside.append(name)
        for name in sorted(new_names, key=lambda n: n == PREPARED):
            os.replace(staging / name, out / name)
            moved_in.append(name)
    except OSError as exc:
        for name in reversed(moved_in):
            os.replace(out / name, staging / name)
        for name in reversed(moved_aside):
            os.replace(aside / name, out / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise write_error(out / PREPARED, exc) from None
    shutil.rmtree(aside, ignore_errors=True)


def prepare_replacing(prepare: Callable[..., dict[str, Any]], out: str | os.PathLike, *args: Any) -> dict[str, Any]:
    """Run a dataset's ``prepare(folder, *args)`` into a staging folder in ``out``, then swap it in.
    Returns the preparation summary (``prepared.json``)."""
    from negmargin.io import write_error

    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".new", dir=out))
    except OSError as exc:
        raise write_error(out, exc) from None
    try:
        summary = prepare(staging, *args)
        swap_in(staging, out)
        return summary
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # a first preparation that failed leaves no folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

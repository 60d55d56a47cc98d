"""Atomic file output and checksums.

Every file the package writes goes through these helpers: the content lands in a temporary file in the
destination folder and is renamed into place, so a crash never leaves a partial file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path, directory: bool = False) -> None:
    """Give a temp file or folder the mode a plain open()/mkdir() would have (mkstemp makes it private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        publish_mode(tmp_path)
        os.replace(tmp_path, path)
    except OSError as exc:
        # A full disk (ENOSPC), a quota (EDQUOT), a file-size limit (EFBIG), a read-only mount (EROFS):
        # one line naming the file; the previous version of ``path`` is untouched.
        raise write_error(path, exc) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# Errors of a write the disk refused: full, over quota, over the file-size limit, read-only.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
WRITE_ERRNOS = (*FULL_ERRNOS, errno.EROFS)


def write_error(path: str | os.PathLike, exc: OSError) -> Exception:
    """The UserError for a failed write of ``path``: the file, the system's reason, and what to check."""
    from negmargin.errors import UserError

    reason = exc.strerror or str(exc)
    hint = " (free some space, or raise the quota or file-size limit, then run again)" if exc.errno in (
        FULL_ERRNOS) else ""
    return UserError(f"cannot write {path}: {reason}{hint}; the previous version, if any, is unchanged")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """An uncompressed .npz as ``np.savez`` writes it, but byte-identical for identical arrays: the zip
    entries carry a fixed date instead of the time of writing, so two runs give the same file (and hash)."""
    import zipfile

    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, value in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(entry, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(value), allow_pickle=False)


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    # Serialise in memory, then write with Python's file I/O: torch's own file writer reports a full disk
    # as a RuntimeError about zip positions, this way it is an OSError naming the file.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(buffer.getbuffer())


def torch_load_weights_only(path: str | os.PathLike, allowed: Sequence[Any] = (),
                            accepted: str = "tensors and plain containers only", advice: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with the extra safe globals ``allowed``.

    A UserError of one line naming the file when it is missing, when it holds a pickled object beyond
    tensors, plain containers and ``allowed`` (its code never runs; ``accepted`` says what is, ``advice``
    what to do), or when it is not a readable torch file (truncated, another format)."""
    import pickle
    import re

    import torch

    from negmargin.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds here
        text = str(exc)
        # torch names the refused global ("GLOBAL posix.system") or the callable it would have run; any other
        # unpickling failure ("Unsupported operand 110") means bytes that are not a pickle at all.
        found = re.search(r"GLOBAL (\S+)", text) or re.search(r"function (<[^>]+>|\S+)", text)
        if isinstance(exc, pickle.UnpicklingError) and (found or "global" in text.lower()):
            named = f" ({found.group(1)})" if found else ""
            raise UserError(f"{path}: refused: it holds a pickled Python object{named}, and checkpoints are "
                            f"loaded with weights_only=True ({accepted}){advice}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("Unsupported operand")), lines[0] if lines else "")
        raise UserError(f"{path}: not a readable checkpoint, truncated or not a torch file "
                        f"({type(exc).__name__}: {detail.split('. ')[0][:200]})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    from negmargin.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (expected a JSON file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_features(path: str | os.PathLike, require_class_names: bool = True) -> dict[str, Any]:
    """Read a feature file (``features`` [N, D], ``labels`` [N], ``class_names`` [C]); UserError if malformed.

    ``require_class_names=False`` accepts files with only ``features`` and ``labels`` (the meta-test's
    contract); ``class_names`` is then absent from the result and labels are only checked to be >= 0.
    """
    import numpy as np

    from negmargin.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: feature file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # zipfile/numpy raise many kinds: all mean "not a readable .npz"
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    required = ("features", "labels", "class_names") if require_class_names else ("features", "labels")
    missing = [key for key in required if key not in arrays]
    if missing:
        raise UserError(f"{path}: missing arrays {', '.join(missing)} (expected {', '.join(required)}; "
                        f"found {', '.join(arrays) or 'none'})")
    features, labels = arrays["features"], arrays["labels"]
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise UserError(f"{path}: expected features [N, D] and labels [N], got {features.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: labels must be integers, got {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise UserError(f"{path}: labels must be >= 0")
    if len(labels) and "class_names" in arrays and labels.max() >= len(arrays["class_names"]):
        raise UserError(f"{path}: labels outside 0..{len(arrays['class_names']) - 1} (the class_names)")
    result = {"features": features.astype(np.float32, copy=False), "labels": labels.astype(np.int64, copy=False)}
    if "class_names" in arrays:
        result["class_names"] = arrays["class_names"].astype(str)
    _require_finite(path, result)
    return result


def _require_finite(path: Path, bank: dict[str, Any]) -> None:
    """A NaN or Inf feature turns every cosine it enters into NaN, and argmax then picks class 0: the
    meta-test would print an accuracy that means nothing. Refuse the file instead, naming the first bad row."""
    import numpy as np

    from negmargin.errors import UserError

    finite_rows = np.isfinite(bank["features"]).all(axis=1)
    if finite_rows.all():
        return
    bad = np.flatnonzero(~finite_rows)
    first = int(bad[0])
    label = int(bank["labels"][first])
    name = f" ({bank['class_names'][label]})" if "class_names" in bank else ""
    raise UserError(
        f"{path}: {len(bad)} of {len(finite_rows)} feature rows hold NaN or Inf (first: row {first}, class "
        f"{label}{name}); extract the features again from a checkpoint whose training did not diverge"
    )

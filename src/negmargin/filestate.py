"""A manifest of the workflow's files (size, modification time, SHA-256), and restoring those times.

Snakemake decides what to re-run by comparing modification times: an input newer than an output means the
output is stale. Files that come back from ``dvc pull``, ``dvc checkout`` or ``git clone`` all get the time
of the restore, in whatever order they were written, so a complete, consistent set of results would look
stale and Snakemake would retrain. ``resources/`` is recorded too: git gives the embedded Omniglot archive,
the first input of the DAG, the time of the clone. After every successful run the Snakefile records the manifest
(``results/mtimes.json``, tracked by DVC with the results); before building its DAG it puts back the
recorded time of every file whose **content** is byte-identical to what was recorded. A file whose content
differs keeps its new time, so a real change still re-runs everything downstream of it.

Standard library only: the Snakefile imports this module in whatever environment runs Snakemake.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from negmargin.io import sha256_file, write_json

MANIFEST = "results/mtimes.json"
ROOTS = ("data", "results", "resources")
# Raw downloads are not workflow outputs (and can be tens of GB); report.html is rendered by
# `snakemake --report` outside the DAG.
EXCLUDE = ("data/raw",)
VERSION = 1


def _files(base: Path, roots: Iterable[str], skip: set[str]) -> Iterator[tuple[str, Path]]:
    for root in roots:
        top = base / root
        if not top.is_dir():
            continue
        for folder, dirs, names in os.walk(top):
            dirs.sort()
            rel_folder = Path(folder).relative_to(base).as_posix()
            if any(rel_folder == e or rel_folder.startswith(e + "/") for e in EXCLUDE):
                dirs.clear()
                continue
            for name in sorted(names):
                # temporary files of an atomic write in progress (negmargin.io) are never recorded
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                rel = f"{rel_folder}/{name}"
                if rel not in skip:
                    yield rel, Path(folder, name)


def read_manifest(path: Path) -> dict[str, dict]:
    """The recorded entries, or {} when there is no manifest or it is not one we wrote."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def record(base: str | os.PathLike, manifest: str = MANIFEST, roots: Iterable[str] = ROOTS) -> int:
    """Write the manifest of every file under ``roots``; returns the number of files recorded.

    A file whose size and time equal the previous manifest's keeps its recorded digest, so only files
    written since the last record are read.
    """
    base = Path(base)
    out = base / manifest
    previous = read_manifest(out)
    files = {}
    for rel, path in _files(base, roots, skip={manifest}):
        st = path.stat()
        old = previous.get(rel)
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            digest = old["sha256"]
        else:
            digest = sha256_file(path)
        files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    write_json(out, {"version": VERSION, "files": files})
    return len(files)


def restore(base: str | os.PathLike, manifest: str = MANIFEST) -> tuple[int, int]:
    """Put back the recorded time of every file whose content matches the manifest.

    Returns (restored, differing): the files whose time was reset, and the files whose time differs but
    whose size or content does not match (left alone, so Snakemake sees them as changed).
    """
    base = Path(base)
    restored = differing = 0
    for rel, entry in read_manifest(base / manifest).items():
        if ".." in Path(rel).parts or not any(rel.startswith(root + "/") for root in ROOTS):
            continue  # only files of the workflow's own folders
        path = base / rel
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_mtime_ns == entry.get("mtime_ns"):
            continue
        if st.st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            differing += 1
            continue
        os.utime(path, ns=(st.st_atime_ns, entry["mtime_ns"]))
        restored += 1
    return restored, differing


def restore_and_report(base: str | os.PathLike, manifest: str = MANIFEST) -> None:
    """:func:`restore`, with one line on stderr saying what it did (nothing when there was nothing to do)."""
    restored, differing = restore(base, manifest)
    if restored or differing:
        print(
            f"{manifest}: restored the recorded modification time of {restored} file(s) whose content is "
            f"unchanged; {differing} file(s) differ from the record and keep their new time.",
            file=sys.stderr,
        )

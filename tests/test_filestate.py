"""negmargin.filestate: the manifest of modification times, and putting them back after a restore."""

from __future__ import annotations

import json
import os
import shutil

from negmargin import filestate


def _tree(base):
    for rel, text in {"data/omniglot/prepared.json": "{}", "data/omniglot/base/labels.npy": "0123",
                      "results/omniglot/conv4/m0.0/s0/train/train.json": '{"a": 1}',
                      "results/metrics.json": '{"m": 2}', "resources/omniglot/omniglot_105.npz": "npz",
                      "data/raw/cub.tgz": "raw"}.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    # distinct, ordered times, as a finished run leaves them
    for index, path in enumerate(sorted(p for p in base.rglob("*") if p.is_file())):
        os.utime(path, ns=(1_000_000_000 * (index + 1),) * 2)


def _times(base):
    return {p.relative_to(base).as_posix(): p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}


def test_record_then_restore_after_every_file_was_rewritten(tmp_path):
    _tree(tmp_path)
    assert filestate.record(tmp_path) == 5  # data/raw is left out
    manifest = json.loads((tmp_path / filestate.MANIFEST).read_text())
    assert "data/raw/cub.tgz" not in manifest["files"] and filestate.MANIFEST not in manifest["files"]
    recorded = {rel: entry["mtime_ns"] for rel, entry in manifest["files"].items()}

    # what `dvc pull` / `git clone` does: the same bytes, written anew, at "now"
    clone = tmp_path / "clone"
    shutil.copytree(tmp_path, clone, ignore=shutil.ignore_patterns("clone"))
    for path in clone.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes())
    assert all(_times(clone)[rel] != mtime for rel, mtime in recorded.items())

    assert filestate.restore(clone) == (5, 0)
    assert {rel: _times(clone)[rel] for rel in recorded} == recorded
    assert filestate.restore(clone) == (0, 0)  # nothing left to do


def test_a_changed_file_keeps_its_new_time(tmp_path):
    _tree(tmp_path)
    filestate.record(tmp_path)
    changed = tmp_path / "results/metrics.json"
    changed.write_text('{"m": 3}')  # same size, other content
    new_time = changed.stat().st_mtime_ns
    resized = tmp_path / "data/omniglot/prepared.json"
    resized.write_text("{ }")
    assert filestate.restore(tmp_path) == (0, 2)
    assert changed.stat().st_mtime_ns == new_time


def test_record_reuses_digests_of_unchanged_files(tmp_path):
    _tree(tmp_path)
    filestate.record(tmp_path)
    manifest = tmp_path / filestate.MANIFEST
    entries = json.loads(manifest.read_text())["files"]
    # a stale digest for an unchanged file (same size and time) is kept: the file is not read again
    entries["results/metrics.json"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps({"version": filestate.VERSION, "files": entries}))
    filestate.record(tmp_path)
    assert json.loads(manifest.read_text())["files"]["results/metrics.json"]["sha256"] == "0" * 64
    # a rewritten file is hashed again
    (tmp_path / "results/metrics.json").write_text('{"m": 2}')
    filestate.record(tmp_path)
    assert json.loads(manifest.read_text())["files"]["results/metrics.json"]["sha256"] != "0" * 64


def test_temporary_files_and_foreign_manifests_are_ignored(tmp_path):
    _tree(tmp_path)
    (tmp_path / "results/.metrics.json.abc.tmp").write_text("partial")
    filestate.record(tmp_path)
    assert not any(".tmp" in rel for rel in json.loads((tmp_path / filestate.MANIFEST).read_text())["files"])
    # a manifest naming a path outside the workflow's folders is not followed
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    before = outside.stat().st_mtime_ns
    (tmp_path / filestate.MANIFEST).write_text(json.dumps({"version": filestate.VERSION, "files": {
        "results/../outside.txt": {"size": 1, "mtime_ns": 5, "sha256": "x"}}}))
    assert filestate.restore(tmp_path) == (0, 0) and outside.stat().st_mtime_ns == before
    # no manifest, or not ours: nothing happens
    (tmp_path / filestate.MANIFEST).write_text("not json")
    assert filestate.restore(tmp_path) == (0, 0)

"""negmargin.io: atomic writes, deterministic .npz, checksums and the one reader of feature files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from negmargin.errors import UserError
from negmargin.io import atomic_path, load_features, read_json, sha256_file, write_json, write_npz


def test_atomic_path_leaves_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_npz_files_are_byte_identical_for_identical_arrays(tmp_path):
    arrays = {"features": np.arange(12, dtype=np.float32).reshape(3, 4), "labels": np.array([0, 1, 0])}
    write_npz(tmp_path / "a.npz", **arrays)
    write_npz(tmp_path / "b.npz", **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert sha256_file(tmp_path / "a.npz") == hashlib.sha256((tmp_path / "a.npz").read_bytes()).hexdigest()


def test_load_features_checks_shapes_labels_and_names(tmp_path):
    good = tmp_path / "good.npz"
    write_npz(good, features=np.ones((3, 2), np.float64), labels=np.array([0, 1, 1]), class_names=np.array(["x", "y"]))
    bank = load_features(good)
    assert bank["features"].dtype == np.float32 and bank["class_names"].tolist() == ["x", "y"]
    cases = {
        "missing arrays class_names": dict(features=np.ones((2, 2)), labels=np.array([0, 1])),
        "expected features \\[N, D\\] and labels \\[N\\]": dict(features=np.ones(2), labels=np.array([0, 1]),
                                                              class_names=np.array(["x", "y"])),
        "labels must be integers": dict(features=np.ones((2, 2)), labels=np.array([0.0, 1.0]),
                                        class_names=np.array(["x", "y"])),
        "labels outside 0..0": dict(features=np.ones((2, 2)), labels=np.array([0, 1]), class_names=np.array(["x"])),
    }
    for message, arrays in cases.items():
        path = tmp_path / "bad.npz"
        write_npz(path, **arrays)
        with pytest.raises(UserError, match=message):
            load_features(path)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_features(tmp_path / "text.npz")


def test_read_json_names_the_file(tmp_path):
    (tmp_path / "x.json").write_text("{broken")
    with pytest.raises(UserError, match=r"x.json: not valid JSON"):
        read_json(tmp_path / "x.json")
    with pytest.raises(UserError, match=r"missing.json: file not found"):
        read_json(tmp_path / "missing.json")

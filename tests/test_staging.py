"""negmargin.data.staging through `negmargin prepare`: a re-preparation that fails leaves the earlier one byte for
byte; one that succeeds replaces it whole, stale split folders included."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from archives import make_cub_tgz

from negmargin.cli import main

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO / "resources" / "omniglot" / "omniglot_105.npz"


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path (hidden entries included)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def cub_sources(tmp_path_factory) -> dict[str, Path]:
    """A good CUB folder and a copy whose one novel-class image is garbage (the last split written fails)."""
    root = tmp_path_factory.mktemp("cub")
    make_cub_tgz(root / "CUB_200_2011.tgz", [1, 2, 3, 4, 5, 6, 8], images_per_class=5)
    for name in ("good", "bad"):
        with tarfile.open(root / "CUB_200_2011.tgz") as tar:
            tar.extractall(root / name, filter="data")
    novel_image = sorted((root / "bad" / "CUB_200_2011" / "images" / "008.Rhinoceros_Auklet").iterdir())[1]
    novel_image.write_bytes(b"not a JPEG at all" * 8)
    return {"good": root / "good", "bad": root / "bad", "bad_image": novel_image}


def _prepare_cub(source: Path, out: Path, image_size: int) -> list[str]:
    return ["prepare", "cub", "--source", str(source), "--out", str(out), "--raw-dir", str(out.parent / "raw"),
            "--fixture", "--image-size", str(image_size), "--base-holdout", "2", "--workers", "1"]


def test_a_failed_re_preparation_leaves_the_earlier_one_byte_for_byte(cub_sources, tmp_path, capsys):
    out = tmp_path / "data" / "cub"
    assert main(_prepare_cub(cub_sources["good"], out, 16)) == 0
    before = snapshot(out)
    assert {"prepared.json", "base/images.npy", "novel/meta.json"} <= set(before)
    capsys.readouterr()

    # Another image size, from a source whose novel split (written last) holds an unreadable image.
    assert main(_prepare_cub(cub_sources["bad"], out, 24)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("negmargin prepare: error: ") and str(cub_sources["bad_image"]) in err
    assert snapshot(out) == before  # prepared.json and all four splits, unchanged; no staging folder left

    # The same failure as the first preparation of a folder: nothing that looks like a preparation appears.
    fresh = tmp_path / "data" / "fresh"
    assert main(_prepare_cub(cub_sources["bad"], fresh, 24)) == 2
    assert snapshot(fresh) == {}


def test_a_completed_re_preparation_replaces_the_old_one_whole(tmp_path, capsys):
    out = tmp_path / "omniglot"
    base = ["prepare", "omniglot", "--source", str(OMNIGLOT), "--out", str(out), "--max-classes", "6"]
    assert main([*base, "--base-holdout", "4"]) == 0
    first = snapshot(out)
    assert "base_holdout/images.npy" in first
    # Without held-out drawings there is no base_holdout split: the old one must not linger beside the new.
    assert main([*base, "--base-holdout", "0"]) == 0
    second = snapshot(out)
    assert not any(name.startswith("base_holdout/") for name in second)
    assert second["base/images.npy"] != first["base/images.npy"]  # 20 drawings per class instead of 16
    assert sorted({name.split("/")[0] for name in second}) == ["base", "novel", "prepared.json", "val"]


def test_a_staging_folder_left_by_a_killed_run_is_removed(tmp_path, capsys):
    out = tmp_path / "omniglot"
    leftover = out / ".prepare-abc123.new" / "base"
    leftover.mkdir(parents=True)
    (leftover / "images.npy").write_bytes(b"\0" * 1024)
    assert main(["prepare", "omniglot", "--source", str(OMNIGLOT), "--out", str(out), "--max-classes", "3"]) == 0
    assert f"removing {leftover.parent}, left by an interrupted preparation" in capsys.readouterr().err
    assert not leftover.parent.exists() and (out / "prepared.json").is_file()

"""CUB-200-2011 preparation from a tiny CUB_200_2011.tgz in the real layout (real class names)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from archives import cub_class_names, make_cub_tgz
from http_server import FileServer

from negmargin.cli import main
from negmargin.data.cub import committed_split, split_by_rule
from negmargin.data.store import load_split
from negmargin.datasets import prepare
from negmargin.errors import UserError

BASE_IDS, VAL_IDS, NOVEL_IDS = [1, 3, 5], [2, 6], [4, 8]
PER_CLASS = 6


@pytest.fixture(scope="module")
def cub_tgz(tmp_path_factory):
    path = tmp_path_factory.mktemp("cub") / "CUB_200_2011.tgz"
    colors = make_cub_tgz(path, sorted(BASE_IDS + VAL_IDS + NOVEL_IDS), images_per_class=PER_CLASS)
    return path, colors


def _names(ids):
    names = cub_class_names()
    return [names[i - 1] for i in ids]


def test_rule_matches_the_committed_and_torchmeta_lists():
    split = committed_split()
    assert [len(split[s]) for s in ("base", "val", "novel")] == [100, 50, 50]
    assert split["base"][:3] == ["001.Black_footed_Albatross", "003.Sooty_Albatross", "005.Crested_Auklet"]
    assert split["val"][0].startswith("002.") and split["novel"][0].startswith("004.")
    from negmargin.data.benchmark import split_file

    for ours, theirs in (("base", "train"), ("val", "val"), ("novel", "test")):
        assert split[ours] == json.loads(split_file(f"CUB/torchmeta/{theirs}.json"))
    assert split_by_rule(list(reversed(cub_class_names()))) == split  # the rule sorts first


def test_prepare_from_tgz(cub_tgz, tmp_path):
    tgz, colors = cub_tgz
    out = tmp_path / "cub"
    summary = prepare("cub",
        tgz, out, raw_dir=tmp_path / "raw", image_size=16, base_holdout=2, fixture=True
    )
    base, holdout = load_split(out / "base"), load_split(out / "base_holdout")
    val, novel = load_split(out / "val"), load_split(out / "novel")
    assert base.class_names == holdout.class_names == _names(BASE_IDS)
    assert val.class_names == _names(VAL_IDS) and novel.class_names == _names(NOVEL_IDS)
    assert (len(base), len(holdout), len(val), len(novel)) == (3 * 4, 3 * 2, 2 * PER_CLASS, 2 * PER_CLASS)
    assert np.bincount(holdout.labels).tolist() == [2, 2, 2]
    assert not set(base.image_ids) & set(holdout.image_ids)
    assert set(base.image_ids) | set(holdout.image_ids) == {k for k in colors if int(k[:3]) in BASE_IDS}
    for split in (base, holdout, val, novel):
        assert split.images.shape[1:] == (16, 16, 3) and split.pipeline == "imagenet84"
        for image, label, image_id in zip(split.images, split.labels, split.image_ids, strict=True):
            assert image_id.split("/")[0] == split.class_names[label]
            # The centre square only: the black side strips of the 48x32 original must be cropped away.
            expected = np.array(colors[image_id], dtype=np.int16)
            assert np.abs(image.astype(np.int16) - expected).max() <= 6, image_id
    # Classes are written in order, images within a class sorted by file name.
    assert base.image_ids == sorted(base.image_ids)
    prepared = json.loads((out / "prepared.json").read_text())
    assert prepared == summary
    assert prepared["source_md5"] == hashlib.md5(tgz.read_bytes()).hexdigest()
    assert prepared["splits"]["base"] == {"classes": 3, "images": 12}
    assert prepared["base_holdout"] == 2 and prepared["expect_full"] is False and prepared["image_size"] == 16


def test_holdout_choice_is_seeded(cub_tgz, tmp_path):
    tgz, _ = cub_tgz
    ids = []
    for seed in (0, 0, 1):
        out = tmp_path / f"cub{len(ids)}"
        prepare("cub",
            tgz, out, raw_dir=tmp_path / "raw", image_size=8, base_holdout=2, seed=seed, fixture=True
        )
        ids.append(load_split(out / "base_holdout").image_ids)
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_download_over_http_then_prepare(cub_tgz, tmp_path):
    tgz, _ = cub_tgz
    data = tgz.read_bytes()
    with FileServer() as server:
        url = server.add("/records/x/files/CUB_200_2011.tgz", data, mode="drop")
        summary = prepare("cub",
            url + "?download=1",
            tmp_path / "cub",
            raw_dir=tmp_path / "raw",
            md5=hashlib.md5(data).hexdigest(),
            size=len(data),
            image_size=8,
            base_holdout=1,
            fixture=True,
        )
        assert len(server.requests_for("/records/x/files/CUB_200_2011.tgz")) == 2  # dropped, then resumed
    assert (tmp_path / "raw" / "CUB_200_2011.tgz").read_bytes() == data
    assert (tmp_path / "raw" / "cub" / "CUB_200_2011" / "images").is_dir()
    assert summary["splits"]["val"] == {"classes": 2, "images": 12}


def test_production_path_asserts_the_real_dataset(cub_tgz, tmp_path):
    tgz, _ = cub_tgz
    # Without explicit checks the official archive's size (checked first: cheap) and md5 are required.
    with pytest.raises(UserError, match=f"size is {tgz.stat().st_size} bytes, expected 1150585339"):
        prepare("cub", tgz, tmp_path / "cub", raw_dir=tmp_path / "raw")
    md5 = hashlib.md5(tgz.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="7 class folders, expected 200"):
        prepare("cub", tgz, tmp_path / "cub", raw_dir=tmp_path / "raw", md5=md5)
    assert not (tmp_path / "cub").exists()


def test_folder_source_and_bad_folders(cub_tgz, tmp_path):
    tgz, _ = cub_tgz
    with tarfile.open(tgz) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    summary = prepare("cub", tmp_path / "src", tmp_path / "cub", image_size=8, base_holdout=1, fixture=True)
    assert summary["source_kind"] == "folder" and summary["source_sha256"] is None
    images = tmp_path / "src" / "CUB_200_2011" / "images"
    stray = images / "001.Black_footed_Albatross" / "stray.jpg"
    stray.write_bytes(b"x")
    with pytest.raises(UserError, match="does not match images.txt"):
        prepare("cub", tmp_path / "src", tmp_path / "cub2", fixture=True)
    stray.unlink()
    (images / "999.Dodo").mkdir()
    with pytest.raises(UserError, match="unknown class folder '999.Dodo'"):
        prepare("cub", tmp_path / "src", tmp_path / "cub2", fixture=True)
    (images / "999.Dodo").rmdir()
    with pytest.raises(UserError, match="too few to hold out 6"):
        prepare("cub", tmp_path / "src", tmp_path / "cub2", base_holdout=6, fixture=True)
    with pytest.raises(UserError, match="base_holdout must be >= 1, got 0"):
        prepare("cub", tmp_path / "src", tmp_path / "cub2", base_holdout=0, fixture=True)
    with pytest.raises(UserError, match="no CUB_200_2011/images"):
        prepare("cub", tmp_path, tmp_path / "cub2", fixture=True)


def test_cli_prepare_cub(cub_tgz, tmp_path, capsys):
    tgz, _ = cub_tgz
    out = tmp_path / "data" / "cub"
    code = main(
        [
            "prepare",
            "cub",
            "--source",
            str(tgz),
            "--raw-dir",
            str(tmp_path / "raw"),
            "--out",
            str(out),
            "--fixture",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "base: 3 classes, 3 images" in printed and "base_holdout: 3 classes, 15 images" in printed
    assert load_split(out / "base").images.shape[1:] == (96, 96, 3)  # the default size
    assert len(load_split(out / "base_holdout")) == 3 * 5  # the default hold-out: 5 per base class
    # Bad input: one line, exit 2, no traceback (a fresh process, as a user runs it).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "negmargin",
            "prepare",
            "cub",
            "--source",
            str(tmp_path / "nowhere.tgz"),
            "--out",
            str(tmp_path / "x"),
            "--fixture",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("negmargin prepare: error:") and "nowhere.tgz" in result.stderr


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting is refused at once, as with no route."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def announced_waits(stderr: str) -> float:
    """The seconds of back-off the download announced ('retrying in 0.5s')."""
    import re

    return sum(float(seconds) for seconds in re.findall(r"retrying in ([0-9.]+)s", stderr))


def test_offline_prepare_fails_fast_with_where_to_put_the_archive(cub_tgz, tmp_path):
    """Neither URL is reachable (a closed port; a host whose name does not resolve), with the default retries:
    the failure comes within seconds, in one line that says where the archive goes by hand; put there, it is
    used without a network. It used to take two minutes of silent retries (5 per URL, 2 to 32 s apart)."""
    import time

    raw = tmp_path / "raw"
    argv = [sys.executable, "-m", "negmargin", "prepare", "cub", "--source",
            f"http://127.0.0.1:{closed_port()}/records/x/files/CUB_200_2011.tgz?download=1",
            "--mirrors", "http://cub.invalid/CUB-200-2011/CUB_200_2011.tgz", "--raw-dir", str(raw),
            "--out", str(tmp_path / "cub"), "--fixture", "--image-size", "8", "--base-holdout", "1"]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("negmargin prepare: error: cannot download CUB_200_2011.tgz for cub; without a "
                           "network here, download http://127.0.0.1:")
    assert f"and put it at {raw / 'CUB_200_2011.tgz'}, or set datasets.cub.prepare.source (--source)" in last
    assert "cub.invalid" in last and "gave up after 5 attempts" in last
    assert announced_waits(result.stderr) <= 2 * 7.5  # 0.5 + 1 + 2 + 4 s per URL
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert not (tmp_path / "cub").exists()

    # Done as the line says: the archive put there by hand is used, still without a network.
    raw.mkdir(exist_ok=True)
    (raw / "CUB_200_2011.tgz").write_bytes(cub_tgz[0].read_bytes())
    subprocess.run(argv, capture_output=True, text=True, check=True)
    assert load_split(tmp_path / "cub" / "novel").class_names == _names(NOVEL_IDS)

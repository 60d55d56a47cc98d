"""mini-ImageNet preparation from a tiny ILSVRC-2012 train tar (tar of per-class tars), Ravi's images.zip
and folders, with the real Ravi CSVs."""

from __future__ import annotations

import csv
import tarfile
import zipfile

import numpy as np
import pytest
from archives import ilsvrc_color, make_ilsvrc_train_tar, make_ravi_zip, ravi_color, ravi_rows
from http_server import FileServer

from negmargin.cli import main
from negmargin.data.mini_imagenet import (
    ILSVRC_TRAIN_MD5,
    ravi_position,
    sorted_class_files,
)
from negmargin.data.store import load_split
from negmargin.datasets import prepare
from negmargin.errors import UserError

# Numeric order 1,2,3,5,9,10,... differs from lexicographic order 1,10,100,101,11,... of the file names.
NUMBERS = [1, 2, 3, 5, 9, 10, 11, 12, 20, 100, 101, 200]
TRAIN = ["n04258138", "n02606052"]  # train.csv order: n02606052 comes first
VAL = ["n09256479", "n02174001"]
TEST = ["n01930112", "n04418357"]
DECOY = "n01440764"  # an ImageNet class that is not in mini-ImageNet
CLASSES = {wnid: NUMBERS for wnid in [*TRAIN, *VAL, *TEST, DECOY]}
CLASS_NUMBER = {wnid: i for i, wnid in enumerate(CLASSES)}


def csv_order(split: str, wnids: list[str]) -> list[str]:
    order = list(dict.fromkeys(w for _, w in ravi_rows(split)))
    return sorted(wnids, key=order.index)


def listed_positions(split: str, wnid: str) -> list[int]:
    """1-based positions of the class's CSV rows that fit in the fixture's 12 files, CSV order."""
    return [p for f, w in ravi_rows(split) if w == wnid and (p := ravi_position(f)[1]) <= len(NUMBERS)]


@pytest.fixture(scope="module")
def ilsvrc_tar(tmp_path_factory):
    path = tmp_path_factory.mktemp("imagenet") / "ILSVRC2012_img_train.tar"
    return path, make_ilsvrc_train_tar(path, CLASSES)


def _close(image: np.ndarray, color, tolerance: int = 4) -> bool:
    return int(np.abs(image.astype(np.int16) - np.array(color, dtype=np.int16)).max()) <= tolerance


def test_mapping_rule_helpers():
    assert ravi_position("n0153282900000005.jpg") == ("n01532829", 5)
    names = [f"n01532829_{n}.JPEG" for n in (10, 2, 100, 1)]
    assert sorted_class_files(names) == [f"n01532829_{n}.JPEG" for n in (1, 2, 10, 100)]


def test_prepare_from_ilsvrc_train_tar(ilsvrc_tar, tmp_path):
    tar, colors = ilsvrc_tar
    out = tmp_path / "mini"
    summary = prepare("mini_imagenet", tar, out, image_size=16, fixture=True)
    base, holdout = load_split(out / "base"), load_split(out / "base_holdout")
    val, novel = load_split(out / "val"), load_split(out / "novel")
    assert base.class_names == holdout.class_names == csv_order("train", TRAIN)
    assert val.class_names == csv_order("val", VAL) and novel.class_names == csv_order("test", TEST)
    assert DECOY not in base.class_names + val.class_names + novel.class_names
    numeric = sorted(NUMBERS)
    lexicographic = sorted(NUMBERS, key=str)
    picked_differently = 0
    for split, csv_split in ((base, "train"), (val, "val"), (novel, "test")):
        expected_ids = []
        for wnid in split.class_names:
            for position in listed_positions(csv_split, wnid):
                expected_ids.append(f"{wnid}_{numeric[position - 1]}.JPEG")
                picked_differently += numeric[position - 1] != lexicographic[position - 1]
        assert split.image_ids == expected_ids
        for image, label, image_id in zip(split.images, split.labels, split.image_ids, strict=True):
            wnid, number = image_id.split("_")[0], int(image_id.split("_")[1].split(".")[0])
            assert split.class_names[label] == wnid
            # The pixels are those of the file the rule names, not of its lexicographic neighbour.
            assert _close(image, ilsvrc_color(CLASS_NUMBER[wnid], number)), image_id
            assert _close(image, colors[image_id])
    assert picked_differently > 5
    # base_holdout: the base-class files train.csv does not list (the paper's base_val), all of them.
    for label, wnid in enumerate(holdout.class_names):
        used = set(listed_positions("train", wnid))
        expected = [f"{wnid}_{numeric[i]}.JPEG" for i in range(len(NUMBERS)) if i + 1 not in used]
        assert [
            i for i, lab in zip(holdout.image_ids, holdout.labels, strict=True) if lab == label
        ] == expected
    assert not set(base.image_ids) & set(holdout.image_ids)
    with open(out / "ravi_to_ilsvrc.csv") as handle:
        mapping = list(csv.DictReader(handle))
    assert len(mapping) == len(base) + len(val) + len(novel)
    for row in mapping:
        wnid, position = ravi_position(row["ravi_filename"])
        assert row["ilsvrc_filename"] == f"{wnid}_{numeric[position - 1]}.JPEG"
    assert summary["source_kind"] == "ilsvrc-train-tar" and summary["base_holdout"] is None
    assert summary["splits"]["base_holdout"]["images"] == len(holdout)


def test_ilsvrc_holdout_count_and_folder_layouts_agree(ilsvrc_tar, tmp_path):
    tar, _ = ilsvrc_tar
    prepare("mini_imagenet", tar, tmp_path / "a", image_size=12, base_holdout=2, fixture=True)
    holdout = load_split(tmp_path / "a" / "base_holdout")
    assert np.bincount(holdout.labels).tolist() == [2, 2]
    # The same images from the extracted folder layout (train/<wnid>/...) and from a folder of class tars.
    with tarfile.open(tar) as outer:
        outer.extractall(tmp_path / "tars", filter="data")
    for wnid_tar in (tmp_path / "tars").iterdir():
        with tarfile.open(wnid_tar) as inner:
            inner.extractall(tmp_path / "folder" / "train" / wnid_tar.stem, filter="data")
    for source in (tmp_path / "tars", tmp_path / "folder"):
        out = tmp_path / source.name / "prepared"
        prepare("mini_imagenet", source, out, image_size=12, base_holdout=2, fixture=True)
        for split in ("base", "base_holdout", "val", "novel"):
            ours, theirs = load_split(out / split), load_split(tmp_path / "a" / split)
            assert ours.image_ids == theirs.image_ids and np.array_equal(ours.images, theirs.images)


def _ravi_names() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for split, wnids, count in (("train", TRAIN, 8), ("val", VAL[:1], 4), ("test", TEST[:1], 4)):
        for wnid in wnids:
            names[wnid] = [f for f, w in ravi_rows(split) if w == wnid][:count]
    return names


def test_prepare_from_ravi_zip(tmp_path):
    names = _ravi_names()
    ordered = [n for group in names.values() for n in group]
    colors = make_ravi_zip(tmp_path / "images.zip", ordered)
    out = tmp_path / "mini"
    summary = prepare("mini_imagenet", tmp_path / "images.zip", out, base_holdout=2, fixture=True)
    base, holdout = load_split(out / "base"), load_split(out / "base_holdout")
    val, novel = load_split(out / "val"), load_split(out / "novel")
    assert base.class_names == holdout.class_names == csv_order("train", TRAIN)
    assert val.class_names == VAL[:1] and novel.class_names == TEST[:1]
    assert (len(base), len(holdout), len(val), len(novel)) == (12, 4, 4, 4)
    assert not set(base.image_ids) & set(holdout.image_ids)
    assert set(base.image_ids) | set(holdout.image_ids) == set(names[TRAIN[0]] + names[TRAIN[1]])
    for split in (base, holdout, val, novel):
        assert split.images.shape[1:] == (84, 84, 3)  # Ravi's images keep their 84 pixels by default
        for image, label, image_id in zip(split.images, split.labels, split.image_ids, strict=True):
            assert image_id.startswith(split.class_names[label])
            assert _close(image, colors[image_id]) and _close(image, ravi_color(ordered.index(image_id)))
    assert summary["source_kind"] == "ravi-zip" and summary["ravi_zip_stated_md5_matches"] is False


def test_ravi_folder_and_url(tmp_path):
    names = [n for group in _ravi_names().values() for n in group]
    make_ravi_zip(tmp_path / "images.zip", names)
    with zipfile.ZipFile(tmp_path / "images.zip") as archive:
        archive.extractall(tmp_path / "folder")
    prepare("mini_imagenet",
        tmp_path / "folder", tmp_path / "a", image_size=8, fixture=True, base_holdout=1
    )
    with FileServer() as server:
        url = server.add("/mini/images.zip", (tmp_path / "images.zip").read_bytes())
        summary = prepare("mini_imagenet",
            url, tmp_path / "b", raw_dir=tmp_path / "raw", image_size=8, fixture=True, base_holdout=1
        )
    assert (tmp_path / "raw" / "images.zip").is_file() and summary["source_md5"]
    for split in ("base", "base_holdout", "val", "novel"):
        a, b = load_split(tmp_path / "a" / split), load_split(tmp_path / "b" / split)
        assert a.image_ids == b.image_ids and np.array_equal(a.images, b.images)


def test_no_source_explains_how_to_get_imagenet(tmp_path):
    for source in (None, "", tmp_path / "ILSVRC2012_img_train.tar"):
        with pytest.raises(UserError) as info:
            prepare("mini_imagenet", source, tmp_path / "mini")
        message = str(info.value)
        assert "https://image-net.org/" in message and ILSVRC_TRAIN_MD5 in message
        assert "ILSVRC2012_img_train.tar" in message and "images.zip" in message
        assert "datasets.mini_imagenet.prepare.source" in message


def test_production_path_asserts(ilsvrc_tar, tmp_path):
    tar, _ = ilsvrc_tar
    with pytest.raises(UserError, match=f"expected {ILSVRC_TRAIN_MD5}"):
        prepare("mini_imagenet", tar, tmp_path / "mini")
    with pytest.raises(UserError, match="class n0.* not found"):
        prepare("mini_imagenet",
            tar, tmp_path / "mini", size=tar.stat().st_size
        )  # explicit check: no md5 default
    make_ravi_zip(tmp_path / "images.zip", ["n0153282900000005.jpg"])
    with pytest.raises(UserError, match=r"n0\d+\.jpg \(train.csv\) not found"):
        prepare("mini_imagenet", tmp_path / "images.zip", tmp_path / "mini")
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as handle:
        handle.add(tmp_path / "images.zip", arcname="images.zip")
    with pytest.raises(UserError, match="without per-class tars"):
        prepare("mini_imagenet", other, tmp_path / "mini", fixture=True)
    assert not (tmp_path / "mini").exists()


def test_cli_prepare_mini_imagenet(ilsvrc_tar, tmp_path, capsys):
    tar, _ = ilsvrc_tar
    out = tmp_path / "mini"
    assert (
        main(
            [
                "prepare",
                "mini-imagenet",
                "--source",
                str(tar),
                "--out",
                str(out),
                "--fixture",
                "--image-size",
                "16",
                "--base-holdout",
                "3",
            ]
        )
        == 0
    )
    assert "base_holdout: 2 classes, 6 images" in capsys.readouterr().out
    assert load_split(out / "base").images.shape[1:] == (16, 16, 3)
    assert main(["prepare", "mini-imagenet", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("negmargin prepare: error: no mini-ImageNet source configured")

"""tiered-ImageNet preparation from a tiny tiered-imagenet.tar in Ren et al.'s format (PNG pickles + labels)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from archives import make_tiered_tar, tiered_pixels

from negmargin.cli import main
from negmargin.data.store import load_split
from negmargin.data.tiered_imagenet import SplitNames, safe_load_pickle
from negmargin.datasets import DATASETS, prepare
from negmargin.errors import UserError

TIERED_MD5 = DATASETS["tiered_imagenet"].archive.md5

# Two train categories, one of them with a name the pickles cut to 46 characters ("protective covering, ...").
CLASSES = {
    "train": ["n02840245", "n01530575", "n02825657"],  # binder, brambling, bell cote (not CSV order)
    "val": ["n02099429", "n02099267"],
    "test": ["n02788148", "n03314780"],  # bannister ("obstruction, ... impedimen" cut), face powder
}
PER_CLASS = 5
SPLIT_NUMBER = {"train": 0, "val": 1, "test": 2}


def csv_order(split: str) -> list[str]:
    return [s for s, _ in SplitNames(split).rows if s in CLASSES[split]]


@pytest.fixture(scope="module")
def tiered_tar(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiered") / "tiered-imagenet.tar"
    return path, make_tiered_tar(path, CLASSES, images_per_class=PER_CLASS)


def test_names_resolve_words_and_cut_categories():
    names = SplitNames("train")
    assert names.class_synset("bell cote, bell cot") == "n02825657"
    assert names.class_synset("n02825657") == "n02825657"
    assert names.class_synset("flat-coated retriever") is None  # a val class
    assert names.category_synset("protective covering, protective cover, protect") == "n04014297"
    assert names.category_synset("passerine, passeriform bird") == "n01524359"
    assert names.category_synset("pro") is None


def test_prepare_from_tar(tiered_tar, tmp_path):
    tar, image_classes = tiered_tar
    out = tmp_path / "tiered"
    summary = prepare("tiered_imagenet", tar, out, base_holdout=1, fixture=True)
    splits = {name: load_split(out / name) for name in ("base", "base_holdout", "val", "novel")}
    assert splits["base"].class_names == splits["base_holdout"].class_names == csv_order("train")
    assert splits["val"].class_names == csv_order("val") and splits["novel"].class_names == csv_order("test")
    assert [len(s) for s in splits.values()] == [3 * (PER_CLASS - 1), 3, 2 * PER_CLASS, 2 * PER_CLASS]
    assert np.bincount(splits["base_holdout"].labels).tolist() == [1, 1, 1]
    assert not set(splits["base"].image_ids) & set(splits["base_holdout"].image_ids)
    for name, source_split in (
        ("base", "train"),
        ("base_holdout", "train"),
        ("val", "val"),
        ("novel", "test"),
    ):
        split = splits[name]
        assert split.images.shape[1:] == (84, 84, 3)
        for image, label, image_id in zip(split.images, split.labels, split.image_ids, strict=True):
            prefix, index = image_id.split("/")
            assert prefix == source_split
            synset = image_classes[source_split][int(index)]
            assert split.class_names[label] == synset
            # PNG is lossless and 84 px is kept as is: the very pixels of pickle entry `index`.
            expected = tiered_pixels(
                SPLIT_NUMBER[source_split], int(index), CLASSES[source_split].index(synset), 84
            )
            assert np.array_equal(image, expected), image_id
        assert list(split.labels) == sorted(split.labels)  # grouped by class
    assert summary["splits"]["val"] == {"classes": 2, "images": 10}
    assert summary["source_md5"] and summary["base_holdout"] == 1


def test_python2_style_pickles_and_folder_source(tmp_path):
    tar = tmp_path / "tiered-imagenet.tar"
    make_tiered_tar(tar, CLASSES, images_per_class=2, size=20, bytes_keys=True)
    with tarfile.open(tar) as handle:
        handle.extractall(tmp_path / "folder", filter="data")
    a = prepare("tiered_imagenet", tar, tmp_path / "a", image_size=12, base_holdout=1, fixture=True)
    b = prepare("tiered_imagenet",
        tmp_path / "folder", tmp_path / "b", image_size=12, base_holdout=1, fixture=True
    )
    assert a["splits"] == b["splits"] and b["source_kind"] == "folder"
    for split in ("base", "base_holdout", "val", "novel"):
        x, y = load_split(tmp_path / "a" / split), load_split(tmp_path / "b" / split)
        assert x.images.shape[1:] == (12, 12, 3) and np.array_equal(x.images, y.images)


def test_unknown_class_is_rejected(tmp_path):
    tar = tmp_path / "tiered-imagenet.tar"
    make_tiered_tar(
        tar, CLASSES, images_per_class=2, extra_class={"val": "Yorkshire terrier"}
    )  # a train class
    with pytest.raises(UserError, match="class 'Yorkshire terrier' is not in splits/tieredImageNet/val.csv"):
        prepare("tiered_imagenet", tar, tmp_path / "out", base_holdout=1, fixture=True)
    assert not (tmp_path / "out").exists()


def test_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with pytest.raises(UserError, match="refusing to load"):
        safe_load_pickle(io.BytesIO(pickle.dumps({"label_specific": Evil()})), "evil.pkl")
    assert not (tmp_path / "pwned").exists()
    assert safe_load_pickle(io.BytesIO(pickle.dumps({b"k": np.arange(3)}, protocol=2)), "ok")[
        b"k"
    ].tolist() == [0, 1, 2]


def test_production_path_and_missing_files(tiered_tar, tmp_path):
    tar, _ = tiered_tar
    with pytest.raises(UserError, match=f"expected {TIERED_MD5}"):
        prepare("tiered_imagenet", tar, tmp_path / "out")
    with pytest.raises(UserError, match="has 3 classes in 2 categories, expected 351 in 20"):
        prepare("tiered_imagenet", tar, tmp_path / "out", size=tar.stat().st_size)
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(UserError, match="images_png.pkl not found"):
        prepare("tiered_imagenet", empty, tmp_path / "out", fixture=True)
    with pytest.raises(UserError, match="no tiered_imagenet source configured .datasets.tiered_imagenet.prepare.source"):
        prepare("tiered_imagenet", None, tmp_path / "out")


def test_cli_prepare_tiered_imagenet(tiered_tar, tmp_path, capsys):
    tar, _ = tiered_tar
    out = tmp_path / "tiered"
    assert (
        main(
            [
                "prepare",
                "tiered-imagenet",
                "--source",
                str(tar),
                "--out",
                str(out),
                "--fixture",
                "--base-holdout",
                "2",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "base: 3 classes, 9 images" in printed and "novel: 2 classes, 10 images" in printed
    assert (
        main(["prepare", "tiered-imagenet", "--source", str(tmp_path / "nope.tar"), "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.tar" in err and "Traceback" not in err

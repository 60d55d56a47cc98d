import json

import numpy as np
import pytest

from negmargin.data.store import SplitWriter, load_split, write_split
from negmargin.errors import UserError


def test_roundtrip_is_memory_mapped(tmp_path):
    images = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    split = write_split(tmp_path / "s", images, [0, 1, 1, 0, 2], ["a", "b", "c"], meta={"dataset": "x"})
    assert isinstance(split.images, np.memmap)
    np.testing.assert_array_equal(split.images, images)
    assert split.class_names == ["a", "b", "c"] and split.num_classes == 3 and split.channels == 3
    assert [list(ix) for ix in split.indices_by_class()] == [[0, 3], [1, 2], [4]]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with SplitWriter(tmp_path / "s", 3, (2, 2, 1), ["a"]) as writer:
            writer.add(np.zeros((2, 2), np.uint8), 0, "x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_short_write_is_refused(tmp_path):
    with pytest.raises(ValueError, match="declared 3 images, wrote 1"):
        with SplitWriter(tmp_path / "s", 3, (2, 2, 1), ["a"]) as writer:
            writer.add(np.zeros((2, 2), np.uint8), 0, "x")
    assert not (tmp_path / "s").exists()


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no meta.json"):
        load_split(tmp_path)
    write_split(tmp_path / "s", np.zeros((2, 2, 2, 1), np.uint8), [0, 0], ["a"])
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["format"] = "other/9"
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="expected 'negmargin-store/1'"):
        load_split(tmp_path / "s")


def test_omniglot_preparation(tiny_omniglot):
    base, holdout = load_split(tiny_omniglot / "base"), load_split(tiny_omniglot / "base_holdout")
    val, novel = load_split(tiny_omniglot / "val"), load_split(tiny_omniglot / "novel")
    assert (len(base), len(holdout), len(val), len(novel)) == (12 * 16, 12 * 4, 12 * 20, 12 * 20)
    assert base.images.shape[1:] == (28, 28, 1) and base.pipeline == "omniglot"
    assert base.class_names == holdout.class_names  # same label space: base accuracy is measurable
    assert not set(base.image_ids) & set(holdout.image_ids)
    assert not set(base.class_names) & set(val.class_names) and not set(val.class_names) & set(novel.class_names)
    # ink coverage: paper is 0, strokes are bright; every drawing has some ink
    assert base.images.max() == 255 and (base.images.reshape(len(base), -1).max(1) > 0).all()

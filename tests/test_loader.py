"""negmargin.data.loader: seeded, resumable batches whose content is a function of (seed, epoch, batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from negmargin.data.loader import EpochBatches, SplitBatches, epoch_loader, eval_batches
from negmargin.data.store import write_split


@pytest.fixture(scope="module")
def rgb_split(tmp_path_factory):
    """A real imagenet84 split: 24 random 96x96 RGB images of 3 classes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 96, 96, 3), dtype=np.uint8)
    return write_split(tmp_path_factory.mktemp("split") / "base", images, np.arange(24) % 3, ["a", "b", "c"],
                       meta={"dataset": "toy", "split": "base", "pipeline": "imagenet84"})


def test_an_epoch_visits_every_image_once_in_a_seeded_order():
    batches = list(EpochBatches(10, 4, seed=3, epoch=2))
    assert [len(b[2]) for b in batches] == [4, 4, 2] and [b[1] for b in batches] == [0, 1, 2]
    order = np.concatenate([b[2] for b in batches])
    assert sorted(order.tolist()) == list(range(10))
    again = np.concatenate([b[2] for b in EpochBatches(10, 4, seed=3, epoch=2)])
    other_epoch = np.concatenate([b[2] for b in EpochBatches(10, 4, seed=3, epoch=3)])
    np.testing.assert_array_equal(order, again)
    assert not np.array_equal(order, other_epoch)


def test_augmented_batches_depend_on_seed_epoch_and_batch_only(rgb_split):
    dataset = SplitBatches(rgb_split, train=True, image_size=84, seed=1)
    indices = np.array([5, 1, 7, 2])
    first, labels = dataset[(0, 3, indices)]
    assert first.shape == (4, 3, 84, 84) and first.dtype == torch.float32
    assert labels.tolist() == (indices % 3).tolist()
    torch.manual_seed(123)  # the global RNG plays no part
    again, _ = dataset[(0, 3, indices)]
    assert torch.equal(first, again)
    assert not torch.equal(first, dataset[(0, 4, indices)][0])
    assert not torch.equal(first, SplitBatches(rgb_split, train=True, image_size=84, seed=2)[(0, 3, indices)][0])


def test_worker_count_does_not_change_the_batches(rgb_split):
    serial = [b for b, _ in epoch_loader(rgb_split, 8, seed=0, epoch=1, image_size=84, num_workers=0)]
    parallel = [b for b, _ in epoch_loader(rgb_split, 8, seed=0, epoch=1, image_size=84, num_workers=2)]
    assert len(serial) == 3 and all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_eval_batches_are_in_order_with_the_test_transform(rgb_split):
    batches = list(eval_batches(rgb_split, 10, 84))
    labels = torch.cat([labels for _, labels in batches])
    assert labels.tolist() == (np.arange(24) % 3).tolist()
    images = torch.cat([images for images, _ in batches])
    # short side 96 -> 96, centre crop 84: the centre of the stored image, normalised
    centre = torch.from_numpy(rgb_split.images[0, 6:90, 6:90].copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(images[0], (centre - mean) / std, atol=1e-5, rtol=0)

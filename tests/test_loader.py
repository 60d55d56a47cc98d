"""negmargin.data.loader: seeded, resumable batches whose content is a function of (seed, epoch, batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from negmargin.data.augment import BatchAugment
from negmargin.data.loader import (
    EpochBatches,
    SplitBatches,
    TrainBatches,
    _mix,
    epoch_loader,
    eval_batches,
    keeps_on_device,
)
from negmargin.data.store import write_split
from negmargin.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from negmargin.errors import UserError


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


# ------------------------------------------------------------------------------ TrainBatches: the training paths


def _epoch(split, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = TrainBatches(split, 8, seed=4, image_size=84, device=torch.device("cpu"), **kwargs)
    return list(batches.epoch(1))


def _equal(first, second) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
        for (a_images, a_labels), (b_images, b_labels) in zip(first, second, strict=True))


def test_batched_path_gives_the_same_batches_from_the_memory_map_resident_data_and_workers(rgb_split):
    streamed = _epoch(rgb_split, data_on_device="never")
    assert len(streamed) == 3 and streamed[0][0].shape == (8, 3, 84, 84) and streamed[0][0].dtype == torch.float32
    assert _equal(streamed, _epoch(rgb_split, data_on_device="always"))
    assert _equal(streamed, _epoch(rgb_split, data_on_device="never", num_workers=2))


def test_batched_path_draws_per_seed_epoch_and_batch_and_keeps_the_sampler_order(rgb_split):
    batches = TrainBatches(rgb_split, 8, seed=4, image_size=84, device=torch.device("cpu"))
    reference = list(epoch_loader(rgb_split, 8, seed=4, epoch=1, image_size=84))  # the per-image path
    epoch = list(batches.epoch(1))
    assert [labels.tolist() for _, labels in epoch] == [labels.tolist() for _, labels in reference]
    torch.manual_seed(99)  # the global RNG plays no part
    assert _equal(epoch, list(batches.epoch(1)))
    assert not torch.equal(epoch[0][0], next(iter(batches.epoch(2)))[0])
    assert not torch.equal(epoch[0][0], epoch[1][0])
    # the per-image path is the reference loader itself: same batches as epoch_loader
    assert _equal(reference, _epoch(rgb_split, augment="per-image"))
    # batched and per-image draw differently: the same images come out augmented otherwise
    assert not torch.equal(epoch[0][0], reference[0][0])


def test_batched_transform_is_the_batch_augmentation_of_the_gathered_pixels(rgb_split):
    """What reaches the model is BatchAugment of the batch's images, with the generator of (seed, epoch, batch)."""
    batches = TrainBatches(rgb_split, 8, seed=4, image_size=84, device=torch.device("cpu"))
    sampler_batches = list(EpochBatches(len(rgb_split), 8, seed=4, epoch=1))
    images, _ = list(batches.epoch(1))[2]
    pixels = torch.from_numpy(rgb_split.images[sampler_batches[2][2]].copy()).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(_mix(4, 1, 2))
    expected = BatchAugment(84, IMAGENET_MEAN, IMAGENET_STD)(pixels, generator)
    assert torch.equal(images, expected)


@pytest.fixture(scope="module")
def grey_split(tmp_path_factory):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(20, 28, 28, 1), dtype=np.uint8)
    return write_split(tmp_path_factory.mktemp("grey") / "base", images, np.arange(20) % 4, list("abcd"),
                       meta={"dataset": "toy", "split": "base", "pipeline": "omniglot"})


def test_omniglot_batches_are_the_same_on_both_paths(grey_split):
    batches = TrainBatches(grey_split, 8, seed=0, image_size=28, device=torch.device("cpu"))
    assert _equal(list(batches.epoch(0)), _epoch_of(grey_split, "per-image"))
    assert _equal(list(batches.epoch(0)), _epoch_of(grey_split, "batched", data_on_device="always"))


def _epoch_of(split, augment, **kwargs):
    return list(TrainBatches(split, 8, seed=0, image_size=28, device=torch.device("cpu"), augment=augment,
                             **kwargs).epoch(0))


def test_where_the_base_split_is_kept():
    cpu = torch.device("cpu")
    assert not keeps_on_device("auto", 10, cpu)  # the memory map is in host memory already
    assert keeps_on_device("always", 10**12, cpu) and not keeps_on_device("never", 10, cpu)
    with pytest.raises(UserError, match="data_on_device 'sometimes'"):
        keeps_on_device("sometimes", 10, cpu)
    with pytest.raises(UserError, match="augment 'twice'"):
        TrainBatches(None, 8, 0, 84, cpu, augment="twice")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_resident_and_streamed_batches_are_equal_and_close_to_the_cpu(rgb_split):
    cuda = torch.device("cuda")
    resident = list(TrainBatches(rgb_split, 8, seed=4, image_size=84, device=cuda, data_on_device="always").epoch(1))
    streamed = list(TrainBatches(rgb_split, 8, seed=4, image_size=84, device=cuda, data_on_device="never",
                                 num_workers=2).epoch(1))
    assert resident[0][0].device.type == "cuda" and resident[0][1].device.type == "cuda"
    assert _equal(resident, streamed)
    for (images, labels), (cpu_images, cpu_labels) in zip(resident, _epoch(rgb_split), strict=True):
        assert torch.equal(labels.cpu(), cpu_labels)
        # the same parameters (drawn on the CPU); float rounding may differ (below 1 level on average)
        assert (images.cpu() - cpu_images).abs().mean() < 0.01

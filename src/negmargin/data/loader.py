"""Seeded, resumable mini-batches over a prepared split.

The order of epoch ``e`` is a permutation drawn from (seed, e) alone, and the augmentation of batch ``b``
uses a torch generator seeded from (seed, e, b). Nothing depends on how many epochs ran before in this
process, so a resumed run sees exactly the batches an uninterrupted run would have seen, whatever the
number of loader workers.

Training batches come from :class:`TrainBatches`, by one of two paths (``TrainConfig.augment``):

* ``batched`` (default): the loader only gathers uint8 pixels; they go to the training device, where the
  whole batch is transformed at once (``imagenet84``: :class:`negmargin.data.augment.BatchAugment`, its
  parameters drawn on the CPU from the batch's generator). When the base split fits in device memory it is
  uploaded once and batches are sliced there (``data_on_device``); otherwise each batch is read from the
  memory map, pinned and copied without blocking. Either way the loader workers only copy bytes, so their
  number no longer limits a GPU, and the same bytes reach the transform, so the choice does not change
  results.
* ``per-image``: the reference, :class:`SplitBatches` in a DataLoader: torchvision v2 image by image in the
  workers, on the CPU. Same distribution as ``batched`` (tests/test_augment.py), other random draws.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from negmargin.data.augment import BatchAugment
from negmargin.data.store import Split
from negmargin.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform, is_random
from negmargin.errors import UserError

# `auto` keeps the base split on a CUDA device when it takes at most this share of the free memory: the rest
# is for the model, its activations and cuDNN's workspaces (mini-ImageNet: 1.1 GB, tiered-ImageNet: 9.5 GB).
RESIDENT_SHARE = 0.5
UPLOAD_CHUNK = 4096  # images per copy while uploading a split (96x96x3: 113 MB)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (SeedSequence hashing, platform-independent)."""
    return int(np.random.SeedSequence(list(values)).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


class EpochBatches(Sampler):
    """Yields (epoch, batch_index, indices) for one epoch: a seeded permutation cut into batches, no drop_last."""

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int) -> None:
        self.num_items, self.batch_size, self.seed, self.epoch = num_items, batch_size, seed, epoch

    def __len__(self) -> int:
        return -(-self.num_items // self.batch_size)

    def __iter__(self):
        rng = np.random.Generator(np.random.PCG64(_mix(self.seed, self.epoch, 0x5EED)))
        order = np.argsort(rng.random(self.num_items), kind="stable")
        for batch_index, start in enumerate(range(0, self.num_items, self.batch_size)):
            yield self.epoch, batch_index, order[start : start + self.batch_size]


def gather_pixels(split: Split, indices: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, C] (contiguous) of ``indices``, in that order, read from the memory map."""
    sorted_indices = np.sort(indices)  # contiguous reads from the memory map
    restore = np.argsort(np.argsort(indices, kind="stable"), kind="stable")
    return torch.from_numpy(np.ascontiguousarray(split.images[sorted_indices][restore]))


class SplitPixels(Dataset):
    """Map-style dataset whose items are whole batches of raw pixels: (uint8 [B, H, W, C], labels int64 [B]).
    The workers of a DataLoader over it only read bytes; the transform runs on the training device."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, indices = item
        return gather_pixels(self.split, indices), torch.from_numpy(self.split.labels[indices])


class SplitBatches(Dataset):
    """Map-style dataset whose items are whole batches: (images float32 [B, C, H, W], labels int64 [B])."""

    def __init__(self, split: Split, train: bool, image_size: int, seed: int = 0) -> None:
        self.split = split
        self.seed = seed
        self.random = is_random(split.pipeline, train)
        self.transform = build_transform(split.pipeline, train, image_size, stored_size=split.image_size[0])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, batch_index, indices = item
        pixels = gather_pixels(self.split, indices).permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW
        labels = torch.from_numpy(self.split.labels[indices])
        if self.random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, epoch, batch_index))
                images = torch.stack([self.transform(image) for image in pixels])
        else:
            images = self.transform(pixels)
        return images, labels


def epoch_loader(split: Split, batch_size: int, seed: int, epoch: int, image_size: int, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    dataset = SplitBatches(split, train=True, image_size=image_size, seed=seed)
    return DataLoader(
        dataset,
        sampler=EpochBatches(len(split), batch_size, seed, epoch),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def eval_batches(split: Split, batch_size: int, image_size: int):
    """Deterministic, in-order batches with the test transform (for feature extraction)."""
    dataset = SplitBatches(split, train=False, image_size=image_size)
    for batch_index, start in enumerate(range(0, len(split), batch_size)):
        yield dataset[(0, batch_index, np.arange(start, min(start + batch_size, len(split))))]


def keeps_on_device(mode: str, nbytes: int, device: torch.device) -> bool:
    """Whether ``data_on_device`` = ``mode`` keeps a split of ``nbytes`` resident on ``device``."""
    if mode not in ("auto", "always", "never"):
        raise UserError(f"data_on_device {mode!r}: expected auto, always or never")
    if mode != "auto":
        return mode == "always"
    if device.type != "cuda":
        return False  # on the CPU the memory map is in host memory already (the page cache holds it)
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= RESIDENT_SHARE * free


class ResidentSplit:
    """A split's pixels (uint8 [N, H, W, C]) and labels held as tensors on ``device``, uploaded once."""

    def __init__(self, split: Split, device: torch.device) -> None:
        self.device = device
        try:
            self.images = torch.empty(split.images.shape, dtype=torch.uint8, device=device)
            for start in range(0, len(split), UPLOAD_CHUNK):
                chunk = torch.from_numpy(np.array(split.images[start : start + UPLOAD_CHUNK]))
                self.images[start : start + len(chunk)].copy_(chunk)
        except torch.OutOfMemoryError:
            raise UserError(f"{split.path}: its {split.images.nbytes / 2**30:.1f} GiB of images do not fit in "
                            f"the memory of {device}; use data_on_device auto or never") from None
        self.labels = torch.from_numpy(split.labels).to(device)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, H, W, C] and labels of ``indices``, sliced on the device."""
        index = torch.from_numpy(indices)
        if self.device.type == "cuda":  # no wait for the GPU (see AugmentParams.to)
            index = index.pin_memory().to(self.device, non_blocking=True)
        return self.images[index], self.labels[index]


class TrainBatches:
    """The training batches of every epoch, on the training device and ready for the model: float32
    [B, C, S, S] images and int64 [B] labels. ``augment`` is ``batched`` or ``per-image`` (see the module
    docstring); ``data_on_device`` is ``auto``, ``always`` or ``never`` (:func:`keeps_on_device`).

    Batch ``b`` of epoch ``e`` is a function of (seed, e, b): of the path, and on the ``batched`` path of the
    device, but neither of the number of workers nor of where the pixels are kept."""

    def __init__(self, split: Split, batch_size: int, seed: int, image_size: int, device: torch.device, *,
                 augment: str = "batched", num_workers: int = 0, data_on_device: str = "auto") -> None:
        if augment not in ("batched", "per-image"):
            raise UserError(f"augment {augment!r}: expected batched or per-image")
        self.split, self.batch_size, self.seed, self.image_size = split, batch_size, seed, image_size
        self.device, self.num_workers = device, num_workers
        self.per_image = augment == "per-image"
        self.random = is_random(split.pipeline, train=True)
        self.augment = BatchAugment(image_size, IMAGENET_MEAN, IMAGENET_STD) if self.random else None
        self.transform = None if self.random else build_transform(split.pipeline, True, image_size,
                                                                   stored_size=split.image_size[0])
        self.resident: ResidentSplit | None = None
        if not self.per_image and keeps_on_device(data_on_device, split.images.nbytes, device):
            self.resident = ResidentSplit(split, device)
            print(f"{split.path}: {split.images.nbytes / 2**30:.2f} GiB of images kept on {device}",
                  file=sys.stderr, flush=True)

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` (0-based), in order."""
        sampler = EpochBatches(len(self.split), self.batch_size, self.seed, epoch)
        pin = self.device.type == "cuda"
        if self.per_image:
            loader = DataLoader(SplitBatches(self.split, train=True, image_size=self.image_size, seed=self.seed),
                                sampler=sampler, batch_size=None, num_workers=self.num_workers, pin_memory=pin)
            for images, labels in loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            return
        if self.resident is not None:
            source = (self.resident.batch(indices) for _, _, indices in sampler)
        else:
            source = DataLoader(SplitPixels(self.split), sampler=sampler, batch_size=None,
                                num_workers=self.num_workers, pin_memory=pin)
        for batch_index, (pixels, labels) in enumerate(source):
            pixels = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC -> NCHW view
            yield self.transform_batch(pixels, epoch, batch_index), labels.to(self.device, non_blocking=True)

    def transform_batch(self, pixels: torch.Tensor, epoch: int, batch_index: int) -> torch.Tensor:
        """The training transform of uint8 [B, C, H, W] ``pixels`` on their device."""
        if self.transform is not None:
            return self.transform(pixels)  # no random step: the v2 pipeline over the whole batch
        return self.augment(pixels, torch.Generator().manual_seed(_mix(self.seed, epoch, batch_index)))

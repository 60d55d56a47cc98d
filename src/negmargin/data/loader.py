"""Seeded, resumable mini-batches over a prepared split.

The order of epoch ``e`` is a permutation drawn from (seed, e) alone, and the augmentation of batch ``b``
uses a torch generator seeded from (seed, e, b). Nothing depends on how many epochs ran before in this
process, so a resumed run sees exactly the batches an uninterrupted run would have seen, whatever the
number of loader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from negmargin.data.store import Split
from negmargin.data.transforms import build_transform, is_random


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
        sorted_indices = np.sort(indices)  # contiguous reads from the memory map
        restore = np.argsort(np.argsort(indices, kind="stable"), kind="stable")
        pixels = torch.from_numpy(np.ascontiguousarray(self.split.images[sorted_indices][restore]))
        pixels = pixels.permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW
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

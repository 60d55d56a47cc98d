"""Input pipelines, as torchvision.transforms.v2 compositions over uint8 CHW tensors.

* ``imagenet84`` (paper, spec 1.2 and 1.4):
  - train: RandomResizedCrop(84, scale 0.08-1, ratio 3/4-4/3, bilinear), horizontal flip (p 0.5),
    ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4), ImageNet mean/std;
  - test: short side to 96 (= int(84·1.15)), centre crop 84, ImageNet mean/std.
* ``omniglot``: 28x28 (or the stored size), one channel, scaled to [0, 1] and normalised with mean 0.5 and
  std 0.5; no augmentation, train and test alike.

``is_random(pipeline, train)`` tells the loader whether a transform must run image by image (random
crops, flips and jitter differ per image) or can run once on a whole batch.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # 123.675/255, 116.28/255, 103.53/255
IMAGENET_STD = (0.229, 0.224, 0.225)  # 58.395/255, 57.12/255, 57.375/255
OMNIGLOT_MEAN = (0.5,)
OMNIGLOT_STD = (0.5,)


def build_transform(pipeline: str, train: bool, image_size: int, stored_size: int | None = None) -> v2.Transform:
    """The v2 pipeline; ``stored_size`` (side of the stored images) skips a resize that would be a no-op."""
    if pipeline == "imagenet84":
        if train:
            steps = [
                v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                v2.RandomHorizontalFlip(0.5),
                v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
            ]
        else:
            steps = [v2.Resize(int(image_size * 1.15), antialias=True), v2.CenterCrop(image_size)]
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if pipeline == "omniglot":
        steps = [] if stored_size == image_size else [v2.Resize([image_size, image_size], antialias=True)]
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(OMNIGLOT_MEAN, OMNIGLOT_STD)])
    from negmargin.errors import UserError

    raise UserError(f"unknown pipeline {pipeline!r}; expected 'imagenet84' or 'omniglot'")


def is_random(pipeline: str, train: bool) -> bool:
    return pipeline == "imagenet84" and train

"""negmargin.data.transforms: the two input pipelines, their output ranges and what is random."""

from __future__ import annotations

import pytest
import torch

from negmargin.data.transforms import build_transform, is_random
from negmargin.errors import UserError


def test_omniglot_pipeline_scales_ink_to_minus_one_one():
    images = torch.tensor([[[[0, 255], [128, 0]]]], dtype=torch.uint8)
    out = build_transform("omniglot", train=True, image_size=2, stored_size=2)(images)
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, 1.0], [128 / 127.5 - 1, -1.0]]]]))
    assert not is_random("omniglot", True)


def test_omniglot_resizes_only_when_asked():
    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    assert build_transform("omniglot", False, 14, stored_size=28)(images).shape == (1, 1, 14, 14)


def test_imagenet84_train_is_random_and_test_is_not():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    train = build_transform("imagenet84", train=True, image_size=84)
    test = build_transform("imagenet84", train=False, image_size=84)
    assert is_random("imagenet84", True) and not is_random("imagenet84", False)
    assert train(image).shape == (3, 84, 84)
    assert not torch.equal(train(image), train(image))
    assert torch.equal(test(image), test(image)) and test(image).shape == (3, 84, 84)


def test_unknown_pipeline_is_a_user_error():
    with pytest.raises(UserError, match="unknown pipeline 'jpeg'"):
        build_transform("jpeg", True, 84)

"""mmfewshot's NegMargin model as mmfewshot builds it, written independently of negmargin's modules.

Module names, layer order and forward pass follow open-mmlab/mmfewshot (classification/models/backbones/
conv4.py and resnet12.py, classifiers/base.py, heads/neg_margin_head.py), so that ``state_dict()`` has the
keys of mmfewshot's released checkpoints. Dropout/DropBlock are left out: they have no tensors and do
nothing in eval mode with mmfewshot's drop_rate of 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class ConvBlock(nn.Module):
    """mmfewshot's Conv4 block: ``layers`` = conv3x3 (bias), BN, ReLU, MaxPool2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                    nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MMConv4(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[ConvBlock(3 if i == 0 else 64, 64) for i in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out.view(out.size(0), -1)


class BasicBlock(nn.Module):
    """mmfewshot's ResNet-12 block: conv1/norm1/conv2/norm2/conv3/norm3, downsample (1x1 conv, BN)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(out_channels)
        self.max_pool = nn.MaxPool2d(2)
        self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False),
                                        nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        out = out + self.downsample(x)
        return self.max_pool(self.relu(out))


class MMResNet12(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(BasicBlock(3, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 160))
        self.layer3 = nn.Sequential(BasicBlock(160, 320))
        self.layer4 = nn.Sequential(BasicBlock(320, 640))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out = self.avgpool(out)
        return out.view(out.size(0), -1)


class Head(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_channels))


class MMNegMargin(nn.Module):
    """The classifier: ``device_indicator`` (empty buffer), ``backbone``, ``head``."""

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__()
        self.backbone = MMConv4() if arch == "conv4" else MMResNet12()
        self.head = Head(num_classes, 1600 if arch == "conv4" else 640)
        self.register_buffer("device_indicator", torch.empty(0))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and non-trivial BN running statistics (so a swapped buffer changes the features);
    returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                scale = (2.0 / fan_in) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * scale)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=generator)))
            elif isinstance(module, Head):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
    return model.eval()


def save_mmcv_checkpoint(path: Path, model: MMNegMargin, meta: dict[str, Any] | None = None) -> Path:
    """The layout of a published mmcv checkpoint: ``meta`` and ``state_dict``, no optimizer."""
    payload: dict[str, Any] = {"state_dict": model.state_dict()}
    if meta is not None:
        payload = {"meta": meta, **payload}
    torch.save(payload, path)
    return path

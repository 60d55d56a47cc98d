"""Backbones of spec section 3: Conv4 and ResNet-12 (mmfewshot's definitions).

Both accept any number of input channels and any input size. ``feature_dim(image_size)`` gives the
flattened output width for a square input (Conv4: 1600 at 84x84, 64 at 28x28; ResNet-12: always 640).
"""

from __future__ import annotations

import torch
from torch import nn

from negmargin.options import ARCHS


def _init_conv_bn(module: nn.Module) -> None:
    # mmfewshot: kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu') with a=0, BN weight 1, bias 0.
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="leaky_relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class Conv4(nn.Module):
    """4 x [Conv3x3(64, bias) -> BN -> ReLU -> MaxPool2]; the final map is flattened (no global pooling)."""

    def __init__(self, in_channels: int = 3, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=True),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.layers = nn.Sequential(*layers)
        self.width = width
        self.depth = depth
        _init_conv_bn(self)

    def feature_dim(self, image_size: int) -> int:
        side = image_size
        for _ in range(self.depth):
            side //= 2
        return self.width * side * side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.layers(images), 1)


class _ResBlock(nn.Module):
    """MetaOptNet-style block: 3 x (conv3x3 -> BN), LeakyReLU(0.1) after the first two; add a
    1x1-conv + BN shortcut; LeakyReLU(0.1); MaxPool2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """Four residual stages 64-160-320-640, then global average pooling: 640-d for any input size."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (64, 160, 320, 640)) -> None:
        super().__init__()
        blocks = []
        channels = in_channels
        for width in widths:
            blocks.append(_ResBlock(channels, width))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_channels = channels
        _init_conv_bn(self)

    def feature_dim(self, image_size: int) -> int:
        return self.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(images)), 1)


def build_backbone(arch: str, in_channels: int) -> nn.Module:
    """The backbone named ``arch`` in negmargin.options.ARCHS (the one list of architectures)."""
    if arch not in ARCHS:
        from negmargin.errors import UserError

        raise UserError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return globals()[ARCHS[arch]](in_channels=in_channels)

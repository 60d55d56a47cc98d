"""Margin heads of spec section 2: cosine (the one every config uses) and softmax.

Both hold one weight matrix W [classes, dim], no bias, initialised with kaiming_uniform_(a=sqrt(5)),
i.e. U(-1/sqrt(dim), 1/sqrt(dim)), and a fixed temperature T (no learnable scale).

Given labels, the target logit is shifted by the margin m (negative, zero or positive):

* cosine:  z_j = T * (cos(x, W_j) - m * [j == y])
* softmax: z = W x;  z -= min_j z_j;  z_j = T * (z_j - m * [j == y])

Without labels (inference) no margin is applied. The target mask is a bool tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from negmargin.options import METRICS


class _MarginHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, temperature: float, margin: float) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.margin = float(margin)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def similarity(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.similarity(features)
        if labels is not None and self.margin != 0.0:
            target = F.one_hot(labels, self.num_classes).bool()
            scores = torch.where(target, scores - self.margin, scores)
        return self.temperature * scores

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}, margin={self.margin}"
        )


class CosineMarginHead(_MarginHead):
    metric = "cosine"

    def similarity(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))


class SoftmaxMarginHead(_MarginHead):
    metric = "softmax"

    def similarity(self, features: torch.Tensor) -> torch.Tensor:
        scores = F.linear(features, self.weight)
        return scores - scores.min(dim=-1, keepdim=True).values


def build_head(metric: str, in_features: int, num_classes: int, temperature: float, margin: float) -> _MarginHead:
    """The head named ``metric`` in negmargin.options.METRICS (the one list of heads)."""
    if metric not in METRICS:
        from negmargin.errors import UserError

        raise UserError(f"unknown head metric {metric!r}; expected one of {', '.join(METRICS)}")
    return globals()[METRICS[metric]](in_features, num_classes, temperature, margin)

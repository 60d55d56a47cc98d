"""Plain per-episode meta-test: the reference the batched implementation is checked against.

One episode at a time, exactly as mmfewshot fine-tunes: an nn.Parameter head, F.normalize on features
and weights, cross-entropy on T·cos, torch.optim.SGD with momentum, dampening and weight decay.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from negmargin.episodes import Episodes
from negmargin.options import FinetuneConfig


def reference_accuracies(
    features: torch.Tensor,
    episodes: Episodes,
    config: FinetuneConfig,
    init: np.ndarray,
    positions: np.ndarray,
    mask: np.ndarray,
) -> np.ndarray:
    accuracies = np.zeros(episodes.num_episodes)
    query_labels = torch.from_numpy(episodes.query_labels)
    for e in range(episodes.num_episodes):
        support = features[torch.from_numpy(episodes.support[e])]
        query = features[torch.from_numpy(episodes.query[e])]
        weight = torch.nn.Parameter(torch.from_numpy(init[e]).to(features.dtype).clone())
        optimizer = torch.optim.SGD(
            [weight], lr=config.lr, momentum=config.momentum, dampening=config.dampening,
            weight_decay=config.weight_decay,
        )
        for step in range(config.steps):
            chosen = torch.from_numpy(positions[e, step][mask[e, step]])
            batch, labels = support[chosen], chosen // episodes.shots
            logits = config.temperature * F.linear(F.normalize(batch, dim=-1), F.normalize(weight, dim=-1))
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = config.temperature * F.linear(F.normalize(query, dim=-1), F.normalize(weight, dim=-1))
            accuracies[e] = (logits.argmax(1) == query_labels).double().mean().item() * 100.0
    return accuracies

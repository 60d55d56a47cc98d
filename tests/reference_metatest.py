"""References the batched meta-test (``negmargin.metatest.finetune_and_predict``) is checked against.

* ``reference_accuracies``: one episode at a time, exactly as mmfewshot fine-tunes: an nn.Parameter head,
  F.normalize on features and weights, cross-entropy on T·cos, torch.optim.SGD with momentum, dampening
  and weight decay.
* ``recompute_accuracies``: the batched subspace program as it was before the head's products with the
  Gram matrix were carried incrementally: every step recomputes C·G, a full [E, ways, K] x [E, K, K]
  product. Same algebra, so it agrees with the incremental program to rounding; it is the "before" of
  ``bench/bench_metatest.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from negmargin.episodes import Episodes, batch_schedule
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


def _projections(
    features: torch.Tensor, episodes: Episodes, init: np.ndarray, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices G [E, K, K] and query projections P [E, K, Q] (float64), computed chunk by chunk."""
    ways = episodes.ways
    n_support = episodes.support.shape[1]
    k = ways + n_support
    grams = torch.empty(episodes.num_episodes, k, k, dtype=torch.float64)
    projections = torch.empty(episodes.num_episodes, k, episodes.query.shape[1], dtype=torch.float64)
    support = torch.from_numpy(episodes.support)
    query = torch.from_numpy(episodes.query)
    for start in range(0, episodes.num_episodes, chunk):
        stop = min(start + chunk, episodes.num_episodes)
        basis = torch.cat(
            [
                torch.from_numpy(init[start:stop]).to(features.dtype),
                F.normalize(features[support[start:stop]], dim=-1),
            ],
            dim=1,
        )
        queries = F.normalize(features[query[start:stop]], dim=-1)
        products = torch.bmm(basis, torch.cat([basis, queries], dim=1).transpose(1, 2)).double()
        grams[start:stop] = products[:, :, :k]
        projections[start:stop] = products[:, :, k:]
    return grams, projections


def recompute_coefficients(
    grams: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    ways: int,
    shots: int,
    config: FinetuneConfig,
) -> torch.Tensor:
    """Fine-tuned head coefficients C [E, ways, K], with C·G recomputed at every step (the package's API)."""
    num, k = grams.shape[0], grams.shape[1]
    mask = mask.double()
    labels = positions // shots  # support is ordered way by way
    temperature, eps = config.temperature, 1e-12

    coef = torch.zeros(num, ways, k, dtype=torch.float64)
    coef[:, :, :ways] = torch.eye(ways, dtype=torch.float64)
    momentum_buf = torch.zeros_like(coef)
    for step in range(config.steps):
        columns = ways + positions[:, step]  # [E, b]: basis index of each sampled support feature
        valid = mask[:, step]  # [E, b]
        count = valid.sum(1).clamp_min(1.0)
        coef_gram = torch.bmm(coef, grams)  # [E, ways, K]
        norms = (coef_gram * coef).sum(-1).clamp_min(0).sqrt().clamp_min(eps)  # [E, ways]
        dots = torch.gather(coef_gram, 2, columns[:, None, :].expand(-1, ways, -1)).transpose(1, 2)  # [E, b, ways]
        cos = dots / norms[:, None, :]
        probs = torch.softmax(temperature * cos, dim=-1)
        grad_cos = probs - F.one_hot(labels[:, step], ways).double()
        grad_cos = grad_cos * (temperature * valid / count[:, None])[..., None]  # dL/dcos, mean over valid
        picks = F.one_hot(columns, k).double() * valid[..., None]  # [E, b, K]
        grad = torch.bmm((grad_cos / norms[:, None, :]).transpose(1, 2), picks)
        grad -= ((grad_cos * cos).sum(1) / norms.square())[..., None] * coef
        grad += config.weight_decay * coef
        if step == 0:
            momentum_buf = grad  # torch.optim.SGD: the first step's buffer is the gradient itself
        else:
            momentum_buf = config.momentum * momentum_buf + (1.0 - config.dampening) * grad
        coef = coef - config.lr * momentum_buf
    return coef


def recompute_accuracies(
    features: torch.Tensor,
    episodes: Episodes,
    config: FinetuneConfig,
    init: np.ndarray,
    chunk: int = 256,
) -> np.ndarray:
    """Per-episode query accuracy (%): the batched program with C·G recomputed at every step."""
    grams, projections = _projections(features, episodes, init, chunk)
    positions, mask = (torch.from_numpy(a) for a in batch_schedule(episodes, config.steps, config.batch_size))
    coef = recompute_coefficients(grams, positions, mask, episodes.ways, episodes.shots, config)
    norms = (torch.bmm(coef, grams) * coef).sum(-1).clamp_min(0).sqrt().clamp_min(1e-12)
    query_cos = torch.bmm(coef, projections) / norms[:, :, None]  # [E, ways, Q]
    predictions = query_cos.argmax(dim=1)
    query_labels = torch.from_numpy(episodes.query_labels)[None, :]
    return (predictions == query_labels).double().mean(1).mul(100.0).numpy()

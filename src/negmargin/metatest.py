"""Episodic meta-test on cached features, with mmfewshot's semantics, all episodes in one tensor program.

Per episode (spec 2.4): a new 5-way cosine head (T = 5, m = 0, kaiming-uniform init) is fine-tuned on the
L2-normalised support features with SGD (lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3) for
150 (1-shot) or 600 (5-shot) steps, each on the next mini-batch of 4 from a reshuffled support set; the 15
queries per class are then predicted by argmax of 5·cos.

How it runs batched. With SGD, momentum and weight decay, every update of a head row is a combination of
the row itself and the episode's normalised support features, so each row stays in the span of

    B = [initial head rows (ways); normalised support features (ways·shots)]        (K x D)

for the whole fine-tuning. The head is carried as coefficients C (ways x K) with W = C·B, and the features
enter only through the Gram matrix G = B·Bᵀ (K x K) and the query projections P = B·Q̂ᵀ (K x queries):

    ‖w_j‖² = c_j G c_jᵀ,    <x̂_s, w_j> = (C G)[j, ways + s],    <q̂, w_j> = (C P)[j, q]
    ∂L/∂w_j = Σ_i g_ij (x̂_i − cos_ij w_j/‖w_j‖) / ‖w_j‖    (g = ∂L/∂cos)  → also a combination of B's rows

This is exact (up to rounding), not an approximation. Costed in flops, the D-dimensional work is one
[K x (K + queries)] product per episode; the 600 steps act on [episodes, ways, K] tensors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from negmargin.episodes import Episodes, batch_schedule, initial_head_weights, sample_episodes, short_classes
from negmargin.options import FinetuneConfig
from negmargin.stats import ci95


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


def finetune_and_predict(
    features: torch.Tensor,
    episodes: Episodes,
    config: FinetuneConfig,
    init: np.ndarray | None = None,
    chunk: int = 256,
) -> np.ndarray:
    """Per-episode query accuracy (%) after fine-tuning a fresh cosine head on each episode's support set."""
    ways, shots = episodes.ways, episodes.shots
    num = episodes.num_episodes
    if init is None:
        init = initial_head_weights(episodes, features.shape[1])
    grams, projections = _projections(features, episodes, init, chunk)
    k = grams.shape[1]
    positions, mask = batch_schedule(episodes, config.steps, config.batch_size)
    positions = torch.from_numpy(positions)
    mask = torch.from_numpy(mask).double()
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

    norms = (torch.bmm(coef, grams) * coef).sum(-1).clamp_min(0).sqrt().clamp_min(eps)
    query_cos = torch.bmm(coef, projections) / norms[:, :, None]  # [E, ways, Q]
    predictions = query_cos.argmax(dim=1)
    query_labels = torch.from_numpy(episodes.query_labels)[None, :]
    return (predictions == query_labels).double().mean(1).mul(100.0).numpy()


def run_metatest(
    features: np.ndarray,
    labels: np.ndarray,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    episodes: int = 2000,
    seed: int = 0,
    config: FinetuneConfig | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Sample the episodes, fine-tune and score them; returns the result record (accuracies in %).

    A class with fewer than ``shots + queries`` images cannot be drawn into an episode: the record lists such
    classes under ``excluded_classes`` (label, name where ``class_names`` are given, images, why)."""
    config = (config or FinetuneConfig()).for_shots(shots)
    started = time.perf_counter()
    per_class = shots + queries
    excluded = [
        {"label": label, "name": str(class_names[label]) if class_names is not None else None, "images": images,
         "reason": f"{images} images, fewer than {shots} shots + {queries} queries = {per_class}"}
        for label, images in short_classes(labels, per_class, None if class_names is None else len(class_names))
    ]
    classes_total = len(class_names) if class_names is not None else len(np.unique(labels))
    sampled = sample_episodes(labels, ways, shots, queries, episodes, seed)
    accuracies = finetune_and_predict(torch.from_numpy(np.ascontiguousarray(features)), sampled, config)
    return {
        "accuracy_mean": float(accuracies.mean()),
        "accuracy_ci95": ci95(accuracies),
        "episode_std": float(accuracies.std(ddof=0)),
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "episodes": episodes,
        "seed": seed,
        "finetune": config.to_dict(),
        "episodes_sha256": sampled.digest(),
        "num_features": int(features.shape[0]),
        "feature_dim": int(features.shape[1]),
        "classes_total": int(classes_total),
        "classes_used": int(classes_total - len(excluded)),
        "excluded_classes": excluded,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "episode_accuracies": [round(float(a), 4) for a in accuracies],
    }

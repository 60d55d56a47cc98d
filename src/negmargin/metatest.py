"""Episodic meta-test on cached features, with mmfewshot's semantics, all episodes in one tensor program.

Per episode (spec 2.4): a new 5-way cosine head (T = 5, m = 0, kaiming-uniform init) is fine-tuned on the
L2-normalised support features with SGD (lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3) for
150 (1-shot) or 600 (5-shot) steps, each on the next mini-batch of 4 from a reshuffled support set; the 15
queries per class are then predicted by argmax of 5·cos.

How it runs batched. With SGD, momentum and weight decay, every update of a head row is a combination of
the row itself and the episode's normalised support features, so each row stays in the span of

    B = [initial head rows (ways); normalised support features (S = ways·shots)]        (K x D)

for the whole fine-tuning. The head is carried as coefficients C (ways x K) with W = C·B, and the features
enter only through the Gram matrix G = B·Bᵀ (K x K) and the query projections P = B·Q̂ᵀ (K x queries):

    ‖w_j‖² = c_j G c_jᵀ,    <x̂_s, w_j> = (C G)[j, ways + s],    <q̂, w_j> = (C P)[j, q]
    ∂L/∂w_j = Σ_i g_ij (x̂_i − cos_ij w_j/‖w_j‖) / ‖w_j‖    (g = ∂L/∂cos)  → also a combination of B's rows

How a step stays cheap. A step's gradient of row j is a_j·c_j (the norm term and weight decay) plus a
part σ_j that is non-zero only in the b sampled support columns. SGD with momentum is then the two-term
recurrence (m_t = (c_{t-1} − c_t)/lr):

    c_{t+1} = α_t·c_t − μ_t·c_{t-1} + σ_t,    α_t = 1 + μ_t − lr·gain_t·a_t   (μ_0 = 0, gain_0 = 1)

which, multiplied by G, carries C·G from step to step with one rank-b product (σ_t [ways x b] times the
b sampled rows of G) instead of recomputing C·G ([ways x K] x [K x K]). Only the support columns of C·G
are ever read, so only they are kept; the norms ‖c_t‖²_G follow from the same recurrence through the
scalars <c_t, c_t>_G, <c_t, c_{t-1}>_G, <c_{t-1}, c_{t-1}>_G and the sampled entries; and C itself is
needed only at the end, so it is assembled once from the recorded α_t and σ_t (``_replay_coefficients``).
All of it is exact algebra in float64: it agrees with recomputing C·G at every step to rounding (about
1e-13 in the query logits), so a prediction can only differ where two logits tie to that precision.
Costed in flops, the D-dimensional work is one [K x (K + queries)] product per episode, and a step costs
O(ways·b·S) per episode.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from negmargin.episodes import Episodes, batch_schedule, initial_head_weights, sample_episodes, short_classes
from negmargin.options import FinetuneConfig
from negmargin.stats import ci95

# Episodes fine-tuned together: as many as keep their C_t·G and C_{t-1}·G (2 x ways x S float64 each) within
# about an L2 cache across the steps, but at least 64, so that the per-step cost of launching the small
# tensor operations is shared by enough episodes.
FINETUNE_STATE_BYTES = 1 << 20
MIN_FINETUNE_BLOCK = 64


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch's operations on one thread inside, restoring the thread count after.

    A fine-tuning step is ~50 operations on a few thousand numbers each, so splitting them across threads
    gains little, and where other processes hold the cores every split waits for a descheduled thread
    (20-way 5-shot, 2000 episodes, on the shared 2-core machine: 221 s with 2 threads, 13 s with 1).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def basis_products(
    features: torch.Tensor, support: torch.Tensor, query: torch.Tensor, init: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices G = B·Bᵀ [E, K, K] and query projections P = B·Q̂ᵀ [E, K, Q], in float64 (views).

    ``support`` [E, S] and ``query`` [E, Q] index ``features``; ``init`` [E, ways, D] are the initial heads.
    The products are taken in the features' dtype, then widened.
    """
    basis = torch.cat([init.to(features.dtype), F.normalize(features[support], dim=-1)], dim=1)
    queries = F.normalize(features[query], dim=-1)
    products = torch.bmm(basis, torch.cat([basis, queries], dim=1).transpose(1, 2)).double()
    k = basis.shape[1]
    return products[:, :, :k], products[:, :, k:]


def finetune_coefficients(
    grams: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    ways: int,
    shots: int,
    config: FinetuneConfig,
) -> torch.Tensor:
    """The fine-tuned heads as coefficients C [E, ways, K] over each episode's basis (module docstring).

    ``grams`` [E, K, K] float64 are the basis Gram matrices; ``positions`` int64 and ``mask`` bool, both
    [E, steps, b], are ``batch_schedule``'s: the support positions each step samples and the used slots.
    """
    num, k = grams.shape[0], grams.shape[1]
    batch, steps = positions.shape[2], config.steps
    n_support = k - ways
    lr, mu, temperature, eps = config.lr, config.momentum, config.temperature, 1e-12
    support_gram = grams[:, :, ways:].contiguous()  # [E, K, S]: the support columns, the only ones sampled
    # Per-step inputs, step-major so that each step reads one contiguous slice.
    columns = ways + positions  # [E, steps, b]: basis index of each sampled support feature
    step_positions = positions.transpose(0, 1).contiguous()  # [steps, E, b]
    gram_rows = columns + (torch.arange(num) * k).view(num, 1, 1)  # rows of support_gram viewed [E·K, S]
    gram_rows = gram_rows.transpose(0, 1).reshape(steps, num * batch)
    valid = mask.double()
    weights = temperature * valid / valid.sum(2, keepdim=True).clamp_min(1.0)  # dL/dcos: mean over valid
    weights = weights.transpose(0, 1).unsqueeze(-1).contiguous()  # [steps, E, b, 1]
    label_index = (step_positions // shots).unsqueeze(-1)  # [steps, E, b, 1]: support is ordered way by way
    # pair[slot] is C_t·G or C_{t-1}·G on the support columns, [E, ways, S]; the two slots swap every step.
    pair = torch.zeros(2, num, ways, n_support, dtype=torch.float64)
    pair[0] = support_gram[:, :ways]  # C_0 = [I 0]
    slot = num * ways * n_support
    current_first = (torch.tensor([[0], [slot]]), torch.tensor([[slot], [0]]))  # by step parity
    entry_base = (torch.arange(num * ways) * n_support).view(num, 1, ways)  # (e, j, p) at (e·ways + j)·S + p
    norm_sq = torch.diagonal(grams[:, :ways, :ways], dim1=1, dim2=2).clone()  # <c_t, c_t>_G [E, ways]
    previous_norm_sq = torch.zeros_like(norm_sq)  # <c_{t-1}, c_{t-1}>_G
    cross = torch.zeros_like(norm_sq)  # <c_t, c_{t-1}>_G
    sigmas = torch.empty(num, ways, steps, batch, dtype=torch.float64)
    alphas = torch.empty(steps, num, ways, dtype=torch.float64)
    for step in range(steps):
        # SGD's first step has no momentum (its buffer is the gradient itself); later ones damp the gradient.
        momentum = 0.0 if step == 0 else mu
        gain = 1.0 if step == 0 else 1.0 - config.dampening
        current, previous = pair[step % 2], pair[1 - step % 2]
        sampled_positions, step_weights = step_positions[step], weights[step]  # [E, b], [E, b, 1]
        flat = (entry_base + sampled_positions[..., None]).view(1, -1) + current_first[step % 2]
        sampled = pair.view(-1).index_select(0, flat.view(-1)).view(2, num, batch, ways)  # (C_t, C_{t-1})·G
        inverse_norms = norm_sq.clamp_min(0).sqrt().clamp_min(eps).reciprocal()[:, None, :]  # [E, 1, ways]
        cos = sampled[0] * inverse_norms  # [E, b, ways]
        grad_cos = torch.softmax(temperature * cos, dim=-1) * step_weights
        grad_cos.scatter_add_(2, label_index[step], -step_weights)  # dL/dcos
        # c_{t+1} = alpha·c_t − momentum·c_{t-1} + sigma, sigma non-zero only in the sampled columns
        row_scale = config.weight_decay - (grad_cos * cos).sum(1) * inverse_norms[:, 0].square()
        alpha = (1.0 + momentum) - (lr * gain) * row_scale  # [E, ways]
        sigma = grad_cos * inverse_norms * (-lr * gain)  # [E, b, ways]
        rows = support_gram.view(num * k, n_support).index_select(0, gram_rows[step])
        rows = rows.view(num, batch, n_support)  # G[cols, support]
        block = torch.gather(rows, 2, sampled_positions[:, None, :].expand(-1, batch, -1))  # G[cols, cols]
        # the Gram products of (c_{t+1}, c_t) from those of (c_t, c_{t-1}) and sigma
        sigma_dots = (sigma * sampled).sum(2)  # [2, E, ways]: <σ, c_t>_G, <σ, c_{t-1}>_G
        sigma_sq = (sigma[:, :, None, :] * block[..., None] * sigma[:, None, :, :]).sum((1, 2))
        new_cross = alpha * norm_sq - momentum * cross + sigma_dots[0]
        new_norm_sq = (
            alpha * (new_cross + sigma_dots[0])
            - momentum * (alpha * cross - momentum * previous_norm_sq + 2.0 * sigma_dots[1])
            + sigma_sq
        )
        previous_norm_sq, norm_sq, cross = norm_sq, new_norm_sq, new_cross
        # C_{t+1}·G = alpha·C_t·G − momentum·C_{t-1}·G + sigma·G[cols, :], written over C_{t-1}·G
        previous.baddbmm_(sigma.transpose(1, 2), rows, beta=-momentum)
        previous.addcmul_(current, alpha[..., None])
        sigmas[:, :, step] = sigma.transpose(1, 2)
        alphas[step] = alpha
    return _replay_coefficients(sigmas, alphas, columns, k, mu)


def _replay_coefficients(
    sigmas: torch.Tensor, alphas: torch.Tensor, columns: torch.Tensor, k: int, momentum: float
) -> torch.Tensor:
    """C_T from the recorded steps c_{t+1} = α_t·c_t − μ·c_{t-1} + σ_t (no μ term at t = 0), C_0 = [I 0].

    C_T is linear in C_0 and the σ_t: C_T = λ_0·C_0 + Σ_t λ_{t+1}·σ_t, where λ_t = ∂c_T/∂c_t follows
    λ_T = 1, λ_t = α_t·λ_{t+1} − μ·λ_{t+2}. So C is built once at the end instead of updated every step.
    """
    num, ways, steps, batch = sigmas.shape
    lambdas = torch.empty(steps + 1, num, ways, dtype=torch.float64)
    lambdas[steps] = 1.0
    later = torch.zeros(num, ways, dtype=torch.float64)
    for step in range(steps - 1, -1, -1):
        torch.mul(alphas[step], lambdas[step + 1], out=lambdas[step]).sub_(later, alpha=momentum)
        later = lambdas[step + 1]
    coef = torch.zeros(num, ways, k, dtype=torch.float64)
    coef[:, :, :ways] = torch.diag_embed(lambdas[0])
    contributions = (sigmas * lambdas[1:].permute(1, 2, 0)[..., None]).view(num, ways, steps * batch)
    targets = columns.reshape(num, 1, steps * batch).expand(-1, ways, -1)
    return coef.scatter_add_(2, targets, contributions)


def finetune_and_predict(
    features: torch.Tensor,
    episodes: Episodes,
    config: FinetuneConfig,
    init: np.ndarray | None = None,
    chunk: int = 256,
) -> np.ndarray:
    """Per-episode query accuracy (%) after fine-tuning a fresh cosine head on each episode's support set.

    The basis products are taken ``chunk`` episodes at a time; the episodes are fine-tuned in blocks whose
    state stays in cache across the steps (``FINETUNE_STATE_BYTES``).
    """
    ways, shots = episodes.ways, episodes.shots
    num = episodes.num_episodes
    if init is None:
        init = initial_head_weights(episodes, features.shape[1])
    k, n_query = ways + episodes.support.shape[1], episodes.query.shape[1]
    grams = torch.empty(num, k, k, dtype=torch.float64)
    projections = torch.empty(num, k, n_query, dtype=torch.float64)
    support, query = torch.from_numpy(episodes.support), torch.from_numpy(episodes.query)
    for start in range(0, num, chunk):
        part = slice(start, start + chunk)
        grams[part], projections[part] = basis_products(
            features, support[part], query[part], torch.from_numpy(init[part])
        )
    positions, mask = (torch.from_numpy(a) for a in batch_schedule(episodes, config.steps, config.batch_size))
    block = max(MIN_FINETUNE_BLOCK, FINETUNE_STATE_BYTES // (16 * ways * ways * shots))
    with _single_threaded():
        coef = torch.cat(
            [
                finetune_coefficients(grams[part], positions[part], mask[part], ways, shots, config)
                for part in (slice(first, first + block) for first in range(0, num, block))
            ]
        )
    norms = (torch.bmm(coef, grams) * coef).sum(-1).clamp_min(0).sqrt().clamp_min(1e-12)
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

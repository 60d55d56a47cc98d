"""Meta-test benchmark: the incremental program against full recompute and against the per-episode reference.

Before/after. "Before" is the batched program that recomputes C·G ([E, ways, K] x [E, K, K]) at every
step (``tests/reference_metatest.py: recompute_accuracies``), "after" the incremental one
(``negmargin.metatest.finetune_and_predict``); same episodes, initial heads and batch order for both.
5-way and 20-way, 1-shot and 5-shot, 15 queries, mmfewshot's step counts (150 / 600), on two synthetic
ReLU feature banks, or on a real one given with ``--features`` (a ``negmargin features`` .npz):

    D = 64    Omniglot Conv4 width; 423 classes x 20 images (Omniglot's novel split)
    D = 1600  Conv4 at 84x84; 20 classes x 600 images (mini-ImageNet's novel split)

Per-episode accuracies are compared. For an episode whose accuracy differs, both programs' query logits
are recomputed and each changed prediction is reported with the recompute program's top-2 logit gap (a
near-tie shows a gap of the order of the rounding, ~1e-13). The largest logit difference over the first
``--logit-episodes`` episodes is recorded as well.

Reference. 5-way 5-shot, D = 1600, ``--reference-episodes`` episodes: the per-episode reference
(``tests/reference_metatest.py: reference_accuracies``: nn.Parameter + torch.optim.SGD) against the
incremental program (0 skips it; at 2000 it takes ~14 min on 2 idle cores).

    python bench/bench_metatest.py [--episodes 2000] [--threads 2] [--reference-episodes 2000]
        [--features NPZ] [--out bench/results/metatest.json]

The last line printed is the JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_metatest import (  # noqa: E402
    recompute_accuracies,
    recompute_coefficients,
    reference_accuracies,
)

from negmargin.episodes import Episodes, batch_schedule, initial_head_weights, sample_episodes  # noqa: E402
from negmargin.io import load_features, write_json  # noqa: E402
from negmargin.metatest import basis_products, finetune_and_predict, finetune_coefficients  # noqa: E402
from negmargin.options import FinetuneConfig  # noqa: E402

SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]  # (ways, shots)
QUERIES = 15


def synthetic_bank(classes: int, per_class: int, dim: int, spread: float) -> tuple[torch.Tensor, np.ndarray]:
    """float32 ReLU features around random class centres, and their labels; seeded."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, 1, dim)).astype(np.float32)
    noise = rng.normal(size=(classes, per_class, dim)).astype(np.float32)
    features = np.maximum(centres + spread * noise, 0).reshape(-1, dim)
    return torch.from_numpy(features), np.repeat(np.arange(classes), per_class)


def query_logits(
    coefficients, features: torch.Tensor, episodes: Episodes, init: np.ndarray, config: FinetuneConfig, chosen
) -> torch.Tensor:
    """cos(query, head) [n, ways, Q] of the chosen episodes, heads from ``coefficients`` (either program)."""
    index = torch.as_tensor(chosen, dtype=torch.int64)
    grams, projections = basis_products(
        features,
        torch.from_numpy(episodes.support)[index],
        torch.from_numpy(episodes.query)[index],
        torch.from_numpy(init)[index],
    )
    schedule = batch_schedule(episodes, config.steps, config.batch_size)
    positions, mask = (torch.from_numpy(a)[index] for a in schedule)
    coef = coefficients(grams, positions, mask, episodes.ways, episodes.shots, config)
    norms = (torch.bmm(coef, grams) * coef).sum(-1).sqrt()
    return torch.bmm(coef, projections) / norms[:, :, None]


def compare(features: torch.Tensor, labels: np.ndarray, bank: str, ways: int, shots: int, args) -> dict:
    episodes = sample_episodes(labels, ways, shots, QUERIES, args.episodes, seed=0)
    config = FinetuneConfig().for_shots(shots)
    init = initial_head_weights(episodes, features.shape[1])
    start = time.perf_counter()
    before = recompute_accuracies(features, episodes, config, init)
    before_s = time.perf_counter() - start
    start = time.perf_counter()
    after = finetune_and_predict(features, episodes, config, init)
    after_s = time.perf_counter() - start

    differing = np.flatnonzero(np.abs(after - before) > 1e-9)
    flips = []
    if len(differing):
        old = query_logits(recompute_coefficients, features, episodes, init, config, differing)
        new = query_logits(finetune_coefficients, features, episodes, init, config, differing)
        top2 = old.topk(2, dim=1).values
        for row, episode in enumerate(differing):
            changed = torch.nonzero(old[row].argmax(0) != new[row].argmax(0)).flatten()
            flips.append(
                {
                    "episode": int(episode),
                    "accuracy_before": round(float(before[episode]), 4),
                    "accuracy_after": round(float(after[episode]), 4),
                    "queries": [
                        {"query": int(q), "top2_logit_gap": float(top2[row, 0, q] - top2[row, 1, q])}
                        for q in changed
                    ],
                }
            )
    sampled = np.arange(min(args.logit_episodes, args.episodes))
    logit_difference = (
        query_logits(recompute_coefficients, features, episodes, init, config, sampled)
        - query_logits(finetune_coefficients, features, episodes, init, config, sampled)
    ).abs().max()
    case = {
        "bank": bank, "dim": int(features.shape[1]), "ways": ways, "shots": shots, "episodes": args.episodes,
        "steps": config.steps, "before_s": round(before_s, 3), "after_s": round(after_s, 3),
        "speedup": round(before_s / after_s, 1),
        "before_mean": round(float(before.mean()), 4), "after_mean": round(float(after.mean()), 4),
        "episodes_differing": int(len(differing)), "flips": flips,
        "max_logit_difference": float(logit_difference), "logit_episodes": int(len(sampled)),
    }
    print(
        f"{bank} D={case['dim']} {ways}-way {shots}-shot: before {before_s:.2f} s, after {after_s:.2f} s "
        f"({case['speedup']}x); means {case['before_mean']} / {case['after_mean']}; "
        f"{len(differing)} episodes differ; max logit difference {float(logit_difference):.1e}",
        flush=True,
    )
    return case


def reference_comparison(episodes_count: int) -> dict:
    """The per-episode reference against the incremental program, 5-way 5-shot, D = 1600."""
    features, labels = synthetic_bank(20, 600, 1600, spread=6.0)
    episodes = sample_episodes(labels, 5, 5, QUERIES, episodes_count, seed=0)
    config = FinetuneConfig().for_shots(5)
    init = initial_head_weights(episodes, features.shape[1])
    positions, mask = batch_schedule(episodes, config.steps, config.batch_size)
    start = time.perf_counter()
    batched = finetune_and_predict(features, episodes, config, init)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = reference_accuracies(features, episodes, config, init, positions, mask)
    reference_s = time.perf_counter() - start
    record = {
        "episodes": episodes_count, "shots": 5, "steps": config.steps, "dim": 1600,
        "batched_s": round(batched_s, 3), "reference_s": round(reference_s, 3),
        "speedup": round(reference_s / batched_s, 1),
        "batched_mean": round(float(batched.mean()), 4), "reference_mean": round(float(reference.mean()), 4),
        "mean_difference_points": round(float(abs(batched.mean() - reference.mean())), 4),
        "episodes_differing": int((np.abs(batched - reference) > 1e-6).sum()),
    }
    differing = record["episodes_differing"]
    print(f"reference: {reference_s:.2f} s against {batched_s:.2f} s, {differing} differ", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-episodes", type=int, default=2000, help="0: skip the reference")
    parser.add_argument("--logit-episodes", type=int, default=32)
    parser.add_argument("--features", help="a `negmargin features` .npz, not the synthetic banks")
    parser.add_argument("--out", default="bench/results/metatest.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.features:
        stored = load_features(args.features, require_class_names=False)
        banks = [(Path(args.features).name, torch.from_numpy(stored["features"]), stored["labels"])]
    else:
        banks = [
            ("synthetic-omniglot", *synthetic_bank(423, 20, 64, spread=1.5)),
            ("synthetic-mini-imagenet", *synthetic_bank(20, 600, 1600, spread=6.0)),
        ]
    load_before = os.getloadavg()
    cases = [compare(features, labels, name, w, s, args)
             for name, features, labels in banks
             for w, s in SETTINGS]
    reference = reference_comparison(args.reference_episodes) if args.reference_episodes else None
    record = {
        "threads": args.threads,
        "cases": cases,
        "reference": reference,
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()

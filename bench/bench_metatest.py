"""Meta-test benchmark: batched (subspace) implementation against the per-episode reference.

Same cached features, same episodes, initial heads and batch order for both: 2000 episodes, 5-way 5-shot,
600 fine-tuning steps, D = 1600 (the Conv4 width at 84x84). Features are synthetic ReLU features of
20 classes x 600 images (mini-ImageNet's novel split size), hard enough that accuracy is not saturated.

    python bench/bench_metatest.py [--episodes 2000] [--threads 2] [--out bench/results/metatest.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_metatest import reference_accuracies  # noqa: E402

from negmargin.episodes import batch_schedule, initial_head_weights, sample_episodes  # noqa: E402
from negmargin.metatest import FinetuneConfig, finetune_and_predict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/metatest.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    classes, per_class = 20, 600
    centres = rng.normal(size=(classes, 1, args.dim)).astype(np.float32)
    noise = rng.normal(size=(classes, per_class, args.dim)).astype(np.float32)
    features = np.maximum(centres + 6.0 * noise, 0).reshape(-1, args.dim)
    labels = np.repeat(np.arange(classes), per_class)
    bank = torch.from_numpy(features)

    episodes = sample_episodes(labels, 5, args.shots, 15, args.episodes, seed=0)
    config = FinetuneConfig.for_shots(args.shots)
    init = initial_head_weights(episodes, args.dim)
    positions, mask = batch_schedule(episodes, config.steps, config.batch_size)

    start = time.perf_counter()
    batched = finetune_and_predict(bank, episodes, config, init)
    batched_s = time.perf_counter() - start
    print(f"batched: {batched_s:.2f} s, mean {batched.mean():.4f}", flush=True)
    start = time.perf_counter()
    reference = reference_accuracies(bank, episodes, config, init, positions, mask)
    reference_s = time.perf_counter() - start
    print(f"reference: {reference_s:.2f} s, mean {reference.mean():.4f}", flush=True)

    record = {
        "episodes": args.episodes, "shots": args.shots, "steps": config.steps, "dim": args.dim,
        "threads": args.threads, "batched_s": round(batched_s, 3), "reference_s": round(reference_s, 3),
        "speedup": round(reference_s / batched_s, 1),
        "batched_mean": round(float(batched.mean()), 4), "reference_mean": round(float(reference.mean()), 4),
        "mean_difference_points": round(float(abs(batched.mean() - reference.mean())), 4),
        "episodes_differing": int((np.abs(batched - reference) > 1e-6).sum()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

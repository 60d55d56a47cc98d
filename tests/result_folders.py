"""Run folders in the real layout the workflow writes, for the metrics, tables, summary and plot tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def episodes(mean: float, n: int = 40, spread: float = 10.0, seed: int = 0) -> list[float]:
    """``n`` per-episode accuracies with exactly this mean (a fixed pattern around it)."""
    pattern = np.random.default_rng(seed).normal(size=n)
    pattern -= pattern.mean()
    return [float(v) for v in mean + spread * pattern]


def make_run(folder: Path, *, dataset="cub", arch="conv4", margin=-0.01, seed=0, tasks=None, base=None,
             base_correct=None, base_ratio=0.5, novel_ratio=0.3, metric="cosine", temperature=10.0, image_size=84,
             picks=("best",), final_offset=-1.0, history=None) -> Path:
    """A run folder: train/train.json (+ checkpoints), and per checkpoint pick selections, meta-tests and
    (when ``base`` or ``base_correct`` is given) analysis.json. ``tasks`` maps (ways, shots) to the per-episode
    accuracies (or to a mean, expanded with :func:`episodes`); the final checkpoint's are ``final_offset`` lower."""
    tasks = {(5, 1): 60.0, (5, 5): 78.0} if tasks is None else tasks
    train = folder / "train"
    train.mkdir(parents=True)
    config = {"dataset": dataset, "arch": arch.split("-")[0], "model": arch, "metric": metric, "margin": margin,
              "temperature": temperature, "seed": seed, "epochs": 3, "batch_size": 64, "image_size": image_size,
              "num_classes": 100, "val_shots": [1]}
    history = history if history is not None else [
        {"epoch": e, "lr": 0.05, "loss": 2.0 / e, "train_accuracy": 20.0 * e, "val": {"1": {"accuracy": 50.0 + e,
                                                                                             "ci95": 1.0}}}
        for e in (1, 2, 3)]
    (train / "train.json").write_text(json.dumps({
        "config": config,
        "best": {"1": {"epoch": 2, "val_accuracy": 55.5, "val_ci95": 1.1, "checkpoint": "best_1shot.pt"}},
        "final_epoch": 3, "history": history,
    }))
    (train / "best_1shot.pt").write_bytes(b"not a real checkpoint")
    (train / "last.pt").write_bytes(b"not a real checkpoint")
    for pick in picks:
        out = folder / pick
        out.mkdir()
        offset = 0.0 if pick == "best" else final_offset
        (out / "selected_1shot.json").write_text(json.dumps({
            "checkpoint": str(train / ("best_1shot.pt" if pick == "best" else "last.pt")), "shot": 1,
            "mode": "shared", "pick": pick, "val_shot": 1, "epoch": 2 if pick == "best" else 3,
            "val_accuracy": 55.5}))
        for (ways, shots), values in tasks.items():
            values = episodes(values) if isinstance(values, float | int) else list(values)
            values = [v + offset for v in values]
            digest = hashlib.sha256(f"{ways}-{shots}-{len(values)}".encode()).hexdigest()
            (out / f"metatest_{ways}way_{shots}shot.json").write_text(json.dumps({
                "accuracy_mean": float(np.mean(values)), "accuracy_ci95": 0.4,
                "episode_std": float(np.std(values)), "episode_accuracies": values, "ways": ways, "shots": shots,
                "queries": 15, "episodes": len(values), "seed": 0, "episodes_sha256": digest, "finetune": {}}))
        if base is not None or base_correct is not None:
            correct = list(base_correct) if base_correct is not None else [1] * int(base * 4) + [0] * (400 - int(base * 4))
            (out / "analysis.json").write_text(json.dumps({
                "base_accuracy": 100.0 * sum(correct) / len(correct) + offset, "base_accuracy_ci95": 0.7,
                "n_base": len(correct), "base_correct": correct,
                "base_discriminability": {"inter": 1.0, "intra": 1.0 / base_ratio, "ratio": base_ratio},
                "novel_discriminability": {"inter": 1.0, "intra": 1.0 / novel_ratio, "ratio": novel_ratio}}))
    return folder

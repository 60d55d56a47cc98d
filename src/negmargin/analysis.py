"""The paper's margin analysis (spec section 6): base-class accuracy, feature discriminability, and the
aggregation of per-seed numbers into a mean and a 95% confidence interval.

Definitions (see docs/analysis.md):

* discriminability, on L2-normalised features f with class means mu_i over C classes:
  inter = mean over pairs i < j of ||mu_i - mu_j||^2,
  intra = mean over classes of the mean over the class's samples of ||f - mu_i||^2,
  ratio = inter / intra.
* base accuracy: top-1 accuracy (%) of the trained head (no margin at inference) on ``base_holdout``
  features, with a 95% CI from the normal approximation of the binomial, 1.96 * sqrt(p (1 - p) / n).
* across seeds: mean and Student-t half-width t_{0.975, n-1} * s / sqrt(n), s with ddof=1; with fewer than two
  seeds the CI is None (unknown), never 0.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from negmargin.errors import UserError
from negmargin.io import load_features
from negmargin.stats import binomial_ci95

ANALYSIS_FORMAT = "negmargin-analysis/1"
# --------------------------------------------------------------------------------------------------- features


def l2_normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, eps)


def discriminability(features: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Inter- and intra-class variance of L2-normalised features and their ratio (inter / intra).

    Vectorised in O(N·D): class means come from one sorted ``reduceat``; the pairwise term uses
    sum_{i<j} ||mu_i - mu_j||^2 = C * sum_i ||mu_i||^2 - ||sum_i mu_i||^2, and the per-class spread uses
    mean ||f - mu||^2 = mean ||f||^2 - ||mu||^2. ``ratio`` is None when intra is 0 (every class a point).
    """
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise UserError(f"discriminability needs features [N, D] and labels [N], got {features.shape}, {labels.shape}")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise UserError(f"discriminability needs at least 2 classes, got {len(classes)}")
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # One float32 copy of the features, grouped by class and normalised in place; sums accumulate in float64.
    sorted_unit = features[order].astype(np.float32)
    sorted_unit /= np.maximum(np.linalg.norm(sorted_unit, axis=1, keepdims=True), 1e-12)
    means = np.add.reduceat(sorted_unit, starts, axis=0, dtype=np.float64) / counts[:, None]
    sample_sq_norms = np.einsum("nd,nd->n", sorted_unit, sorted_unit, dtype=np.float64)
    mean_sq_norm = np.add.reduceat(sample_sq_norms, starts) / counts

    n_classes = len(classes)
    mean_norms_sq = np.einsum("cd,cd->c", means, means)
    mean_sum = means.sum(axis=0)
    pair_sum = n_classes * mean_norms_sq.sum() - float(mean_sum @ mean_sum)
    inter = max(pair_sum, 0.0) / (n_classes * (n_classes - 1) / 2)
    intra = float(np.clip(mean_sq_norm - mean_norms_sq, 0.0, None).mean())
    return {"inter": float(inter), "intra": intra, "ratio": float(inter / intra) if intra > 0 else None}


# --------------------------------------------------------------------------------------------- base accuracy


@torch.no_grad()
def base_accuracy(head: torch.nn.Module, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                  batch_size: int = 8192) -> dict[str, float | int]:
    """Top-1 accuracy (%) of the trained head's argmax, without margin, and its binomial 95% CI half-width.

    ``labels`` are indices into the head's classes (``base_holdout`` keeps the label order of ``base``).
    """
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(labels) == 0:
        raise UserError("base accuracy needs at least one sample")
    num_classes = int(head.weight.shape[0])
    if features.ndim != 2 or features.shape[1] != head.weight.shape[1]:
        raise UserError(f"features of shape {tuple(features.shape)} do not fit a head of width {head.weight.shape[1]}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise UserError(f"labels outside 0..{num_classes - 1}: these are not the head's base classes")
    was_training = head.training
    head.eval()
    device = head.weight.device
    hits = []
    for start in range(0, len(labels), batch_size):
        logits = head(features[start:start + batch_size].to(device))
        hits.append(logits.argmax(dim=1).cpu() == labels[start:start + batch_size])
    head.train(was_training)
    per_image = torch.cat(hits)
    correct, total = int(per_image.sum()), len(labels)
    return {"accuracy": 100.0 * correct / total, "ci95": binomial_ci95(correct, total), "n": total,
            "correct": per_image.to(torch.uint8).tolist()}


# ---------------------------------------------------------------------------------------------------- analyze


def training_margin(ckpt: dict[str, Any]) -> float | None:
    """The margin the model was trained with; None where it is unknown (an imported checkpoint whose file
    does not say, stored with margin 0 in its model spec because the head needs a number)."""
    config = ckpt.get("config") or {}
    if "margin" in config:
        return None if config["margin"] is None else float(config["margin"])
    return float(ckpt["model_spec"]["margin"])


def head_rows_of(checkpoint: Any, ckpt: dict[str, Any], base_features: Any, class_names: list[str]) -> np.ndarray:
    """The head row of each class of the base features, by name.

    A checkpoint records the class of each head row (``base_class_names``): ours in the order of the base
    split, an imported mmfewshot model in mmfewshot's label order. The head may have more rows than base
    classes (mmfewshot's mini-ImageNet head: 100 for 64); the unused rows still take part in the argmax, as
    they do in training. Without names (an older checkpoint) row i is class i, and only the count is checked;
    an imported model without names has an unknown row order, and base accuracy would be meaningless."""
    trained_on = ckpt.get("base_class_names")
    rows = int(ckpt["model_spec"]["num_classes"])
    if trained_on is None:
        if (ckpt.get("config") or {}).get("source") == "mmfewshot":
            raise UserError(
                f"{checkpoint}: the order of its head rows is unknown (an mmfewshot checkpoint imported without "
                "its dataset or meta CLASSES); import it again with --dataset to measure base accuracy"
            )
        if len(class_names) > rows:
            raise UserError(
                f"{base_features}: {len(class_names)} classes, but the checkpoint's head has only {rows}; "
                "pass features of the base_holdout split of the training dataset"
            )
        return np.arange(len(class_names))
    row_of = {str(name): row for row, name in enumerate(trained_on)}
    if set(class_names) != set(row_of) or len(class_names) != len(row_of):
        raise UserError(
            f"{base_features}: its {len(class_names)} classes are not the {len(trained_on)} base classes "
            f"{checkpoint} was trained on; pass features of the base_holdout split of the training dataset"
        )
    return np.array([row_of[name] for name in class_names], dtype=np.int64)


def analyze(checkpoint: str | os.PathLike, base_features: str | os.PathLike, novel_features: str | os.PathLike,
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Base accuracy on held-out base features, and base/novel discriminability, for one trained model."""
    from negmargin.io import sha256_file
    from negmargin.models import load_model, resolve_checkpoint

    checkpoint_path = resolve_checkpoint(checkpoint)
    model, ckpt = load_model(checkpoint_path, device=device)
    base = load_features(base_features)
    novel = load_features(novel_features)
    spec = ckpt["model_spec"]
    head_rows = head_rows_of(checkpoint_path, ckpt, base_features, [str(n) for n in base["class_names"]])
    accuracy = base_accuracy(model.head, base["features"], head_rows[base["labels"]])
    return {
        "format": ANALYSIS_FORMAT,
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": sha256_file(checkpoint_path),
        "arch": spec["arch"],
        "metric": spec["metric"],
        # The training margin as the checkpoint's config records it: None (unknown) for an imported model
        # whose source does not say; the spec's number only shapes the training logits.
        "margin": training_margin(ckpt),
        "temperature": spec["temperature"],
        "base_features": str(base_features),
        "base_features_sha256": sha256_file(base_features),
        "novel_features": str(novel_features),
        "novel_features_sha256": sha256_file(novel_features),
        "n_base": int(len(base["labels"])),
        "n_base_classes": int(len(np.unique(base["labels"]))),
        "n_novel": int(len(novel["labels"])),
        "n_novel_classes": int(len(np.unique(novel["labels"]))),
        "base_accuracy": accuracy["accuracy"],
        "base_accuracy_ci95": accuracy["ci95"],
        "base_accuracy_ci": "binomial normal approximation, 1.96*sqrt(p(1-p)/n), in percent",
        "base_correct": accuracy["correct"],  # per held-out image, in split order: pairs margins image by image
        "base_discriminability": discriminability(base["features"], base["labels"]),
        "novel_discriminability": discriminability(novel["features"], novel["labels"]),
        "features_normalised": "L2",
    }

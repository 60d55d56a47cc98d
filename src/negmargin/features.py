"""Backbone features of a prepared split: eval mode, no grad, the test transform, in split order."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from negmargin.data.loader import eval_batches
from negmargin.data.store import Split, load_split
from negmargin.errors import UserError
from negmargin.io import write_npz
from negmargin.models import load_model
from negmargin.runtime import resolve_device


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    split: Split,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    channels_last: bool = True,
) -> np.ndarray:
    """float32 [N, D] features of every image of ``split``; the backbone's train/eval mode is restored."""
    was_training = backbone.training
    backbone.eval()
    chunks = []
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for images, _ in eval_batches(split, batch_size, image_size):
            images = images.to(device, memory_format=memory_format, non_blocking=True)
            chunks.append(backbone(images).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), dtype=np.float32)


def _require_finite(features: np.ndarray, model: nn.Module, checkpoint: str | os.PathLike, split: Split,
                    out: str | os.PathLike) -> None:
    """Refuse to write features with NaN or Inf: every later step (meta-test, analysis) would turn them into
    numbers that look like results. Names the first bad image and, where there is one, a non-finite weight."""
    finite_rows = np.isfinite(features).all(axis=1) if features.size else np.ones(len(features), dtype=bool)
    if finite_rows.all():
        return
    bad = np.flatnonzero(~finite_rows)
    first = int(bad[0])
    image = split.image_ids[first] if split.image_ids else f"image {first}"
    broken = next((name for name, tensor in model.state_dict().items()
                   if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    cause = f"its weight {broken} holds NaN or Inf (training diverged?)" if broken else "check its training log"
    raise UserError(
        f"{checkpoint}: NaN or Inf features for {len(bad)} of {len(features)} images of {split.path} (first: "
        f"{image}); {cause}; {out} not written - select or train another checkpoint"
    )


def features_of_checkpoint(
    checkpoint: str | os.PathLike,
    split_dir: str | os.PathLike,
    out: str | os.PathLike,
    device: str = "auto",
    batch_size: int = 256,
    arch: str | None = None,
) -> dict:
    torch_device = resolve_device(device)
    model, ckpt = load_model(checkpoint, torch_device, arch=arch)
    split = load_split(split_dir)
    spec = model.spec
    trained_on = ckpt.get("config", {}).get("dataset")
    if trained_on and split.meta.get("dataset") and trained_on != split.meta["dataset"]:
        raise UserError(
            f"{checkpoint}: trained on {trained_on}, but {split_dir} is a split of {split.meta['dataset']}; "
            "pass a checkpoint of that dataset"
        )
    if split.channels != spec.in_channels:
        raise UserError(
            f"{split_dir}: images have {split.channels} channel(s) but {checkpoint} was trained on {spec.in_channels}"
        )
    channels_last = bool(ckpt.get("config", {}).get("channels_last", True))
    model.backbone.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    features = extract_features(model.backbone, split, spec.image_size, torch_device, batch_size, channels_last)
    _require_finite(features, model, checkpoint, split, out)
    write_npz(
        out,
        features=features.astype(np.float32),
        labels=split.labels.astype(np.int64),
        class_names=np.array(split.class_names),
    )
    return {"features": features.shape, "checkpoint": str(checkpoint), "split": str(split_dir)}

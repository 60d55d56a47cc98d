"""Backbone + margin head, and loading a trained model from a checkpoint."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from negmargin.errors import UserError
from negmargin.models.backbones import build_backbone
from negmargin.models.heads import build_head
from negmargin.options import ARCHS, METRICS

CHECKPOINT_FORMAT = "negmargin-ckpt/1"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights."""

    arch: str
    in_channels: int
    image_size: int
    num_classes: int
    metric: str = "cosine"
    temperature: float = 10.0
    margin: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Classifier(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = build_backbone(spec.arch, spec.in_channels)
        self.feature_dim = self.backbone.feature_dim(spec.image_size)
        if self.feature_dim <= 0:
            raise UserError(f"image size {spec.image_size} is too small for {spec.arch}")
        self.head = build_head(spec.metric, self.feature_dim, spec.num_classes, spec.temperature, spec.margin)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(images), labels)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A ``.pt`` path as is; a ``selected_<k>shot.json`` selection file gives its ``checkpoint`` entry."""
    path = Path(path)
    if path.suffix != ".json":
        return path
    from negmargin.io import read_json

    selection = read_json(path)
    if not isinstance(selection, dict) or "checkpoint" not in selection:
        raise UserError(f"{path}: not a selection file (no 'checkpoint' key)")
    target = Path(selection["checkpoint"])
    if not target.is_absolute() and not target.exists() and (path.parent / target).exists():
        target = path.parent / target
    return target


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; UserError if it is missing or not ours."""
    from negmargin.io import torch_load_weights_only

    path = Path(path)
    ckpt = torch_load_weights_only(path, advice="; re-save it with negmargin")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a negmargin checkpoint (format tag {CHECKPOINT_FORMAT!r} missing)")
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", arch: str | None = None) -> tuple[Classifier, dict]:
    """Rebuild the model stored in a checkpoint, in eval mode. ``arch`` (optional) must match it."""
    ckpt = read_checkpoint(path)
    spec_dict = ckpt["model_spec"]
    if spec_dict.get("arch") not in ARCHS or spec_dict.get("metric") not in METRICS:
        raise UserError(f"{path}: unknown arch/metric {spec_dict.get('arch')!r}/{spec_dict.get('metric')!r}")
    if arch is not None and arch != spec_dict["arch"]:
        raise UserError(f"{path}: checkpoint holds a {spec_dict['arch']} model, but arch {arch!r} was asked for")
    spec = ModelSpec(**spec_dict)
    model = Classifier(spec)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit a {spec.arch} model ({first})") from None
    return model.to(device).eval(), ckpt

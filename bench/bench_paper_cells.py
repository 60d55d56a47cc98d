"""What each cell of the paper profile costs: GPU time and disk, derived (no GPU on this project's machines).

For each (dataset, arch) of config/paper.yaml, from the profile's settings and the datasets' image counts:

* images a training processes (base images x epochs), and forward passes for validation and features;
* FLOPs of one forward pass at 84x84, counted by ``torch.utils.flop_counter`` on the real model (a training
  step is taken as 3 forward passes: forward + backward);
* a GPU-time estimate: the larger of (a) the FLOPs at an *assumed* sustained throughput of one GPU and (b)
  the time the CPU input pipeline needs with the profile's 8 loader workers, at the per-core rate of the
  ``imagenet84`` training transform measured here;
* disk: the prepared store (N x S^2 x 3 bytes, exact from the counts), the raw download, the checkpoints of
  a run (sizes of real ``torch.save`` checkpoints with model and SGD momentum) and its cached features.

mmfewshot's training logs (download.openmmlab.com) cannot be fetched from this project's machines, so the
GPU times are derived, not measured; the assumption is printed with them.

    python bench/bench_paper_cells.py [--out bench/results/paper_cells.json]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

from negmargin.data.transforms import build_transform
from negmargin.models import Classifier, ModelSpec

REPO = Path(__file__).resolve().parents[1]
ASSUMED_GPU_FLOPS = 5e12  # sustained fp32 FLOP/s of one V100 (mmfewshot's 1x V100) on these small convnets:
# about a third of its 15.7 TFLOP/s peak. An assumption, not a measurement: A100/H100 are faster.
LOADER_WORKERS = 8  # config/paper.yaml resources.train.threads: the data-loader workers of a training job

# Images per split as prepared by the paper profile's defaults (docs/datasets.md), and where they come from.
SPLITS = {
    "cub": {
        "stored": 96,
        # 11,788 images over 200 classes (negmargin.data.cub.CUB_IMAGES); the 100 base classes hold about half
        # (CUB classes have 41-60 images; the exact split needs the archive); 5 per base class held out.
        "base_classes_images": 11_788 * 100 // 200, "base_holdout": 500, "val": 11_788 * 50 // 200,
        "novel": 11_788 * 50 // 200, "exact": False, "exact_base": False,
        "raw": "CUB_200_2011.tgz 1.15 GB, extracted into data/raw/cub/ (about 1.2 GB more)",
        "raw_bytes": 1_150_585_339 * 2,
    },
    "mini_imagenet": {
        "stored": 96,
        # Ravi's CSVs: 64/16/20 classes x 600; base_holdout from ILSVRC: the other train images of the 64 base
        # classes, about 700 per class (docs/datasets.md).
        "base_classes_images": 64 * 600, "base_holdout": 64 * 700, "val": 16 * 600, "novel": 20 * 600,
        "exact": False, "exact_base": True, "holdout_outside_base": True,
        "raw": "ILSVRC2012_img_train.tar, about 138 GB, read in place (or Ravi's images.zip)",
        "raw_bytes": 138 * 10**9,
    },
    "tiered_imagenet": {
        "stored": 84,
        # Ren et al.'s pickles: 448,695 / 124,261 / 206,209 images (asserted by negmargin prepare); 20 per base
        # class (351) held out.
        "base_classes_images": 448_695, "base_holdout": 351 * 20, "val": 124_261, "novel": 206_209,
        "exact": True, "exact_base": True,
        "raw": "tiered-imagenet.tar 12.9 GB, read in place",
        "raw_bytes": 12_900_000_000,
    },
}


def merged_paper_config() -> dict:
    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return merge(config, yaml.safe_load((REPO / "config" / "paper.yaml").read_text()))


def forward_flops(spec: ModelSpec) -> int:
    model = Classifier(spec).eval()
    images = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.backbone(images)
    return int(counter.get_total_flops())


def checkpoint_bytes(spec: ModelSpec) -> tuple[int, int]:
    """(parameters, bytes of one checkpoint as the trainer writes it: model, SGD momentum, bookkeeping)."""
    model = Classifier(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(2, spec.in_channels, spec.image_size, spec.image_size)
    labels = torch.zeros(2, dtype=torch.int64)
    F.cross_entropy(model(images, labels), labels).backward()
    optimizer.step()  # creates the momentum buffers
    buffer = io.BytesIO()
    torch.save({"model_spec": spec.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict()},
               buffer)
    return sum(p.numel() for p in model.parameters()), buffer.getbuffer().nbytes


def augmentation_rate(images: int = 1500) -> float:
    """Images per second of the imagenet84 training transform on one CPU thread, 96x96 stored images."""
    torch.set_num_threads(1)
    transform = build_transform("imagenet84", train=True, image_size=84, stored_size=96)
    stored = torch.randint(0, 256, (64, 3, 96, 96), dtype=torch.uint8)
    torch.manual_seed(0)
    for image in stored[:16]:
        transform(image)  # warm-up
    start = time.perf_counter()
    for index in range(images):
        transform(stored[index % 64])
    return images / (time.perf_counter() - start)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cells(per_core: float) -> list[dict]:
    config = merged_paper_config()
    rows = []
    for dataset in config["run_datasets"]:
        block, counts = config["datasets"][dataset], SPLITS[dataset]
        stored = counts["stored"]
        holdout_outside = counts.get("holdout_outside_base", False)
        base_train = counts["base_classes_images"] - (0 if holdout_outside else counts["base_holdout"])
        store_images = (counts["base_classes_images"] + (counts["base_holdout"] if holdout_outside else 0)
                        + counts["val"] + counts["novel"])
        for arch in block["archs"]:
            train = block["train"][arch]
            classes = train.get("num_classes") or {"cub": 100, "mini_imagenet": 64, "tiered_imagenet": 351}[dataset]
            spec = ModelSpec(arch, 3, 84, classes)
            flops = forward_flops(spec)
            params, checkpoint = checkpoint_bytes(spec)
            epochs, val_every = train["epochs"], train.get("val_every", 5)
            validations = epochs // val_every + (1 if epochs % val_every else 0)
            trained = base_train * epochs
            forward_only = validations * counts["val"] + counts["novel"] + counts["base_holdout"]
            compute_s = (3 * trained + forward_only) * flops / ASSUMED_GPU_FLOPS
            input_s = trained / (LOADER_WORKERS * per_core)
            dim = Classifier(spec).feature_dim
            features = (counts["novel"] + counts["base_holdout"]) * dim * 4
            rows.append({
                "dataset": dataset, "arch": arch, "epochs": epochs, "base_train_images": base_train,
                "images_trained": trained, "forward_only_images": forward_only, "forward_gflops": flops / 1e9,
                "parameters": params, "compute_bound_h": compute_s / 3600, "input_bound_h": input_s / 3600,
                "gpu_hours": max(compute_s, input_s) / 3600, "bound": "GPU" if compute_s >= input_s else "input",
                "store_bytes": store_images * stored * stored * 3, "raw": counts["raw"],
                "raw_bytes": counts["raw_bytes"], "checkpoints_bytes": 3 * checkpoint,
                "features_bytes": features, "counts_exact": counts["exact"], "base_exact": counts["exact_base"],
            })
    return rows


def duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def markdown(rows: list[dict]) -> str:
    lines = ["| cell | images trained (base × epochs) | GPU time (derived) | prepared data | raw data | "
             "per run: checkpoints + features |", "|---|---:|---:|---:|---|---:|"]
    for row in rows:
        approx = "" if row["counts_exact"] else "≈ "
        base = "" if row["base_exact"] else "≈ "
        lines.append(
            f"| {row['dataset']} {row['arch']} | {base}{row['base_train_images']:,} × {row['epochs']} "
            f"{'≈' if base else '='} {row['images_trained'] / 1e6:.2f} M | ≈ {duration(row['gpu_hours'])} "
            f"({row['bound']}-bound) | "
            f"{approx}{human_bytes(row['store_bytes'])} | {row['raw']} | "
            f"{human_bytes(row['checkpoints_bytes'])} + {approx}{human_bytes(row['features_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/paper_cells.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other jobs on the machine slow the measured transform down
    per_core = augmentation_rate()
    torch.set_num_threads(2)
    rows = cells(per_core)
    result = {
        "assumed_gpu_flops": ASSUMED_GPU_FLOPS, "loader_workers": LOADER_WORKERS,
        "augmentation_img_s_per_core": round(per_core, 1), "training_step_forward_equivalents": 3,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}",
        "cells": [{key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}
                  for row in rows],
        "markdown": markdown(rows),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"imagenet84 training transform: {per_core:.0f} img/s per core (x {LOADER_WORKERS} workers); load "
          f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    for row in rows:
        print(f"{row['dataset']} {row['arch']}: {row['forward_gflops']:.3f} GFLOPs forward, "
              f"{row['parameters']:,} parameters; compute {row['compute_bound_h']:.2f} h, "
              f"input {row['input_bound_h']:.2f} h")
    print(result["markdown"])
    assert math.isfinite(sum(row["gpu_hours"] for row in rows))


if __name__ == "__main__":
    main()

"""What each cell of the paper profile costs: GPU time, measured and derived, and disk.

For each (dataset, arch) of config/paper.yaml, from the profile's settings and the datasets' image counts:

* images a training processes (base images x epochs), and forward passes for validation and features;
* **measured** GPU time of one epoch and of the whole training: those image counts over the trainer img/s
  that ``bash bench/bench_gpu.sh`` measured (``--gpu``, default bench/results/training_gpu.json; the
  default input path, ``batched``: the base split in GPU memory, augmented there; bf16, channels_last).
  Training only: the validation every few epochs, feature extraction and meta-tests are not in it;
* FLOPs of one forward pass at 84x84, counted by ``torch.utils.flop_counter`` on the real model, and a
  **derived** time at an *assumed* sustained throughput of a V100 (mmfewshot's 1x V100; a training step
  taken as 3 forward passes), for readers on older GPUs;
* disk: the prepared store (N x S^2 x 3 bytes, exact from the counts), the raw download, the checkpoints of
  a run (sizes of real ``torch.save`` checkpoints with model and SGD momentum) and its cached features.

mmfewshot's training logs (download.openmmlab.com) cannot be fetched from this project's machines, so the
V100 figures stay an estimate; the assumption is printed with them.

    python bench/bench_paper_cells.py [--gpu bench/results/training_gpu.json] [--out bench/results/paper_cells.json]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

from negmargin.models import Classifier, ModelSpec

REPO = Path(__file__).resolve().parents[1]
ASSUMED_GPU_FLOPS = 5e12  # sustained fp32 FLOP/s of one V100 (mmfewshot's 1x V100) on these small convnets:
# about a third of its 15.7 TFLOP/s peak. An assumption, not a measurement: A100/H100 are faster.
GPU_PATH = "batched"  # the trainer's default input path (TrainConfig.augment, data_on_device auto)
SETTING_OF_ARCH = {"conv4": "conv4_84", "resnet12": "resnet12_84"}  # bench/bench_training.py's settings

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


def measured_gpu(path: Path) -> dict:
    """The GPU bench's trainer img/s per arch on the default input path (the best of its rounds), and what
    it ran on."""
    bench = json.loads(path.read_text())
    if bench.get("device") != "cuda":
        raise SystemExit(f"{path}: expected a GPU run of bench/bench_training.py (device cuda), "
                         f"found device {bench.get('device')!r}")
    rates = {}
    for arch, setting in SETTING_OF_ARCH.items():
        runs = [row["trainer_img_s"] for row in bench["results"]
                if row["setting"] == setting and row["path"] == GPU_PATH]
        if not runs:
            raise SystemExit(f"{path}: no {setting} run on the {GPU_PATH} path")
        rates[arch] = max(runs)
    machine = bench["machine"]
    return {"file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
            "gpu": machine.get("gpu"), "torch": machine.get("torch"), "amp": bench.get("amp"),
            "channels_last": bench.get("channels_last"), "path": GPU_PATH, "trainer_img_s": rates}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cells(gpu: dict) -> list[dict]:
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
            derived_s = (3 * trained + forward_only) * flops / ASSUMED_GPU_FLOPS
            rate = gpu["trainer_img_s"][arch]
            dim = Classifier(spec).feature_dim
            features = (counts["novel"] + counts["base_holdout"]) * dim * 4
            rows.append({
                "dataset": dataset, "arch": arch, "epochs": epochs, "base_train_images": base_train,
                "images_trained": trained, "forward_only_images": forward_only, "forward_gflops": flops / 1e9,
                "parameters": params, "gpu_trainer_img_s": rate, "gpu_epoch_min": base_train / rate / 60,
                "gpu_training_h": trained / rate / 3600, "v100_derived_h": derived_s / 3600,
                "store_bytes": store_images * stored * stored * 3, "raw": counts["raw"],
                "raw_bytes": counts["raw_bytes"], "checkpoints_bytes": 3 * checkpoint,
                "features_bytes": features, "counts_exact": counts["exact"], "base_exact": counts["exact_base"],
            })
    return rows


def duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 90 else f"{value / 60:.1f} min"


def markdown(rows: list[dict], gpu_name: str) -> str:
    name = gpu_name.removeprefix("NVIDIA ")  # the GPU the bench ran on, as torch names it
    lines = [f"| cell | images trained (base × epochs) | one epoch, {name} (measured) | training, {name} (measured) | "
             "training, V100 (derived) | prepared data | raw data | per run: checkpoints + features |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        approx = "" if row["counts_exact"] else "≈ "
        base = "" if row["base_exact"] else "≈ "
        lines.append(
            f"| {row['dataset']} {row['arch']} | {base}{row['base_train_images']:,} × {row['epochs']} "
            f"{'≈' if base else '='} {row['images_trained'] / 1e6:.2f} M | {seconds(row['gpu_epoch_min'] * 60)} | "
            f"{duration(row['gpu_training_h'])} | ≈ {duration(row['v100_derived_h'])} | "
            f"{approx}{human_bytes(row['store_bytes'])} | {row['raw']} | "
            f"{human_bytes(row['checkpoints_bytes'])} + {approx}{human_bytes(row['features_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=Path, default=REPO / "bench" / "results" / "training_gpu.json",
                        help="the JSON that bash bench/bench_gpu.sh wrote (default: the committed H200 run)")
    parser.add_argument("--out", default="bench/results/paper_cells.json")
    args = parser.parse_args()
    gpu = measured_gpu(args.gpu.resolve())
    torch.set_num_threads(2)
    rows = cells(gpu)
    result = {
        "gpu_measured": gpu, "assumed_v100_flops": ASSUMED_GPU_FLOPS, "training_step_forward_equivalents": 3,
        "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}",
        "cells": [{key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}
                  for row in rows],
        "markdown": markdown(rows, gpu["gpu"]),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"measured on {gpu['gpu']} (torch {gpu['torch']}, {gpu['amp']}, {gpu['path']} path): trainer img/s "
          + ", ".join(f"{arch} {rate:,.0f}" for arch, rate in gpu["trainer_img_s"].items()))
    for row in rows:
        print(f"{row['dataset']} {row['arch']}: {row['forward_gflops']:.3f} GFLOPs forward, "
              f"{row['parameters']:,} parameters; training {row['gpu_training_h']:.2f} h measured, "
              f"{row['v100_derived_h']:.2f} h derived for a V100")
    print(result["markdown"])
    assert math.isfinite(sum(row["gpu_training_h"] + row["v100_derived_h"] for row in rows))


if __name__ == "__main__":
    main()

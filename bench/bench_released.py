"""Feature-extraction speed of the `released` target on the CPU: Conv4 and ResNet-12 at 84x84.

For each backbone, in one process and side by side:
* model-only img/s: the backbone's eval forward (no grad) on a batch of random images already in memory, in
  the NCHW memory format an imported mmfewshot model runs in, and in channels_last (our trained models');
* pipeline img/s: `negmargin.features.features_of_checkpoint` on a prepared split of random uint8 images
  stored at 96 px (CUB's stored size): reading, the test transform (centre crop to 84, normalisation) and
  the model, as the `released_features` job runs it.
From the pipeline rate it derives the time of each dataset's novel split, whose image counts come from the
dataset registry (mini-ImageNet: classes x images_per_class) or, where the registry has no count, from
docs/datasets.md (tiered-ImageNet) and CUB's 11,788 images in 200 classes (about 59 per class).

    python bench/bench_released.py [--threads 2] [--out bench/results/released.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from negmargin.data.store import write_split
from negmargin.datasets import DATASETS
from negmargin.io import torch_save
from negmargin.models import CHECKPOINT_FORMAT, Classifier, ModelSpec

# Images of each novel split; the registry's classes x images_per_class where it has both.
NOVEL_IMAGES = {
    "cub": (round(11_788 / 200 * DATASETS["cub"].classes["novel"]),
            "50 of CUB's 200 classes, 11,788 images in all (docs/datasets.md): about 2,947"),
    "mini_imagenet": (DATASETS["mini_imagenet"].classes["novel"] * DATASETS["mini_imagenet"].images_per_class,
                      "registry: 20 classes x 600 images"),
    "tiered_imagenet": (206_209, "docs/datasets.md: 160 classes, 206,209 images"),
}


def model_only(arch: str, channels_last: bool, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    backbone = Classifier(ModelSpec(arch, 3, 84, 100)).backbone.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    backbone.to(memory_format=memory_format)
    images = torch.randn(batch, 3, 84, 84).to(memory_format=memory_format)
    with torch.no_grad():
        backbone(images)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            backbone(images)
    return batch * repeats / (time.perf_counter() - start)


def pipeline(arch: str, channels_last: bool, split: Path, out: Path, batch: int) -> float:
    from negmargin.features import features_of_checkpoint

    spec = ModelSpec(arch, 3, 84, 100)
    checkpoint = out / f"{arch}.pt"
    torch_save(checkpoint, {"format": CHECKPOINT_FORMAT, "model_spec": spec.to_dict(),
                            "config": {"channels_last": channels_last}, "model": Classifier(spec).state_dict()})
    start = time.perf_counter()
    info = features_of_checkpoint(checkpoint, split, out / f"{arch}.npz", device="cpu", batch_size=batch)
    return info["features"][0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="the paper profile's features.batch_size")
    parser.add_argument("--images", type=int, default=512, help="images of the synthetic split")
    parser.add_argument("--out", default="bench/results/released.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        labels = np.arange(args.images) % 16
        split = write_split(Path(tmp) / "novel", rng.integers(0, 256, (args.images, 96, 96, 3), dtype=np.uint8),
                            labels, [f"class{c}" for c in range(16)],
                            meta={"dataset": "synthetic", "split": "novel", "pipeline": "imagenet84"}).path
        for arch, repeats in (("conv4", 4), ("resnet12", 1)):
            model = {fmt: model_only(arch, fmt == "channels_last", args.batch_size, repeats)
                     for fmt in ("nchw", "channels_last")}
            piped = pipeline(arch, False, split, Path(tmp), args.batch_size)
            model_after = model_only(arch, False, args.batch_size, repeats)  # bracket: the machine drifts
            row = {"arch": arch, "input": "3x84x84", "batch": args.batch_size,
                   "model_only_nchw_img_s": [round(model["nchw"], 1), round(model_after, 1)],
                   "model_only_channels_last_img_s": round(model["channels_last"], 1),
                   "pipeline_nchw_img_s": round(piped, 1),
                   "novel_split_minutes": {name: round(count / piped / 60, 1)
                                           for name, (count, _) in NOVEL_IMAGES.items()}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    record = {"threads": args.threads, "results": rows,
              "novel_images": {name: {"images": count, "source": source} for name, (count, source) in NOVEL_IMAGES.items()},
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "python": platform.python_version()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

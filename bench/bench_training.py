"""Training-throughput benchmark: the trainer end to end against the model alone.

For each setting, in one process and side by side:
* model-only img/s: forward + backward + SGD step on one batch already in memory (same model, batch,
  memory format and threads);
* trainer img/s: `negmargin.training.train` for one epoch on a prepared split of synthetic images (the
  trainer's own measure: images of the epoch / wall time of the epoch loop, data loading and
  augmentation included, validation excluded).
The ratio trainer/model is the share of time the input pipeline and bookkeeping leave to the model.

    python bench/bench_training.py [--threads 2] [--out bench/results/training.json]
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
import torch.nn.functional as F

from negmargin.data.store import write_split
from negmargin.models import Classifier, ModelSpec
from negmargin.training import TrainConfig, train

SETTINGS = [
    # name, pipeline, stored side, input side, channels, images in the epoch
    ("conv4_84_imagenet84", "imagenet84", 96, 84, 3, 1280),
    ("conv4_28_omniglot", "omniglot", 28, 28, 1, 12800),
]


def model_only(spec: ModelSpec, batch: int, iterations: int, channels_last: bool = True) -> float:
    torch.manual_seed(0)
    model = Classifier(spec).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size).to(memory_format=memory_format)
    labels = torch.randint(0, spec.num_classes, (batch,))
    for step in range(iterations + 2):
        if step == 2:  # two warm-up iterations
            start = time.perf_counter()
        loss = F.cross_entropy(model(images, labels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch * iterations / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="bench/results/training.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pipeline, stored, size, channels, count in SETTINGS:
            rng = np.random.default_rng(0)
            classes = 64
            images = rng.integers(0, 256, size=(count, stored, stored, channels), dtype=np.uint8)
            labels = np.arange(count) % classes
            names = [f"class{c}" for c in range(classes)]
            data = Path(tmp) / name
            for split in ("base", "val"):
                write_split(data / split, images if split == "base" else images[: classes * 20],
                            labels if split == "base" else labels[: classes * 20], names,
                            meta={"dataset": "synthetic", "split": split, "pipeline": pipeline})
            spec = ModelSpec("conv4", channels, size, classes, "cosine", 10.0, -0.01)
            iterations = count // args.batch_size
            model_rate = model_only(spec, args.batch_size, iterations)
            config = TrainConfig(arch="conv4", margin=-0.01, epochs=1, batch_size=args.batch_size,
                                 image_size=size, val_episodes=1, device="cpu", log_every=10**9,
                                 warmup_iters=10)
            summary = train(data, Path(tmp) / f"run_{name}", config)
            trainer_rate = summary["history"][0]["images_per_s"]
            model_rate_after = model_only(spec, args.batch_size, iterations)  # bracket: the machine may drift
            model_mean = (model_rate + model_rate_after) / 2
            row = {"setting": name, "pipeline": pipeline, "input": f"{channels}x{size}x{size}",
                   "batch": args.batch_size, "images": count, "model_only_img_s": round(model_mean, 1),
                   "model_only_runs": [round(model_rate, 1), round(model_rate_after, 1)],
                   "trainer_img_s": round(trainer_rate, 1), "ratio": round(trainer_rate / model_mean, 3)}
            print(json.dumps(row), flush=True)
            results.append(row)
    record = {"threads": args.threads, "results": results,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "python": platform.python_version()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

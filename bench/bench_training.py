"""Training-throughput benchmark: the trainer end to end against the model alone, for each input path.

For each setting and input path, in one process and side by side:
* model-only img/s: forward + backward + SGD step on one batch already on the device (same model, batch,
  memory format, autocast and threads), measured before and after the trainer run; the mean counts;
* trainer img/s: `negmargin.training.train` on a prepared split of random uint8 images (the trainer's own
  measure: the last epoch's images over the wall time of its loop, data loading and augmentation
  included, validation excluded).
The ratio trainer/model is the share of the time that the input pipeline and the bookkeeping leave to
the model. Input paths (``TrainConfig.augment`` and ``data_on_device``):
* ``per-image``: the reference, torchvision v2 image by image in the data loader (the path before issue 18);
* ``batched``: whole batches augmented on the training device, the base split kept in device memory where
  it fits (``data_on_device auto``: on CUDA; on the CPU it reads the memory map);
* ``batched-streamed``: the same, with ``data_on_device never`` (each batch read from the memory map and
  copied through pinned memory; on the CPU the same as ``batched``).

With ``--project``, one epoch and one whole training of each paper cell (config/paper.yaml's epochs, the
base split's image count) are projected from the trainer's img/s: training alone, without the validations
every 5 epochs, feature extraction and meta-tests. ``--compile-check`` also times ``torch.compile`` against
eager for the first setting's model alone (compile time and steady img/s).

    python bench/bench_training.py [--threads 2] [--out bench/results/training.json]
    bash bench/bench_gpu.sh          # the GPU run: --device cuda --amp bf16, larger epochs, --project

With ``--repeat N`` every setting and path is measured in N interleaved rounds, and the summary takes, per
setting and path, the highest model-only img/s of any single measurement and the highest trainer img/s
(the least disturbed figures on a shared machine) and their ratio. The last line printed is one JSON object:
device, threads, amp, rounds and that ratio of each setting/path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import yaml

from negmargin.data.cub import CUB_IMAGES
from negmargin.data.cub import DEFAULT_BASE_HOLDOUT as CUB_HOLDOUT
from negmargin.data.store import write_split
from negmargin.data.tiered_imagenet import DEFAULT_BASE_HOLDOUT as TIERED_HOLDOUT
from negmargin.data.tiered_imagenet import NUM_IMAGES as TIERED_IMAGES
from negmargin.datasets import DATASETS
from negmargin.io import write_json
from negmargin.models import Classifier, ModelSpec
from negmargin.options import TrainConfig
from negmargin.training import train

REPO = Path(__file__).resolve().parents[1]
CLASSES = 64
# name: (arch, pipeline, stored side, input side, channels)
SETTINGS = {
    "conv4_84": ("conv4", "imagenet84", 96, 84, 3),
    "resnet12_84": ("resnet12", "imagenet84", 96, 84, 3),
    "conv4_28_omniglot": ("conv4", "omniglot", 28, 28, 1),
}
PATHS = {"per-image": ("per-image", "auto"), "batched": ("batched", "auto"),
         "batched-streamed": ("batched", "never")}
# Base images of each paper dataset as prepared by default (base_holdout left out). CUB: about half of its
# 11,788 images are in the 100 base classes (the exact count needs the archive), less 5 per class held out;
# mini-ImageNet: 64 x 600 (from ILSVRC; the held-out images come from outside them); tiered-ImageNet: the
# archive's train images less 20 per base class held out.
PAPER_BASE_IMAGES = {
    "cub": CUB_IMAGES * DATASETS["cub"].classes["base"] // 200 - CUB_HOLDOUT * DATASETS["cub"].classes["base"],
    "mini_imagenet": DATASETS["mini_imagenet"].classes["base"] * DATASETS["mini_imagenet"].images_per_class,
    "tiered_imagenet": TIERED_IMAGES["train"] - TIERED_HOLDOUT * DATASETS["tiered_imagenet"].classes["base"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(spec: ModelSpec, batch: int, iterations: int, device: torch.device, amp: bool,
               compiled: bool = False) -> float:
    """img/s of forward + backward + SGD step on one batch already on ``device`` (2 warm-up steps)."""
    torch.manual_seed(0)
    model = Classifier(spec).train().to(device=device, memory_format=torch.channels_last)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, device=device)
    images = images.to(memory_format=torch.channels_last)
    labels = torch.randint(0, spec.num_classes, (batch,), device=device)
    for step in range(iterations + 2):
        if step == 2:
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = step_model(images, labels)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return batch * iterations / (time.perf_counter() - start)


def synthetic_dataset(folder: Path, pipeline: str, stored: int, channels: int, count: int) -> Path:
    """A prepared dataset (base and a small val) of random uint8 images."""
    rng = np.random.default_rng(0)
    names = [f"class{c}" for c in range(CLASSES)]
    for split, classes, images in (("base", CLASSES, count), ("val", 5, 5 * 16)):  # val: one 5-way 1-shot episode
        pixels = rng.integers(0, 256, size=(images, stored, stored, channels), dtype=np.uint8)
        write_split(folder / split, pixels, np.arange(images) % classes, names[:classes],
                    meta={"dataset": "synthetic", "split": split, "pipeline": pipeline})
    return folder


def trainer_rate(data: Path, out: Path, arch: str, size: int, path: str, args: argparse.Namespace) -> float:
    augment, data_on_device = PATHS[path]
    config = TrainConfig(arch=arch, margin=-0.01, epochs=args.epochs, batch_size=args.batch_size,
                         image_size=size, val_episodes=1, val_every=10**6, device=args.device,
                         amp=args.amp, num_workers=args.workers, augment=augment,
                         data_on_device=data_on_device, compile=args.compile, log_every=10**9,
                         warmup_iters=10, lr_steps=(10**6,))
    summary = train(data, out, config)
    return float(summary["history"][-1]["images_per_s"])


def best_of(results: list[dict]) -> list[dict]:
    """Per setting and path, the best (highest) model-only img/s of any single measurement and the best
    trainer img/s over the rounds, and their ratio: on a shared machine the least disturbed figures."""
    summary: dict[tuple[str, str], dict] = {}
    for row in results:
        best = summary.setdefault((row["setting"], row["path"]), {
            "setting": row["setting"], "path": row["path"], "model_only_img_s": 0.0, "trainer_img_s": 0.0,
            "rounds": 0, "round_ratios": []})
        best["model_only_img_s"] = max(best["model_only_img_s"], *row["model_only_runs"])
        best["trainer_img_s"] = max(best["trainer_img_s"], row["trainer_img_s"])
        best["rounds"] += 1
        best["round_ratios"].append(row["ratio"])
    for best in summary.values():
        best["ratio"] = round(best["trainer_img_s"] / best["model_only_img_s"], 3)
    return list(summary.values())


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def projection(rates: dict[str, dict[str, float]]) -> list[dict]:
    """Hours of one epoch and of one training of each paper cell, from the trainer's img/s."""
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())["datasets"]
    rows = []
    for dataset, images in PAPER_BASE_IMAGES.items():
        for arch in ("conv4", "resnet12"):
            epochs = int(paper[dataset]["train"][arch]["epochs"])
            for path, rate in rates.get(f"{arch}_84", {}).items():
                epoch_s = images / rate
                rows.append({"dataset": dataset, "arch": arch, "path": path, "base_images": images,
                             "epochs": epochs, "trainer_img_s": rate, "epoch_min": round(epoch_s / 60, 2),
                             "cell_h": round(epochs * epoch_s / 3600, 2)})
    return rows


def compile_check(spec: ModelSpec, batch: int, iterations: int, device: torch.device, amp: bool) -> dict:
    """Eager against torch.compile for the model alone: the compiled model's first step (compilation) and
    the steady img/s of both, eager measured before and after."""
    eager_before = model_only(spec, batch, iterations, device, amp)
    started = time.perf_counter()
    compiled = model_only(spec, batch, iterations, device, amp, compiled=True)
    total_s = time.perf_counter() - started
    eager_after = model_only(spec, batch, iterations, device, amp)
    eager = (eager_before + eager_after) / 2
    return {"arch": spec.arch, "eager_img_s": round(eager, 1), "eager_runs": [round(eager_before, 1),
            round(eager_after, 1)], "compiled_img_s": round(compiled, 1),
            "compile_and_run_s": round(total_s, 1), "speedup": round(compiled / eager, 3)}


def machine(device: torch.device) -> dict:
    record = {"python": platform.python_version(), "torch": torch.__version__,
              "torchvision": torchvision.__version__, "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers of the trainer")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"))
    parser.add_argument("--compile", action="store_true", help="train and time the model through torch.compile")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1, help="trainer epochs; the last one is measured")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--paths", nargs="+", default=["per-image", "batched"], choices=list(PATHS))
    parser.add_argument("--images", nargs="+", default=["conv4_84=640", "resnet12_84=192",
                                                        "conv4_28_omniglot=6400"],
                        help="images per trainer epoch, as setting=N")
    parser.add_argument("--model-iterations", nargs="+", default=["conv4_84=6", "resnet12_84=2",
                                                                  "conv4_28_omniglot=40"],
                        help="timed model-only steps before and after each trainer run, as setting=N")
    parser.add_argument("--project", action="store_true", help="project paper epochs and cells")
    parser.add_argument("--compile-check", action="store_true", help="time torch.compile against eager")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every setting and path; the summary takes the best of each figure")
    parser.add_argument("--out", default="bench/results/training.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.amp == "bf16"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer sets it
    images = {key: int(value) for key, value in (item.split("=") for item in args.images)}
    model_iterations = {key: int(value) for key, value in (item.split("=") for item in args.model_iterations)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {name: synthetic_dataset(Path(tmp) / name, SETTINGS[name][1], SETTINGS[name][2],
                                            SETTINGS[name][4], images[name]) for name in args.settings}
        for repeat in range(args.repeat):  # rounds interleave the settings, so a drift of the machine hits all
            for name in args.settings:
                arch, pipeline, stored, size, channels = SETTINGS[name]
                spec = ModelSpec(arch, channels, size, CLASSES, "cosine", 10.0, -0.01)
                paths = args.paths if pipeline == "imagenet84" else ["batched"]  # omniglot: the same batches
                for path in paths:
                    before = model_only(spec, args.batch_size, model_iterations[name], device, amp, args.compile)
                    trainer = trainer_rate(datasets[name], Path(tmp) / f"run_{name}_{path}_{repeat}", arch, size,
                                           path, args)
                    after = model_only(spec, args.batch_size, model_iterations[name], device, amp, args.compile)
                    model_rate = (before + after) / 2
                    row = {"round": repeat, "setting": name, "path": path, "arch": arch, "pipeline": pipeline,
                           "input": f"{channels}x{size}x{size}", "batch": args.batch_size, "images": images[name],
                           "epochs": args.epochs, "model_only_img_s": round(model_rate, 1),
                           "model_only_runs": [round(before, 1), round(after, 1)],
                           "trainer_img_s": round(trainer, 1), "ratio": round(trainer / model_rate, 3),
                           "load_average": load_average()}
                    print(json.dumps(row), flush=True)
                    results.append(row)
    summary = best_of(results)
    ratios = {f"{row['setting']}/{row['path']}": row["ratio"] for row in summary}
    rates: dict[str, dict[str, float]] = {}
    for row in summary:
        rates.setdefault(row["setting"], {})[row["path"]] = row["trainer_img_s"]
    record = {"device": str(device), "threads": args.threads, "workers": args.workers, "amp": args.amp,
              "channels_last": True, "compile": args.compile, "repeat": args.repeat, "summary": summary,
              "results": results, "machine": machine(device)}
    if args.project:
        record["projection"] = projection(rates)
        for row in record["projection"]:
            print(json.dumps(row), flush=True)
    if args.compile_check:
        arch, _, _, size, channels = SETTINGS[args.settings[0]]
        spec = ModelSpec(arch, channels, size, CLASSES, "cosine", 10.0, -0.01)
        record["compile_check"] = compile_check(spec, args.batch_size, model_iterations[args.settings[0]],
                                                device, amp)
        print(json.dumps(record["compile_check"]), flush=True)
    write_json(args.out, record)
    print(json.dumps({"device": str(device), "threads": args.threads, "amp": args.amp, "repeat": args.repeat,
                      "ratios": ratios}))


if __name__ == "__main__":
    main()

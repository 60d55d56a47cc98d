"""Input pipeline benchmark: the batched ``imagenet84`` augmentation against torchvision's per-image v2 pipeline.

Same images for both: random uint8 96x96 RGB images stored NHWC as the prepared splits are, seen as NCHW
(the loader's ``permute``), batches of 64, output 84x84. The per-image side is the loader's current path
(``build_transform("imagenet84", train=True)`` image by image, then ``torch.stack``); the batched side is
``negmargin.data.augment.BatchAugment`` with each crop/resize method (the top-level ``batched_img_s`` and
``ratio`` are those of the device's default, ``augment.default_method``). Rounds alternate between the
implementations and the median round counts, so a drift of the machine's speed hits all of them alike;
on the CPU the rounds are timed twice, by the wall clock (the figures reported) and by the process's CPU
time (``cpu_time_ratio``, which leaves out waiting for a core on a shared machine). The load average at
the end of each thread count is recorded.

Also recorded: the sampling-grid cost (``affine_grid`` against the broadcast grid the module builds), and
how far the batched resize is from torchvision's antialiased one given the same crops (mean absolute
difference in uint8 levels, split into downscaled and not downscaled crops), on these random images and
on photo-like ones.

    python bench/bench_input.py [--threads 1 2] [--batches 20] [--rounds 5] [--device cpu]
                                [--out bench/results/input.json]

The last line printed is one JSON object holding the result of each thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from negmargin.data.augment import (
    METHODS,
    BatchAugment,
    _sampling_grid,
    affine_thetas,
    default_method,
    resized_crops,
)
from negmargin.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from negmargin.io import write_json

STORED, SIZE, BATCH = 96, 84, 64


def stored_batches(count: int, seed: int) -> list[torch.Tensor]:
    """``count`` uint8 batches [64, 3, 96, 96], each an NCHW view of NHWC memory like the loader's."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (BATCH, STORED, STORED, 3), generator=gen, dtype=torch.uint8).permute(0, 3, 1, 2)
            for _ in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(runs: dict[str, callable], rounds: int, device: torch.device,
                clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per round of each run; the runs alternate within a round."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            sync(device)
            start = clock()
            run()
            sync(device)
            seconds[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def measure_speed(threads: int, batches: list[torch.Tensor], rounds: int, device: torch.device) -> dict:
    torch.set_num_threads(threads)
    transform = build_transform("imagenet84", train=True, image_size=SIZE, stored_size=STORED)
    augments = {method: BatchAugment(SIZE, IMAGENET_MEAN, IMAGENET_STD, method=method) for method in METHODS}
    on_device = [batch.to(device) for batch in batches]

    def per_image() -> None:
        torch.manual_seed(0)
        for batch in batches:
            torch.stack([transform(image) for image in batch])

    def batched(method: str):
        def run() -> None:
            generator = torch.Generator().manual_seed(0)
            for batch in on_device:
                augments[method](batch, generator)
        return run

    runs = {"per_image": per_image, **{method: batched(method) for method in METHODS}}
    seconds = time_rounds(runs, rounds, device)
    # CPU seconds of this process as a second view: on a shared machine they leave out the time spent
    # waiting for a core (but still count spinning threads and contended caches)
    cpu_seconds = time_rounds(runs, rounds, device, clock=time.process_time) if device.type == "cpu" else None
    images = BATCH * len(batches)
    per_image_rate = images / seconds["per_image"]
    by_method = {}
    for method in METHODS:
        by_method[method] = {"img_s": round(images / seconds[method], 1),
                             "ratio": round(seconds["per_image"] / seconds[method], 2)}
        if cpu_seconds is not None:
            by_method[method]["cpu_time_ratio"] = round(cpu_seconds["per_image"] / cpu_seconds[method], 2)
    default = default_method(device)
    return {"device": str(device), "threads": threads, "per_image_img_s": round(per_image_rate, 1),
            "batched_img_s": by_method[default]["img_s"], "ratio": by_method[default]["ratio"],
            "method": default, "by_method": by_method, "load_average": round(os.getloadavg()[0], 2)}


def measure_grids(batches: list[torch.Tensor], rounds: int) -> dict:
    """ms per batch to build the sampling grid: ``affine_grid`` against the broadcast grid (1 thread)."""
    torch.set_num_threads(1)
    params = [BatchAugment(SIZE, IMAGENET_MEAN, IMAGENET_STD).draw(BATCH, STORED, STORED,
                                                                   torch.Generator().manual_seed(i))
              for i in range(len(batches))]
    thetas = [affine_thetas(p.boxes, p.flips, STORED, STORED) for p in params]
    boxes = [p.boxes.float() for p in params]
    runs = {
        "affine_grid": lambda: [F.affine_grid(t, [BATCH, 3, SIZE, SIZE], align_corners=False) for t in thetas],
        "broadcast_grid": lambda: [_sampling_grid(b, p.flips, STORED, STORED, SIZE) for b, p in zip(boxes, params, strict=True)],
    }
    seconds = time_rounds(runs, rounds, torch.device("cpu"))
    return {name: round(value / len(batches) * 1e3, 3) for name, value in seconds.items()}


def photo_like(count: int, seed: int) -> torch.Tensor:
    """Smooth colour fields (bicubic from 6x6) with mild noise, as in tests/test_augment.py."""
    gen = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.rand(count, 3, 6, 6, generator=gen) * 255, size=(STORED, STORED), mode="bicubic",
                          align_corners=False)
    return (field + 8 * torch.randn(count, 3, STORED, STORED, generator=gen)).clamp(0, 255).round().to(torch.uint8)


def measure_fidelity(images: torch.Tensor, seed: int) -> dict:
    """Mean |batched - torchvision| of the resized crops (uint8 levels) given torchvision's own crops."""
    torch.set_num_threads(1)
    crop = v2.RandomResizedCrop(SIZE, antialias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boxes = [crop.make_params([image]) for image in images]
    reference = torch.stack([TF.resized_crop(image, **box, size=[SIZE, SIZE], antialias=True)
                             for image, box in zip(images, boxes, strict=True)]).float()
    box_tensor = torch.tensor([[b["top"], b["left"], b["height"], b["width"]] for b in boxes])
    downscaled = (box_tensor[:, 2:] > SIZE).any(dim=1)
    result = {"downscaled_fraction": round(float(downscaled.float().mean()), 3)}
    for method in METHODS:
        gap = (resized_crops(images, box_tensor, torch.zeros(len(images), dtype=torch.bool), SIZE, method)
               - reference).abs()
        result[method] = {"mae_downscaled": round(float(gap[downscaled].mean()), 3),
                          "mae_not_downscaled": round(float(gap[~downscaled].mean()), 3),
                          "max": int(gap.max())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/results/input.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    batches = stored_batches(args.batches, seed=0)
    grids = measure_grids(batches, args.rounds)
    print(f"sampling grid, ms per batch of {BATCH}: {grids}", flush=True)
    fidelity = {"random_uint8": measure_fidelity(torch.cat(batches[:4]).contiguous(), seed=1),
                "photo_like": measure_fidelity(photo_like(256, seed=2), seed=1)}
    print(f"resize against torchvision's antialiased resize: {fidelity}", flush=True)
    results = []
    for threads in args.threads:
        result = measure_speed(threads, batches, args.rounds, device)
        print(json.dumps(result), flush=True)
        results.append(result)

    record = {
        "device": str(device), "threads": args.threads, "batch": BATCH, "stored": STORED, "output": SIZE,
        "images_per_round": BATCH * args.batches, "rounds": args.rounds, "results": results,
        "grid_ms_per_batch": grids, "resize_fidelity": fidelity,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print(json.dumps({"device": str(device), "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()

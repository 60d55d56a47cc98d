"""Base training: margin head on the base classes, SGD with linear warm-up and a step schedule.

* Learning rate (mmcv semantics, spec 1.1): the regular rate is ``lr · gamma^(number of lr_steps <= epoch)``
  (epochs counted from 0); during the first ``warmup_iters`` iterations it is scaled by
  ``1 - (1 - iteration / warmup_iters) · (1 - warmup_ratio)``, so iteration 0 runs at ``warmup_ratio · lr``.
* Checkpoints: ``last.pt`` after every epoch (always), ``best_<k>shot.pt`` when the mean validation accuracy
  on k-shot episodes is strictly better than before, ``best.pt`` for the first validation shot; optionally
  ``epoch_NNNN.pt`` every ``checkpoint_every`` epochs. All are written atomically and load with
  ``torch.load(weights_only=True)``.
* Validation: every ``val_every`` epochs and after the last one, on fixed episodes of the ``val`` split
  (``val_seed``), with the meta-test protocol.
* Resume: running the same command again continues from ``last.pt``. Batch order and augmentation are
  functions of (seed, epoch, batch), so the result equals an uninterrupted run (bitwise on CPU).
* Input: :class:`negmargin.data.loader.TrainBatches` delivers each batch on the training device, augmented
  there (``augment: batched``) or image by image in the loader (``per-image``, the reference);
  ``train.json`` records which (``config.augment``; null for a pipeline without random augmentation).
* Speed on a GPU: the loop reads nothing back from the device except on the iterations that print
  progress, so the host can queue the next batches while the GPU computes; the loss and accuracy of the
  epoch are summed on the device (in float64, in the same order as before, so the logged losses are the
  same numbers).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from negmargin import __version__
from negmargin.data.loader import TrainBatches
from negmargin.data.store import load_split
from negmargin.data.transforms import is_random
from negmargin.errors import UserError
from negmargin.features import extract_features
from negmargin.io import torch_save, write_json, write_text
from negmargin.metatest import run_metatest
from negmargin.models import CHECKPOINT_FORMAT, Classifier, ModelSpec, read_checkpoint
from negmargin.options import RESUMABLE_CHANGES, TrainConfig
from negmargin.runtime import EpochProgress, resolve_device


def learning_rate(config: TrainConfig, epoch: int, iteration: int) -> float:
    """The rate used at global ``iteration`` (0-based) inside ``epoch`` (0-based)."""
    regular = config.lr * config.lr_gamma ** sum(epoch >= step for step in config.lr_steps)
    if iteration < config.warmup_iters:
        return regular * (1.0 - (1.0 - iteration / config.warmup_iters) * (1.0 - config.warmup_ratio))
    return regular


@dataclass
class _State:
    epoch: int = 0  # epochs completed
    iteration: int = 0
    best: dict[str, dict[str, Any]] = field(default_factory=dict)  # shot -> {accuracy, ci95, epoch}
    history: list[dict[str, Any]] = field(default_factory=list)


def _progress_shown(iteration: int, total: int, every: int) -> bool:
    """Iterations whose loss EpochProgress prints (every ``every``-th and the last; and the first, for a
    terminal's bar, which shows the loss of the latest of them): the loss is read back from the device
    only there."""
    return iteration == 1 or iteration % every == 0 or iteration == total


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    if "augment" not in saved and current.get("augment") is not None:
        saved = {**saved, "augment": "per-image"}  # runs from before the batched path had only this one
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES:
            continue
        if saved.get(key) != current.get(key):
            raise UserError(
                f"{path} was written by a run with {key}={saved.get(key)!r}, but this run has "
                f"{key}={current.get(key)!r}; use another --out folder or delete that one"
            )


def _write_logs(out: Path, history: list[dict[str, Any]]) -> None:
    write_text(out / "log.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    columns = ["epoch", "iterations", "lr", "loss", "train_accuracy", "images_per_s", "epoch_s"]
    shots = sorted({shot for row in history for shot in row.get("val", {})}, key=int)
    columns += [f"val_{shot}shot_accuracy" for shot in shots] + [f"val_{shot}shot_ci95" for shot in shots]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        flat = {key: row.get(key) for key in columns if not key.startswith("val_")}
        for shot, result in row.get("val", {}).items():
            flat[f"val_{shot}shot_accuracy"] = result["accuracy"]
            flat[f"val_{shot}shot_ci95"] = result["ci95"]
        writer.writerow(flat)
    write_text(out / "log.csv", buffer.getvalue())


def _validate(model: Classifier, val_split, config: TrainConfig, image_size: int, device) -> dict[str, dict]:
    features = extract_features(model.backbone, val_split, image_size, device, batch_size=256,
                                channels_last=config.channels_last)
    results = {}
    for shots in config.val_shots:
        record = run_metatest(features, val_split.labels, config.val_ways, shots, config.val_queries,
                              config.val_episodes, config.val_seed)
        results[str(shots)] = {"accuracy": round(record["accuracy_mean"], 4), "ci95": round(record["accuracy_ci95"], 4)}
    return results


def train(data_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig) -> dict[str, Any]:
    """Train (or resume, or confirm complete) the run in ``out_dir``; returns the train.json summary."""
    data_dir, out = Path(data_dir), Path(out_dir)
    base = load_split(data_dir / "base")
    val = load_split(data_dir / "val")
    image_size = config.image_size or (84 if base.pipeline == "imagenet84" else base.image_size[0])
    num_classes = config.num_classes or base.num_classes
    if num_classes < base.num_classes:
        raise UserError(f"num_classes={num_classes} is below the {base.num_classes} base classes of {data_dir}")
    device = resolve_device(config.device)
    if config.amp == "bf16" and device.type != "cuda":
        raise UserError("amp 'bf16' needs a CUDA device; use --amp none on CPU")
    spec = ModelSpec(config.arch, base.channels, image_size, num_classes, config.metric,
                     config.temperature, config.margin)
    config_record = {**config.to_dict(), "dataset": base.meta.get("dataset", data_dir.name),
                     "data": str(data_dir), "image_size": image_size, "num_classes": num_classes}
    if not is_random(base.pipeline, train=True):
        config_record["augment"] = None  # nothing random to augment: both paths give the same batches

    torch.manual_seed(config.seed)
    model = Classifier(spec)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    state = _State()
    last_path = out / "last.pt"
    if last_path.exists():
        ckpt = read_checkpoint(last_path)
        _check_resumable(ckpt["config"], config_record, last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = _State(ckpt["epoch"], ckpt["iteration"], ckpt["best"], ckpt["history"])
        print(f"resuming {out} after epoch {state.epoch}/{config.epochs}", file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # speed; GPU runs are not bitwise reproducible anyway
    step_model = torch.compile(model) if config.compile else model  # shares model's parameters

    batches = TrainBatches(base, config.batch_size, config.seed, image_size, device, augment=config.augment,
                           num_workers=config.num_workers, data_on_device=config.data_on_device)
    started = time.perf_counter()
    for epoch in range(state.epoch, config.epochs):
        model.train()
        progress = EpochProgress(len(batches), epoch + 1, config.epochs, config.log_every)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, loss_value = 0, math.nan
        epoch_started = time.perf_counter()
        for batch_index, (images, labels) in enumerate(batches.epoch(epoch)):
            lr = learning_rate(config, epoch, state.iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(memory_format=memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16"):
                logits = step_model(images, labels)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.iteration += 1
            with torch.no_grad():
                # Train accuracy without the margin: add back what the margin took from the target logit.
                scores = logits.detach().float()
                scores[torch.arange(len(labels), device=device), labels] += config.temperature * config.margin
                correct += (scores.argmax(1) == labels).sum()
                loss_sum += loss.detach().double() * len(labels)
            seen += len(labels)
            if _progress_shown(batch_index + 1, len(batches), config.log_every):
                loss_value = loss.item()  # the one read-back that waits for the device
            elapsed = time.perf_counter() - epoch_started
            progress.update(batch_index + 1, loss_value, seen / max(elapsed, 1e-9))
        progress.close()
        epoch_s = time.perf_counter() - epoch_started
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "iterations": state.iteration,
            "lr": lr,
            "loss": round(float(loss_sum) / seen, 6),
            "train_accuracy": round(100.0 * int(correct) / seen, 4),
            "images_per_s": round(seen / epoch_s, 2),
            "epoch_s": round(epoch_s, 3),
        }
        improved: list[str] = []
        if (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs:
            row["val"] = _validate(model, val, config, image_size, device)
            for shot, result in row["val"].items():
                if result["accuracy"] > state.best.get(shot, {}).get("accuracy", -math.inf):
                    state.best[shot] = {**result, "epoch": epoch + 1}
                    improved.append(shot)
        state.epoch = epoch + 1
        state.history.append(row)
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "negmargin_version": __version__,
            "model_spec": spec.to_dict(),
            "config": config_record,
            "base_class_names": list(base.class_names),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": state.epoch,
            "iteration": state.iteration,
            "best": state.best,
            "history": state.history,
        }
        # best before last: if we die in between, the resumed run repeats this epoch and rewrites both.
        for shot in improved:
            torch_save(out / f"best_{shot}shot.pt", checkpoint)
            if shot == str(config.val_shots[0]):
                torch_save(out / "best.pt", checkpoint)
        if config.checkpoint_every and state.epoch % config.checkpoint_every == 0:
            torch_save(out / f"epoch_{state.epoch:04d}.pt", checkpoint)
        torch_save(last_path, checkpoint)
        _write_logs(out, state.history)
        val_text = " ".join(f"val{shot}={r['accuracy']:.2f}" for shot, r in row.get("val", {}).items())
        print(
            f"epoch {state.epoch}/{config.epochs} loss {row['loss']:.4f} train_acc {row['train_accuracy']:.2f} "
            f"img/s {row['images_per_s']:.0f} {val_text}".rstrip(),
            file=sys.stderr,
            flush=True,
        )

    summary = {
        "config": config_record,
        "model_spec": spec.to_dict(),
        "best": {
            shot: {"epoch": b["epoch"], "val_accuracy": b["accuracy"], "val_ci95": b["ci95"],
                   "checkpoint": f"best_{shot}shot.pt"}
            for shot, b in state.best.items()
        },
        "final_epoch": state.epoch,
        "iterations": state.iteration,
        "device": str(device),
        "torch_version": torch.__version__,
        "negmargin_version": __version__,
        "elapsed_s_this_invocation": round(time.perf_counter() - started, 3),
        "history": state.history,
    }
    write_json(out / "train.json", summary)
    return summary

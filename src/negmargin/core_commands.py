"""CLI verbs of the core library: train, select, features, metatest."""

from __future__ import annotations

import argparse
from pathlib import Path

from negmargin.errors import UserError


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> None:
    from negmargin.training import config_from_args, train

    _set_threads(args.threads)
    values = vars(args).copy()
    values["channels_last"] = not args.no_channels_last
    summary = train(args.data, args.out, config_from_args(values))
    best = ", ".join(f"{shot}-shot val {b['val_accuracy']:.2f} at epoch {b['epoch']}" for shot, b in summary["best"].items())
    print(f"trained {summary['final_epoch']} epochs into {args.out}; best: {best}")


def _select(args: argparse.Namespace) -> None:
    from negmargin.io import read_json, write_json

    train_dir = Path(args.train_dir)
    summary = read_json(train_dir / "train.json")
    val_shot = "1" if args.mode == "shared" else str(args.shot)
    best = summary.get("best", {}).get(val_shot)
    if best is None:
        raise UserError(
            f"{train_dir}/train.json has no {val_shot}-shot validation; train with --val-shots including {val_shot}"
        )
    checkpoint = train_dir / best["checkpoint"]
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint}: selected checkpoint is missing")
    write_json(args.out, {
        "checkpoint": str(checkpoint),
        "shot": args.shot,
        "mode": args.mode,
        "val_shot": int(val_shot),
        "epoch": best["epoch"],
        "val_accuracy": best["val_accuracy"],
        "val_ci95": best["val_ci95"],
        "rule": "strictly best mean validation accuracy over the validation epochs",
    })
    print(f"{args.shot}-shot uses {checkpoint} (epoch {best['epoch']}, {val_shot}-shot val {best['val_accuracy']:.2f})")


def _features(args: argparse.Namespace) -> None:
    from negmargin.features import features_of_checkpoint
    from negmargin.models import resolve_checkpoint

    _set_threads(args.threads)
    info = features_of_checkpoint(resolve_checkpoint(args.checkpoint), args.split, args.out,
                                  device=args.device, batch_size=args.batch_size, arch=args.arch)
    print(f"features {tuple(info['features'])} of {args.split} -> {args.out}")


def _metatest(args: argparse.Namespace) -> None:
    from negmargin.io import load_features, sha256_file, write_json
    from negmargin.metatest import FinetuneConfig, run_metatest

    _set_threads(args.threads)
    path = Path(args.features)
    bank = load_features(path, require_class_names=False)
    features, labels = bank["features"], bank["labels"]
    for name in ("ways", "shots", "queries", "episodes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    config = FinetuneConfig.for_shots(
        args.shots, steps=args.steps, lr=args.lr, momentum=args.momentum, dampening=args.dampening,
        weight_decay=args.weight_decay, batch_size=args.finetune_batch_size, temperature=args.temperature,
    )
    record = run_metatest(features, labels, args.ways, args.shots, args.queries, args.episodes, args.seed, config)
    episode_accuracies = record.pop("episode_accuracies")
    record = {**record, "features": str(path), "features_sha256": sha256_file(path),
              "episode_accuracies": episode_accuracies}
    write_json(args.out, record)
    print(f"{args.ways}-way {args.shots}-shot, {args.episodes} episodes: "
          f"{record['accuracy_mean']:.2f} ± {record['accuracy_ci95']:.2f} -> {args.out}")


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a backbone with a margin head on the base classes",
        description="Base training (spec 1.1-1.3). Re-running the same command resumes from OUT/last.pt. "
        "Defaults are mmfewshot's (CUB/mini-ImageNet Conv4 config).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="prepared dataset folder holding base/ and val/")
    p.add_argument("--out", required=True, help="run folder for checkpoints, logs and train.json")
    p.add_argument("--arch", choices=["conv4", "resnet12"], default="conv4")
    p.add_argument("--metric", choices=["cosine", "softmax"], default="cosine", help="margin head type")
    p.add_argument("--margin", type=float, default=-0.01, help="margin m; negative, zero or positive")
    p.add_argument("--temperature", type=float, default=10.0, help="logit scale T")
    p.add_argument("--num-classes", type=int, default=None, help="head outputs (default: number of base classes)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-steps", type=int, nargs="*", default=[60, 120], help="epochs where the LR is multiplied by gamma")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--warmup-iters", type=int, default=3000, help="linear warm-up length in iterations")
    p.add_argument("--warmup-ratio", type=float, default=0.25, help="warm-up starts at this fraction of the LR")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order and augmentation seed")
    p.add_argument("--val-every", type=int, default=5, help="validate every K epochs (and after the last)")
    p.add_argument("--val-episodes", type=int, default=100)
    p.add_argument("--val-shots", type=int, nargs="+", default=[1], help="validation shots; the first drives best.pt")
    p.add_argument("--val-ways", type=int, default=5)
    p.add_argument("--val-queries", type=int, default=15)
    p.add_argument("--val-seed", type=int, default=0, help="seed of the fixed validation episodes")
    p.add_argument("--image-size", type=int, default=None, help="input side (default 84, or the stored size for Omniglot)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="bf16 autocast (CUDA only)")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also keep epoch_NNNN.pt every N epochs (0: never)")
    p.add_argument("--log-every", type=int, default=50, help="iterations between progress lines off a terminal")
    p.set_defaults(func=_train)


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_train(subparsers)

    p = subparsers.add_parser(
        "select", help="choose the checkpoint that serves a shot count",
        description="Best-checkpoint selection on validation episodes. Mode 'shared' (mmfewshot): the "
        "checkpoint chosen by 1-shot validation serves every shot; 'per-shot': k-shot uses k-shot validation.",
    )
    p.add_argument("--train-dir", required=True, help="run folder written by `negmargin train`")
    p.add_argument("--shot", type=int, required=True, help="the shot count to serve")
    p.add_argument("--mode", choices=["shared", "per-shot"], default="shared")
    p.add_argument("--out", required=True, help="selection JSON to write")
    p.set_defaults(func=_select)

    p = subparsers.add_parser(
        "features", help="extract backbone features of a split (eval mode, no grad)",
        description="Run the backbone of a checkpoint over a prepared split with the test transform and "
        "write features float32 [N, D], labels int64 [N] and class_names to an .npz.",
    )
    p.add_argument("--checkpoint", required=True, help="a .pt checkpoint or a `negmargin select` JSON")
    p.add_argument("--split", required=True, help="prepared split folder, e.g. data/omniglot/novel")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--arch", default=None, help="refuse a checkpoint of another backbone (conv4, resnet12)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_features)

    p = subparsers.add_parser(
        "metatest", help="episodic meta-test on cached features (batched)",
        description="mmfewshot's fine-tuning meta-test: per episode a new cosine head (T=5, m=0) is "
        "fine-tuned on the support set with SGD, then scores the queries. Fine-tuning options default "
        "to mmfewshot's values: 150 steps for 1-shot, 600 otherwise, lr 0.01, momentum 0.9, dampening "
        "0.9, weight decay 1e-3, batch 4, temperature 5.",
    )
    p.add_argument("--features", required=True, help=".npz with features [N, D] and labels [N]")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="episodes seed: same seed, same episodes everywhere")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 150 for 1-shot, else 600)")
    p.add_argument("--lr", type=float, default=None, help="default 0.01")
    p.add_argument("--momentum", type=float, default=None, help="default 0.9")
    p.add_argument("--dampening", type=float, default=None, help="default 0.9")
    p.add_argument("--weight-decay", type=float, default=None, help="default 1e-3")
    p.add_argument("--finetune-batch-size", type=int, default=None, help="default 4")
    p.add_argument("--temperature", type=float, default=None, help="default 5")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_metatest)

"""Stage 2, training: `negmargin train` and `negmargin select` (which checkpoint serves a shot count)."""

from __future__ import annotations

import argparse
from pathlib import Path

from negmargin import settings
from negmargin.commands import add_threads
from negmargin.errors import UserError
from negmargin.options import SelectConfig, TrainConfig
from negmargin.runtime import set_threads


def _train(args: argparse.Namespace) -> None:
    from negmargin.training import train

    set_threads(args.threads)
    summary = train(args.data, args.out, settings.from_namespace(TrainConfig, args))
    best = ", ".join(f"{shot}-shot val {b['val_accuracy']:.2f} at epoch {b['epoch']}"
                     for shot, b in summary["best"].items())
    print(f"trained {summary['final_epoch']} epochs into {args.out}; best: {best}")


def selection(train_dir: Path, shot: int, mode: str, pick: str = "best") -> dict:
    """The checkpoint that serves ``shot``-shot meta-tests. ``pick`` `final`: the last epoch's (last.pt).
    ``pick`` `best`: under ``shared`` the one chosen by the run's first validation shot (mmfewshot: 1-shot),
    under ``per-shot`` the one chosen by ``shot``-shot validation."""
    from negmargin.io import read_json

    summary = read_json(train_dir / "train.json")
    if pick == "final":
        checkpoint = train_dir / "last.pt"
        if not checkpoint.is_file():
            raise UserError(f"{checkpoint}: the last epoch's checkpoint is missing")
        last_val = next((row["val"] for row in reversed(summary.get("history") or []) if row.get("val")), {})
        first = next(iter(last_val.values()), {})
        return {"checkpoint": str(checkpoint), "shot": shot, "mode": mode, "pick": pick, "val_shot": None,
                "epoch": summary.get("final_epoch"), "val_accuracy": first.get("accuracy"),
                "val_ci95": first.get("ci95"), "rule": "the last epoch's checkpoint"}
    val_shots = (summary.get("config") or {}).get("val_shots") or [1]
    val_shot = str(val_shots[0] if mode == "shared" else shot)
    best = (summary.get("best") or {}).get(val_shot)
    if best is None:
        raise UserError(f"{train_dir}/train.json has no {val_shot}-shot validation (it validated "
                        f"{', '.join(map(str, val_shots))}-shot); train with --val-shots including {val_shot}")
    checkpoint = train_dir / best["checkpoint"]
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint}: selected checkpoint is missing")
    return {
        "checkpoint": str(checkpoint),
        "shot": shot,
        "mode": mode,
        "pick": pick,
        "val_shot": int(val_shot),
        "epoch": best["epoch"],
        "val_accuracy": best["val_accuracy"],
        "val_ci95": best["val_ci95"],
        "rule": "strictly best mean validation accuracy over the validation epochs",
    }


def _select(args: argparse.Namespace) -> None:
    from negmargin.io import write_json

    options = settings.from_namespace(SelectConfig, args)
    chosen = selection(Path(args.train_dir), args.shot, options.selection_mode, options.pick)
    write_json(args.out, chosen)
    print(f"{args.shot}-shot uses {chosen['checkpoint']} ({chosen['rule']}, epoch {chosen['epoch']})")


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train a backbone with a margin head on the base classes",
        description="Base training (spec 1.1-1.3). Re-running the same command resumes from OUT/last.pt. "
        "Defaults are mmfewshot's (CUB/mini-ImageNet Conv4 config).",
    )
    train.add_argument("--data", required=True, help="prepared dataset folder holding base/ and val/")
    train.add_argument("--out", required=True, help="run folder for checkpoints, logs and train.json")
    settings.add_arguments(train, TrainConfig)
    add_threads(train)
    train.set_defaults(func=_train)

    select = subparsers.add_parser(
        "select", help="choose the checkpoint that serves a shot count",
        description="Best-checkpoint selection on validation episodes. Mode 'shared' (mmfewshot): the "
        "checkpoint chosen by the run's first validation shot serves every shot; 'per-shot': k-shot uses "
        "k-shot validation.",
    )
    select.add_argument("--train-dir", required=True, help="run folder written by `negmargin train`")
    select.add_argument("--shot", type=int, required=True, help="the shot count to serve")
    settings.add_arguments(select, SelectConfig)
    select.add_argument("--out", required=True, help="selection JSON to write")
    select.set_defaults(func=_select)

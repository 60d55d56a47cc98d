"""``results/metrics.json``: every run folder's numbers in one machine-readable record, their aggregation over
training seeds, and each margin's paired difference to m = 0.

``collect_metrics`` reads run folders (``<results>/<dataset>/<arch>/m<margin>/s<seed>/``). A run's identity
always comes from the ``config`` of its ``train/train.json``, never from the folder name. A run has one
sub-folder per meta-tested checkpoint: ``best`` (the best on validation episodes, the paper's rule) and
``final`` (the last epoch's). Every number is keyed by the checkpoint and by the task, ``<ways>way-<shots>shot``.
See docs/analysis.md for the schema.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from negmargin.errors import UserError
from negmargin.io import read_json, write_json, write_text
from negmargin.stats import aggregate_seeds, paired_difference, seed_paired_difference

METRICS_FORMAT = "negmargin-metrics/2"
CI_NOTES = {
    "run": "accuracy_ci95 of a run: 1.96*std(ddof=0)/sqrt(episodes) over test episodes (mmfewshot's 'std'); "
    "episode_std is that std itself",
    "base": "base_accuracy_ci95: binomial normal approximation 1.96*sqrt(p(1-p)/n) over held-out base images",
    "aggregate": "ci95 of an aggregate: Student t, t_{0.975,n-1}*s/sqrt(n) over seeds (s with ddof=1); "
    "null with one seed; `values` lists the per-seed numbers",
    "paired_vs_zero": "difference to m = 0 of the same model and seed on the same test episodes (novel) or the "
    "same held-out images (base), in points: per seed the mean and a normal CI over episodes; pooled the mean of "
    "the per-seed means with a Student-t CI over them (seed and episode variance together)",
}
CHECKPOINTS = ("best", "final")
_IDENTITY = ("dataset", "arch", "margin", "seed")
_CONFIG_FIELDS = ("metric", "temperature", "image_size", "batch_size", "epochs", "num_classes")
_METATEST_KEYS = ("accuracy_mean", "accuracy_ci95", "episodes", "ways", "shots", "episode_accuracies")
_ANALYSIS_KEYS = ("base_accuracy", "base_accuracy_ci95", "base_discriminability", "novel_discriminability")
_METATEST_FILE = re.compile(r"^metatest_(\d+)way_(\d+)shot\.json$")
LOG_FIELDS = ("dataset", "arch", "margin", "seed", "epoch", "lr", "loss", "train_accuracy", "val_shot",
              "val_accuracy", "val_ci95")


def task_key(ways: int, shots: int) -> str:
    return f"{int(ways)}way-{int(shots)}shot"


def task_of(key: str) -> tuple[int, int]:
    ways, shots = re.fullmatch(r"(\d+)way-(\d+)shot", key).groups()
    return int(ways), int(shots)


def _require(mapping: Any, keys: Iterable[str], path: Path, what: str) -> None:
    if not isinstance(mapping, dict):
        raise UserError(f"{path}: expected a JSON object ({what})")
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise UserError(f"{path}: missing keys {missing} ({what})")


def _rel(path: Path, root: Path) -> str:
    """``path`` (absolute, or relative to the working directory) as a POSIX path relative to ``root``."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    return Path(os.path.relpath(absolute, root.resolve())).as_posix()


def _checkpoint_path(recorded: str, run_dir: Path) -> Path:
    """Where a checkpoint named in a selection file lies: as written (relative to the working directory),
    else relative to the run folder or its ``train/``; the first that exists, else as written."""
    path = Path(recorded)
    if path.is_absolute():
        return path
    for candidate in (path, run_dir / path, run_dir / "train" / path):
        if candidate.exists():
            return candidate
    return path if len(path.parts) > 1 else run_dir / "train" / path


# ------------------------------------------------------------------------------------------------ one run


def _read_checkpoint(folder: Path, run_dir: Path, root: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The numbers of one checkpoint folder (``best/`` or ``final/``); per-episode and per-image values go
    into ``arrays`` (for the paired statistics), not into the record."""
    tasks: dict[str, dict[str, Any]] = {}
    files = sorted((int(m.group(1)), int(m.group(2)), path) for path in folder.iterdir()
                   if (m := _METATEST_FILE.match(path.name)))
    for ways, shots, path in files:
        result = read_json(path)
        _require(result, _METATEST_KEYS, path, "meta-test result")
        if (int(result["ways"]), int(result["shots"])) != (ways, shots):
            raise UserError(f"{path}: holds a {result['ways']}-way {result['shots']}-shot result, but the file "
                            f"name says {ways}-way {shots}-shot")
        key = task_key(ways, shots)
        entry = {
            "ways": ways, "shots": shots,
            "accuracy_mean": float(result["accuracy_mean"]),
            "accuracy_ci95": float(result["accuracy_ci95"]),
            "episode_std": result.get("episode_std"),
            "episodes": int(result["episodes"]),
            "episodes_seed": result.get("seed"),
            "episodes_sha256": result.get("episodes_sha256"),
            "queries": result.get("queries"),
            "metatest": _rel(path, root),
            "checkpoint": None, "epoch": None, "selection": None,
        }
        selection_path = folder / f"selected_{shots}shot.json"
        if not selection_path.is_file():  # shared selection: the first shot's serves every shot
            selection_path = next(iter(sorted(folder.glob("selected_*shot.json"))), selection_path)
        if selection_path.is_file():
            selection = read_json(selection_path)
            _require(selection, ["checkpoint"], selection_path, "checkpoint selection")
            entry["checkpoint"] = _rel(_checkpoint_path(str(selection["checkpoint"]), run_dir), root)
            entry["epoch"] = selection.get("epoch")
            entry["selection"] = {key: selection.get(key) for key in ("mode", "pick", "val_shot", "val_accuracy")}
        arrays[key] = np.asarray(result["episode_accuracies"], dtype=np.float64)
        tasks[key] = entry
    record: dict[str, Any] = {"tasks": tasks}
    analysis_path = folder / "analysis.json"
    record["analysis"] = _rel(analysis_path, root) if analysis_path.is_file() else None
    if analysis_path.is_file():
        analysis = read_json(analysis_path)
        _require(analysis, _ANALYSIS_KEYS, analysis_path, "analysis result")
        for key in _ANALYSIS_KEYS:
            record[key] = analysis[key]
        record["n_base"] = analysis.get("n_base")
        if analysis.get("base_correct") is not None:
            arrays["base"] = 100.0 * np.asarray(analysis["base_correct"], dtype=np.float64)
    else:
        record.update({key: None for key in _ANALYSIS_KEYS}, n_base=None)
    return record


def read_run(run_dir: str | os.PathLike, root: str | os.PathLike = ".",
             arrays: dict[tuple, np.ndarray] | None = None) -> dict[str, Any]:
    """One run folder as a metrics record. ``train/train.json`` is required; the checkpoint folders are read
    where present. Per-episode accuracies and per-image base results go into ``arrays``, keyed by
    (dataset, arch, margin, seed, checkpoint, task or 'base')."""
    run_dir, root = Path(run_dir), Path(root)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    train_json = run_dir / "train" / "train.json"
    if not train_json.is_file():
        raise UserError(f"{run_dir}: no train/train.json (training has not finished, or not a run folder)")
    train = read_json(train_json)
    _require(train, ["config"], train_json, "training summary")
    config = train["config"]
    _require(config, _IDENTITY, train_json, "'config' of the training summary")
    record: dict[str, Any] = {
        "dataset": str(config["dataset"]),
        "arch": str(config.get("model") or config["arch"]),
        "backbone": str(config["arch"]),
        "margin": float(config["margin"]),
        "seed": int(config["seed"]),
    }
    for field in _CONFIG_FIELDS:
        record[field] = config.get(field)
    record["run_dir"] = _rel(run_dir, root)
    record["train_json"] = _rel(train_json, root)
    record["final_epoch"] = train.get("final_epoch")
    record["best_val"] = {
        str(shot): {key: best.get(key) for key in ("epoch", "val_accuracy", "val_ci95")}
        for shot, best in sorted((train.get("best") or {}).items(), key=lambda item: int(item[0]))
        if isinstance(best, dict)
    }
    record["history"] = train.get("history") or []
    record["checkpoints"] = {}
    for pick in CHECKPOINTS:
        folder = run_dir / pick
        if folder.is_dir():
            found: dict[str, np.ndarray] = {}
            record["checkpoints"][pick] = _read_checkpoint(folder, run_dir, root, found)
            if arrays is not None:
                for key, values in found.items():
                    arrays[(*(record[k] for k in ("dataset", "arch", "margin", "seed")), pick, key)] = values
    return record


# ------------------------------------------------------------------------------------------ all runs


def read_runs(run_dirs: Sequence[str | os.PathLike], root: str | os.PathLike = "."
              ) -> tuple[list[dict[str, Any]], dict[tuple, np.ndarray]]:
    """Every run folder's record (sorted by identity, each identity once) and the per-episode arrays."""
    if not run_dirs:
        raise UserError("no run folders given")
    arrays: dict[tuple, np.ndarray] = {}
    runs = [read_run(run_dir, root, arrays) for run_dir in run_dirs]
    seen: dict[tuple, str] = {}
    for run in runs:
        identity = tuple(run[key] for key in _IDENTITY)
        if identity in seen:
            raise UserError(f"{run['run_dir']} and {seen[identity]} are the same run {identity} "
                            "(dataset, arch, margin, seed)")
        seen[identity] = run["run_dir"]
    runs.sort(key=lambda run: tuple(run[key] for key in _IDENTITY))
    return runs, arrays


def assemble(runs: list[dict[str, Any]], arrays: dict[tuple, np.ndarray]) -> dict[str, Any]:
    """The metrics record: every run (without its training history), the aggregate, the overview."""
    aggregate = aggregate_runs(runs, arrays)
    return {
        "format": METRICS_FORMAT,
        "paths": "relative to the repository root",
        "ci95": CI_NOTES,
        "environment": environment(),
        "accuracy": accuracy_overview(aggregate),
        "runs": [{key: value for key, value in run.items() if key != "history"} for run in runs],
        "aggregate": aggregate,
    }


def environment() -> dict[str, str]:
    """What the numbers are bit-exact for: training on the CPU gives other rounding, and then other weights and
    accuracies, under another torch or another CPU instruction set (measured: AVX2 against AVX-512 changes every
    weight after one epoch), so CI compares numbers bit for bit only within one environment
    (negmargin.reporting.compare). Recorded by the machine that assembles the metrics; the CPU runs of this
    project run every job on one machine."""
    import platform

    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


def collect_metrics(run_dirs: Sequence[str | os.PathLike], root: str | os.PathLike = ".") -> dict[str, Any]:
    """Every run's numbers, their aggregate over seeds per (dataset, arch, margin), and the paired
    differences to m = 0."""
    return assemble(*read_runs(run_dirs, root))


def accuracy_overview(aggregate: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean accuracies (%) over seeds as nested mappings, dataset -> arch -> m<margin> -> value: the numbers
    `dvc metrics show` prints (it skips lists) and `dvc metrics diff` compares across experiments."""
    out: dict[str, Any] = {}
    for entry in aggregate:
        values = {}
        for pick, numbers in entry["checkpoints"].items():
            values.update({f"{pick}_{task}": stat["mean"] for task, stat in numbers["tasks"].items()})
            if (numbers.get("base_accuracy") or {}).get("mean") is not None:
                values[f"{pick}_base"] = numbers["base_accuracy"]["mean"]
        out.setdefault(entry["dataset"], {}).setdefault(entry["arch"], {})[f"m{entry['margin']}"] = values
    return out


def train_log_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every epoch of every run (the history in train.json), one row per epoch and validation shot."""
    rows = []
    for run in runs:
        for epoch in run["history"]:
            base = {key: run[key] for key in ("dataset", "arch", "margin", "seed")}
            base.update({key: epoch.get(key) for key in ("epoch", "lr", "loss", "train_accuracy")})
            validations = epoch.get("val") or {}
            if not validations:
                rows.append(base)
            for shot, result in sorted(validations.items(), key=lambda item: int(item[0])):
                rows.append({**base, "val_shot": int(shot), "val_accuracy": result["accuracy"],
                             "val_ci95": result["ci95"]})
    return rows


def write_metrics(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, root: str | os.PathLike = ".",
                  train_logs: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write metrics.json and, with ``train_logs``, one CSV of every run's training log (committed with the
    results, so that a reader without the DVC-cached run folders still sees every learning curve)."""
    runs, arrays = read_runs(run_dirs, root)
    if train_logs is not None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(LOG_FIELDS), lineterminator="\n")
        writer.writeheader()
        for row in train_log_rows(runs):
            writer.writerow({field: "" if row.get(field) is None else row[field] for field in LOG_FIELDS})
        write_text(train_logs, buffer.getvalue())
    metrics = assemble(runs, arrays)
    write_json(out, metrics)
    return metrics


def load_metrics(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    metrics = read_json(path)
    _require(metrics, ["runs", "aggregate"], path, "metrics file written by `negmargin metrics`")
    if metrics.get("format") != METRICS_FORMAT:
        raise UserError(f"{path}: format {metrics.get('format')!r}, expected {METRICS_FORMAT!r}; "
                        "rerun `negmargin metrics`")
    if not metrics["runs"]:
        raise UserError(f"{path}: holds no runs")
    return metrics


def dataset_runs(metrics: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    runs = [run for run in metrics["runs"] if run["dataset"] == dataset]
    if not runs:
        known = sorted({run["dataset"] for run in metrics["runs"]})
        raise UserError(f"dataset {dataset!r} is not in the metrics (it holds: {', '.join(known)})")
    return runs


# ----------------------------------------------------------------------------------------- aggregation


def _dig(mapping: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _paired(zero_runs: dict[int, dict[str, Any]], members: list[dict[str, Any]], pick: str, task: str,
            arrays: dict[tuple, np.ndarray]) -> dict[str, Any] | None:
    """Paired difference of ``members`` (one margin) to the m = 0 runs of the same seeds, on ``task`` (or
    'base'); None where no seed has both."""
    per_seed = []
    for run in members:
        zero = zero_runs.get(run["seed"])
        if zero is None:
            continue
        mine = arrays.get((run["dataset"], run["arch"], run["margin"], run["seed"], pick, task))
        theirs = arrays.get((zero["dataset"], zero["arch"], zero["margin"], zero["seed"], pick, task))
        if mine is None or theirs is None:
            continue
        if task != "base":
            ours, other = _dig(run, "checkpoints", pick, "tasks", task), _dig(zero, "checkpoints", pick, "tasks", task)
            if ours["episodes_sha256"] != other["episodes_sha256"]:
                raise UserError(f"{run['run_dir']} and {zero['run_dir']}: {task} ran on different episodes; "
                                "paired differences need the same episodes_seed and split")
        if mine.shape != theirs.shape:
            raise UserError(f"{run['run_dir']} and {zero['run_dir']}: {task} has {len(mine)} and {len(theirs)} "
                            "values; they cannot be paired")
        per_seed.append((run["seed"], mine - theirs))
    return paired_difference(per_seed) if per_seed else None


def aggregate_runs(runs: Sequence[dict[str, Any]], arrays: dict[tuple, np.ndarray] | None = None
                   ) -> list[dict[str, Any]]:
    """One entry per (dataset, arch, margin): each number's mean and Student-t CI over seeds, per checkpoint,
    and its paired difference to m = 0 of the same (dataset, arch).

    Runs of one group must share their configuration apart from the seed, so that the CI measures seed
    variance and nothing else.
    """
    arrays = arrays or {}
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["arch"], float(run["margin"])), []).append(run)
    aggregate = []
    for (dataset, arch, margin), members in sorted(groups.items()):
        members = sorted(members, key=lambda r: r["seed"])
        for field in ("metric", "temperature", "image_size", "batch_size", "epochs"):
            values = {repr(r.get(field)) for r in members}
            if len(values) > 1:
                raise UserError(
                    f"runs of {dataset}/{arch}/m{margin:g} differ in {field} ({', '.join(sorted(values))}); "
                    "put runs of different configurations into different metrics files"
                )
        zero_runs = {r["seed"]: r for r in groups.get((dataset, arch, 0.0), [])}
        val_shots = sorted({int(s) for r in members for s in (r.get("best_val") or {})})
        checkpoints = {}
        for pick in CHECKPOINTS:
            present = [r for r in members if pick in r["checkpoints"]]
            if not present:
                continue
            tasks = sorted({t for r in present for t in r["checkpoints"][pick]["tasks"]}, key=task_of)
            numbers: dict[str, Any] = {
                "tasks": {t: aggregate_seeds(_dig(r, "checkpoints", pick, "tasks", t, "accuracy_mean")
                                             for r in present) for t in tasks},
                "epoch": aggregate_seeds(_dig(r, "checkpoints", pick, "tasks", tasks[0], "epoch")
                                         for r in present) if tasks else None,
                "base_accuracy": aggregate_seeds(_dig(r, "checkpoints", pick, "base_accuracy") for r in present),
                "base_discriminability": aggregate_seeds(
                    _dig(r, "checkpoints", pick, "base_discriminability", "ratio") for r in present),
                "novel_discriminability": aggregate_seeds(
                    _dig(r, "checkpoints", pick, "novel_discriminability", "ratio") for r in present),
            }
            if margin != 0.0 and zero_runs:
                paired = {t: _paired(zero_runs, present, pick, t, arrays) for t in [*tasks, "base"]}
                for name in ("base_discriminability", "novel_discriminability"):
                    pairs = [(_dig(r, "checkpoints", pick, name, "ratio"),
                              _dig(zero_runs[r["seed"]], "checkpoints", pick, name, "ratio"))
                             for r in present if r["seed"] in zero_runs]
                    pairs = [pair for pair in pairs if None not in pair]
                    paired[name] = seed_paired_difference(pairs) if pairs else None
                numbers["paired_vs_zero"] = {key: value for key, value in paired.items() if value is not None}
            checkpoints[pick] = numbers
        aggregate.append({
            "dataset": dataset,
            "arch": arch,
            "backbone": members[0].get("backbone"),
            "margin": margin,
            "metric": members[0].get("metric"),
            "temperature": members[0].get("temperature"),
            "n_seeds": len(members),
            "seeds": [r["seed"] for r in members],
            "checkpoints": checkpoints,
            "val_accuracy": {str(s): aggregate_seeds(_dig(r, "best_val", str(s), "val_accuracy") for r in members)
                             for s in val_shots},
        })
    return aggregate

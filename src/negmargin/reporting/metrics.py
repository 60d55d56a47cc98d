"""``results/metrics.json``: every run folder's numbers in one machine-readable record, and their aggregation
over training seeds.

``collect_metrics`` reads run folders (``results/<dataset>/<arch>/m<margin>/s<seed>/``). A run's identity always
comes from the ``config`` of its ``train/train.json``, never from the folder name. See docs/analysis.md for the
schema.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from negmargin.errors import UserError
from negmargin.io import read_json, write_json
from negmargin.stats import aggregate_seeds

METRICS_FORMAT = "negmargin-metrics/1"
CI_NOTES = {
    "run": "accuracy_ci95 of a run: 1.96*std(ddof=0)/sqrt(episodes) over test episodes (mmfewshot's 'std')",
    "base": "base_accuracy_ci95: binomial normal approximation 1.96*sqrt(p(1-p)/n) over held-out base images",
    "aggregate": "ci95 of an aggregate: Student t, t_{0.975,n-1}*s/sqrt(n) over seeds (s with ddof=1); "
    "null with one seed",
}
_IDENTITY = ("dataset", "arch", "margin", "seed")
_CONFIG_FIELDS = ("metric", "temperature", "image_size", "batch_size", "epochs", "num_classes")
_METATEST_KEYS = ("accuracy_mean", "accuracy_ci95", "episodes", "ways", "shots")
_ANALYSIS_KEYS = ("base_accuracy", "base_accuracy_ci95", "base_discriminability", "novel_discriminability")
_SHOT_FILE = re.compile(r"^metatest_(\d+)shot\.json$")




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
    candidates = [path, run_dir / path, run_dir / "train" / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return path if len(path.parts) > 1 else run_dir / "train" / path


def read_run(run_dir: str | os.PathLike, root: str | os.PathLike = ".") -> dict[str, Any]:
    """One run folder as a metrics record. ``train/train.json`` is required; meta-test, selection and
    analysis files are read where present."""
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
        "arch": str(config["arch"]),
        "margin": float(config["margin"]),
        "seed": int(config["seed"]),
    }
    for field in _CONFIG_FIELDS:
        record[field] = config.get(field)
    record["run_dir"] = _rel(run_dir, root)
    record["train_json"] = _rel(train_json, root)
    log = run_dir / "train" / "log.csv"
    record["train_log"] = _rel(log, root) if log.is_file() else None
    record["best_val"] = {
        str(shot): {key: best.get(key) for key in ("epoch", "val_accuracy", "val_ci95")}
        for shot, best in sorted((train.get("best") or {}).items(), key=lambda item: int(item[0]))
        if isinstance(best, dict)
    }

    shots: dict[str, dict[str, Any]] = {}
    metatest_files = sorted(
        (int(match.group(1)), path) for path in run_dir.iterdir() if (match := _SHOT_FILE.match(path.name))
    )
    for shot, path in metatest_files:
        result = read_json(path)
        _require(result, _METATEST_KEYS, path, "meta-test result")
        if int(result["shots"]) != shot:
            raise UserError(f"{path}: holds a {result['shots']}-shot result, but the file name says {shot}-shot")
        entry = {
            "accuracy_mean": float(result["accuracy_mean"]),
            "accuracy_ci95": float(result["accuracy_ci95"]),
            "episodes": int(result["episodes"]),
            "episodes_seed": result.get("seed"),
            "ways": int(result["ways"]),
            "queries": result.get("queries"),
            "metatest": _rel(path, root),
            "checkpoint": None,
            "selection": None,
        }
        selection_path = run_dir / f"selected_{shot}shot.json"
        if selection_path.is_file():
            selection = read_json(selection_path)
            _require(selection, ["checkpoint"], selection_path, "checkpoint selection")
            entry["checkpoint"] = _rel(_checkpoint_path(str(selection["checkpoint"]), run_dir), root)
            entry["selection"] = {key: selection.get(key) for key in ("mode", "val_shot", "epoch", "val_accuracy")}
        shots[str(shot)] = entry
    record["shots"] = shots
    ways = {entry["ways"] for entry in shots.values()}
    record["ways"] = ways.pop() if len(ways) == 1 else None

    analysis_path = run_dir / "analysis.json"
    record["analysis"] = _rel(analysis_path, root) if analysis_path.is_file() else None
    if analysis_path.is_file():
        analysis = read_json(analysis_path)
        _require(analysis, _ANALYSIS_KEYS, analysis_path, "analysis result")
        for key in _ANALYSIS_KEYS:
            record[key] = analysis[key]
        record["n_base"] = analysis.get("n_base")
    else:
        for key in _ANALYSIS_KEYS:
            record[key] = None
        record["n_base"] = None
    return record


def collect_metrics(run_dirs: Sequence[str | os.PathLike], root: str | os.PathLike = ".") -> dict[str, Any]:
    """Every run's numbers plus their aggregate over seeds per (dataset, arch, margin)."""
    if not run_dirs:
        raise UserError("no run folders given")
    runs = [read_run(run_dir, root) for run_dir in run_dirs]
    seen: dict[tuple, str] = {}
    for run in runs:
        identity = tuple(run[key] for key in _IDENTITY)
        if identity in seen:
            raise UserError(f"{run['run_dir']} and {seen[identity]} are the same run {identity} (dataset, arch, margin, seed)")
        seen[identity] = run["run_dir"]
    runs.sort(key=lambda run: tuple(run[key] for key in _IDENTITY))
    aggregate = aggregate_runs(runs)
    return {
        "format": METRICS_FORMAT,
        "paths": "relative to the repository root",
        "ci95": CI_NOTES,
        "accuracy": accuracy_overview(aggregate),
        "runs": runs,
        "aggregate": aggregate,
    }


def accuracy_overview(aggregate: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean accuracies (%) over seeds as nested mappings, dataset -> arch -> m<margin> -> value: the numbers
    `dvc metrics show` prints (it skips lists) and `dvc metrics diff` compares across experiments."""
    out: dict[str, Any] = {}
    for entry in aggregate:
        values = {f"novel_{shot}shot": stat["mean"] for shot, stat in entry["novel"].items()}
        if (entry.get("base_accuracy") or {}).get("mean") is not None:
            values["base"] = entry["base_accuracy"]["mean"]
        out.setdefault(entry["dataset"], {}).setdefault(entry["arch"], {})[f"m{entry['margin']}"] = values
    return out


def write_metrics(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                  root: str | os.PathLike = ".") -> dict[str, Any]:
    metrics = collect_metrics(run_dirs, root)
    write_json(out, metrics)
    return metrics


def load_metrics(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    metrics = read_json(path)
    _require(metrics, ["runs", "aggregate"], path, "metrics file written by `negmargin metrics`")
    if not metrics["runs"]:
        raise UserError(f"{path}: holds no runs")
    return metrics


def dataset_runs(metrics: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    runs = [run for run in metrics["runs"] if run["dataset"] == dataset]
    if not runs:
        known = sorted({run["dataset"] for run in metrics["runs"]})
        raise UserError(f"dataset {dataset!r} is not in the metrics (it holds: {', '.join(known)})")
    return runs


def _dig(mapping: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def aggregate_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (dataset, arch, margin): each run number's mean and Student-t CI over seeds.

    ``runs`` are the run records of ``results/metrics.json``. Runs of one group must share their
    configuration apart from the seed, so that the CI measures seed variance and nothing else.
    """
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
        shots = sorted({int(s) for r in members for s in r["shots"]})
        val_shots = sorted({int(s) for r in members for s in (r.get("best_val") or {})})
        aggregate.append({
            "dataset": dataset,
            "arch": arch,
            "margin": margin,
            "metric": members[0].get("metric"),
            "temperature": members[0].get("temperature"),
            "n_seeds": len(members),
            "seeds": [r["seed"] for r in members],
            "novel": {str(s): aggregate_seeds(_dig(r, "shots", str(s), "accuracy_mean") for r in members)
                      for s in shots},
            "base_accuracy": aggregate_seeds(r.get("base_accuracy") for r in members),
            "base_discriminability": aggregate_seeds(_dig(r, "base_discriminability", "ratio") for r in members),
            "novel_discriminability": aggregate_seeds(_dig(r, "novel_discriminability", "ratio") for r in members),
            "val_accuracy": {str(s): aggregate_seeds(_dig(r, "best_val", str(s), "val_accuracy") for r in members)
                             for s in val_shots},
        })
    return aggregate

"""Run metrics, results tables and the margin-sweep summary.

``collect_metrics`` reads run folders (``results/<dataset>/<arch>/m<margin>/s<seed>/``) into one
machine-readable record (``results/metrics.json``). A run's identity always comes from the ``config`` of
its ``train/train.json``, never from the folder name. ``render_table`` and ``render_summary`` turn that
record into markdown. See docs/analysis.md for the schema.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from negmargin.analysis import aggregate_runs
from negmargin.errors import UserError
from negmargin.io import read_json, write_json, write_text

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


# ------------------------------------------------------------------------------------------------- metrics


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


# ------------------------------------------------------------------------------------------------ formatting


def format_margin(margin: float) -> str:
    return f"{margin:g}"


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pm(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± ci95 (n)`` of an aggregate; ``mean (n=1)`` where no CI exists."""
    if not stat or stat.get("mean") is None:
        return "–"
    if stat.get("ci95") is None:
        return f"{stat['mean']:.{digits}f} (n={stat['n']})"
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f} (n={stat['n']})"


def _link(label: str, target: str | None, table_dir: Path, root: Path) -> str:
    if target is None:
        return "–"
    relative = os.path.relpath((root / target).resolve(), table_dir.resolve())
    return f"[{label}]({Path(relative).as_posix()})"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _describe(values: Iterable[Any]) -> str:
    distinct = sorted({value for value in values if value is not None}, key=str)
    return ", ".join(str(value) for value in distinct) if distinct else "unknown"


# ---------------------------------------------------------------------------------------------------- table


def parse_reference(text: str) -> tuple[tuple[str, int], float]:
    """``ARCH:SHOT=ACC`` (e.g. ``conv4:1=64.08``) -> ((arch, shot), accuracy in %)."""
    key, sep, value = text.rpartition("=")
    arch, colon, shot = key.partition(":")
    try:
        if not sep or not colon or not arch:
            raise ValueError
        return (arch, int(shot)), float(value)
    except ValueError:
        raise UserError(f"bad reference {text!r}: expected ARCH:SHOT=ACC, e.g. conv4:1=64.08") from None


def _table_margin(runs: list[dict[str, Any]], dataset: str, margin: float | None) -> float:
    margins = sorted({run["margin"] for run in runs})
    if margin is None:
        if len(margins) > 1:
            raise UserError(
                f"{dataset} has runs at several margins ({', '.join(map(format_margin, margins))}); "
                "choose the table's margin with --margin"
            )
        return margins[0]
    for candidate in margins:
        if math.isclose(candidate, margin, rel_tol=0.0, abs_tol=1e-12):
            return candidate
    raise UserError(f"{dataset} has no runs at margin {format_margin(margin)} "
                    f"(it has {', '.join(map(format_margin, margins))})")


def render_table(metrics: dict[str, Any], dataset: str, references: dict[tuple[str, int], float] | None,
                 out_path: str | os.PathLike, margin: float | dict[str, float] | None = None, reference_source: str | None = None,
                 metrics_name: str = "results/metrics.json", root: str | os.PathLike = ".") -> str:
    """Markdown results table of one dataset, in mmfewshot's columns; written atomically to ``out_path``.

    Section 1: every (arch, shot, seed) run at the table margin, with reference and Δ (ours − reference)
    columns where references are given; the mean over seeds where there are several. Section 2: every
    (margin, seed, shot) run of the sweep. ``ckpt``/``log`` links are relative to the table file.
    """
    references = dict(references or {})
    root, out_path = Path(root), Path(out_path)
    table_dir = out_path.parent
    runs = dataset_runs(metrics, dataset)
    arch_names = sorted({run["arch"] for run in runs})
    if isinstance(margin, dict):
        unknown = sorted(set(margin) - set(arch_names))
        if unknown:
            raise UserError(f"--margin names arch {unknown[0]!r}, but {dataset} has runs for {', '.join(arch_names)}")
    margins_by_arch = {
        arch: _table_margin([run for run in runs if run["arch"] == arch], f"{dataset}/{arch}",
                            margin.get(arch) if isinstance(margin, dict) else margin)
        for arch in arch_names
    }
    chosen = [run for run in runs if run["margin"] == margins_by_arch[run["arch"]]]
    distinct_margins = sorted(set(margins_by_arch.values()))
    table_margin = distinct_margins[0] if len(distinct_margins) == 1 else None
    margin_text = (format_margin(table_margin) if table_margin is not None
                   else ", ".join(f"{arch} {format_margin(m)}" for arch, m in margins_by_arch.items()))

    rows_at_margin = [(run, int(shot), result) for run in chosen for shot, result in run["shots"].items()]
    rows_at_margin.sort(key=lambda item: (item[0]["arch"], item[1], item[0]["seed"]))
    unused = [key for key in references if not any((r["arch"], s) == key for r, s, _ in rows_at_margin)]
    if unused:
        names = ", ".join(f"{arch}:{shot}" for arch, shot in unused)
        raise UserError(f"reference {names} matches no {dataset} result at margin {margin_text}")

    header = ["Arch", "Input Size", "Batch Size", "way", "shot", "mean Acc", "std", "ckpt", "log", "seed"]
    if references:
        header += ["reference", "Δ"]
    rows = []
    for run, shot, result in rows_at_margin:
        size = run.get("image_size")
        row = [
            run["arch"], f"{size}x{size}" if size else "–", str(run.get("batch_size") or "–"), str(result["ways"]),
            str(shot), _num(result["accuracy_mean"]), _num(result["accuracy_ci95"]),
            _link("ckpt", result.get("checkpoint"), table_dir, root),
            _link("log", run.get("train_log"), table_dir, root), str(run["seed"]),
        ]
        if references:
            reference = references.get((run["arch"], shot))
            row += [_num(reference), _num(None if reference is None else result["accuracy_mean"] - reference,
                                          signed=True)]
        rows.append(row)

    metric = _describe(run.get("metric") for run in chosen)
    temperature = _describe(run.get("temperature") for run in chosen)
    lines = [
        f"# {dataset}: negative-margin results",
        "",
        f"## Margin m = {margin_text} ({metric} head, temperature {temperature})",
        "",
        *_markdown_table(header, rows),
        "",
    ]

    seed_groups = [entry for entry in metrics["aggregate"]
                   if entry["dataset"] == dataset and entry["arch"] in margins_by_arch
                   and entry["margin"] == margins_by_arch[entry["arch"]] and entry["n_seeds"] > 1]
    if seed_groups:
        mean_header = ["Arch", "shot", "seeds", "mean Acc", "95% CI (seeds)"] + (["reference", "Δ"] if references else [])
        mean_rows = []
        for entry in seed_groups:
            for shot, stat in sorted(entry["novel"].items(), key=lambda item: int(item[0])):
                row = [entry["arch"], shot, str(stat["n"]), _num(stat["mean"]), _num(stat["ci95"])]
                if references:
                    reference = references.get((entry["arch"], int(shot)))
                    delta = None if reference is None or stat["mean"] is None else stat["mean"] - reference
                    row += [_num(reference), _num(delta, signed=True)]
                mean_rows.append(row)
        lines += ["Mean over seeds:", "", *_markdown_table(mean_header, mean_rows), ""]

    episodes = _describe(result["episodes"] for _, _, result in rows_at_margin)
    episode_seeds = _describe(result.get("episodes_seed") for _, _, result in rows_at_margin)
    queries = _describe(result.get("queries") for _, _, result in rows_at_margin)
    notes = [
        "- `std` is the half-width of the 95% confidence interval of the mean accuracy over test episodes, "
        "1.96·std/√episodes with the population std (ddof=0), as in mmfewshot's tables; it is not the "
        "standard deviation.",
        f"- Test episodes: {episodes} per row, episode seed {episode_seeds}, {queries} queries per class; "
        "`seed` is the training seed.",
        f"- Numbers come from `{metrics_name}`, which collects each run's `metatest_<shot>shot.json` "
        "(accuracy), `selected_<shot>shot.json` (checkpoint) and `train/train.json` (configuration).",
    ]
    if seed_groups:
        notes.append("- Mean over seeds: the 95% CI across training seeds is Student t, t₀.₉₇₅,ₙ₋₁·s/√n "
                     "(s with ddof=1).")
    if references:
        source = reference_source or "given on the command line (--reference)"
        notes.append(f"- `reference`: {source}. `Δ` = mean Acc − reference, in points.")
    lines += notes + [""]

    sweep_rows = []
    for run in sorted(runs, key=lambda r: (r["arch"], r["margin"], r["seed"])):
        for shot, result in sorted(run["shots"].items(), key=lambda item: int(item[0])):
            selection = result.get("selection") or {}
            sweep_rows.append([
                run["arch"], format_margin(run["margin"]), str(run["seed"]), str(result["ways"]), shot,
                _num(result["accuracy_mean"]), _num(result["accuracy_ci95"]), _num(selection.get("val_accuracy")),
                _num(run.get("base_accuracy")), _link("ckpt", result.get("checkpoint"), table_dir, root),
                _link("log", run.get("train_log"), table_dir, root),
            ])
    lines += [
        "## Margin sweep: every run",
        "",
        *_markdown_table(["Arch", "margin", "seed", "way", "shot", "mean Acc", "std", "val Acc", "base Acc",
                          "ckpt", "log"], sweep_rows),
        "",
        "- `val Acc`: validation accuracy of the selected checkpoint; `base Acc`: accuracy of the trained "
        "head on held-out images of the base classes (analysis.json). Accuracies in %.",
        "",
    ]
    text = "\n".join(lines)
    write_text(out_path, text)
    return text


# -------------------------------------------------------------------------------------------------- summary


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when either side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _series(entries: list[dict[str, Any]], pick) -> list[tuple[float, dict[str, Any]]]:
    points = [(entry["margin"], pick(entry)) for entry in entries]
    return [(margin, stat) for margin, stat in points if stat and stat.get("mean") is not None]


def peak_statement(name: str, points: list[tuple[float, dict[str, Any]]]) -> str:
    """Does the series peak at a negative margin? Answered from the means, with the gap over m = 0."""
    if len(points) < 2:
        return f"- Does {name} peak at a negative margin? Fewer than two margins: no peak can be stated."
    best_margin, best = max(points, key=lambda point: point[1]["mean"])
    where = "negative" if best_margin < 0 else ("zero" if best_margin == 0 else "positive")
    answer = "Yes" if best_margin < 0 else "No"
    text = (f"- Does {name} peak at a negative margin? **{answer}**: it peaks at m = {format_margin(best_margin)} "
            f"({where}, {best['mean']:.2f})")
    zero = next((stat for margin, stat in points if margin == 0), None)
    if zero is not None and best_margin != 0:
        gap = best["mean"] - zero["mean"]
        if best.get("ci95") is not None and zero.get("ci95") is not None:
            overlap = best["mean"] - best["ci95"] <= zero["mean"] + zero["ci95"]
            verdict = "the seed CIs overlap" if overlap else "the seed CIs do not overlap"
        else:
            verdict = "no seed CI (one seed)"
        text += f", {gap:+.2f} over m = 0; {verdict}"
    return text + "."


def trend_statement(name: str, points: list[tuple[float, dict[str, Any]]]) -> str:
    """Does the series rise with the margin? Yes at every step, mostly (Spearman ρ > 0), or no."""
    if len(points) < 2:
        return f"- Does {name} rise with the margin? Fewer than two margins: no trend can be stated."
    points = sorted(points, key=lambda point: point[0])
    means = [stat["mean"] for _, stat in points]
    rho = spearman([margin for margin, _ in points], means)
    steps = [b - a for a, b in zip(means, means[1:], strict=False)]
    if all(step > 0 for step in steps):
        verdict = "**Yes**, at every step"
    elif rho is not None and rho > 0:
        verdict = "**Mostly**: it rises overall, but not at every step"
    elif all(step < 0 for step in steps):
        verdict = "**No**: it falls at every step"
    elif rho is not None and rho < 0:
        verdict = "**No**: it falls overall"
    else:
        verdict = "**No**: no monotone trend"
    rho_text = "undefined" if rho is None else f"{rho:+.2f}"
    return (f"- Does {name} rise with the margin? {verdict} (Spearman ρ = {rho_text}; {means[0]:.2f} at "
            f"m = {format_margin(points[0][0])}, {means[-1]:.2f} at m = {format_margin(points[-1][0])}).")


def render_summary(metrics: dict[str, Any]) -> str:
    """Per dataset and arch: the margin sweep with seed CIs, and plain statements computed from it."""
    ways = _describe(run.get("ways") for run in metrics["runs"])
    lines = [
        "# Margin sweep summary",
        "",
        "Mean ± 95% CI across training seeds (Student t; n = seeds; no CI with one seed). Accuracies in %, "
        f"novel accuracy on {ways}-way test episodes, base accuracy on held-out base-class images, "
        "discriminability = inter/intra-class variance ratio of L2-normalised features.",
        "",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in metrics["aggregate"]:
        groups.setdefault((entry["dataset"], entry["arch"]), []).append(entry)
    for (dataset, arch), entries in sorted(groups.items()):
        entries = sorted(entries, key=lambda entry: entry["margin"])
        shots = sorted({int(shot) for entry in entries for shot in entry["novel"]})
        header = ["margin"] + [f"novel {shot}-shot" for shot in shots] + [
            "base acc", "base discr.", "novel discr."]
        rows = [
            [format_margin(entry["margin"])]
            + [_pm(entry["novel"].get(str(shot))) for shot in shots]
            + [_pm(entry.get("base_accuracy")), _pm(entry.get("base_discriminability"), 3),
               _pm(entry.get("novel_discriminability"), 3)]
            for entry in entries
        ]
        statements = [peak_statement(f"novel {shot}-shot accuracy", _series(entries, lambda e, s=shot: e["novel"].get(str(s))))
                      for shot in shots]
        statements.append(trend_statement("base accuracy", _series(entries, lambda e: e.get("base_accuracy"))))
        statements.append(trend_statement("base discriminability",
                                          _series(entries, lambda e: e.get("base_discriminability"))))
        statements.append(peak_statement("novel discriminability",
                                         _series(entries, lambda e: e.get("novel_discriminability"))))
        lines += [f"## {dataset} / {arch}", "", *_markdown_table(header, rows), "", *statements, ""]
    return "\n".join(lines)


def write_summary(metrics: dict[str, Any], out: str | os.PathLike) -> str:
    text = render_summary(metrics)
    write_text(out, text)
    return text

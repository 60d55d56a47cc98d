"""Results tables of one dataset in mmfewshot's columns (``results/tables/<dataset>.md``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from negmargin.errors import UserError
from negmargin.io import write_text
from negmargin.reporting.markdown import describe, format_margin, link, markdown_table, num
from negmargin.reporting.metrics import dataset_runs


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
            str(shot), num(result["accuracy_mean"]), num(result["accuracy_ci95"]),
            link("ckpt", result.get("checkpoint"), table_dir, root),
            link("log", run.get("train_log"), table_dir, root), str(run["seed"]),
        ]
        if references:
            reference = references.get((run["arch"], shot))
            row += [num(reference), num(None if reference is None else result["accuracy_mean"] - reference,
                                          signed=True)]
        rows.append(row)

    metric = describe(run.get("metric") for run in chosen)
    temperature = describe(run.get("temperature") for run in chosen)
    lines = [
        f"# {dataset}: negative-margin results",
        "",
        f"## Margin m = {margin_text} ({metric} head, temperature {temperature})",
        "",
        *markdown_table(header, rows),
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
                row = [entry["arch"], shot, str(stat["n"]), num(stat["mean"]), num(stat["ci95"])]
                if references:
                    reference = references.get((entry["arch"], int(shot)))
                    delta = None if reference is None or stat["mean"] is None else stat["mean"] - reference
                    row += [num(reference), num(delta, signed=True)]
                mean_rows.append(row)
        lines += ["Mean over seeds:", "", *markdown_table(mean_header, mean_rows), ""]

    episodes = describe(result["episodes"] for _, _, result in rows_at_margin)
    episode_seeds = describe(result.get("episodes_seed") for _, _, result in rows_at_margin)
    queries = describe(result.get("queries") for _, _, result in rows_at_margin)
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
                num(result["accuracy_mean"]), num(result["accuracy_ci95"]), num(selection.get("val_accuracy")),
                num(run.get("base_accuracy")), link("ckpt", result.get("checkpoint"), table_dir, root),
                link("log", run.get("train_log"), table_dir, root),
            ])
    lines += [
        "## Margin sweep: every run",
        "",
        *markdown_table(["Arch", "margin", "seed", "way", "shot", "mean Acc", "std", "val Acc", "base Acc",
                          "ckpt", "log"], sweep_rows),
        "",
        "- `val Acc`: validation accuracy of the selected checkpoint; `base Acc`: accuracy of the trained "
        "head on held-out images of the base classes (analysis.json). Accuracies in %.",
        "",
    ]
    text = "\n".join(lines)
    write_text(out_path, text)
    return text

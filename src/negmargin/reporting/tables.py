"""Results tables of one dataset in mmfewshot's columns (``results/tables/<dataset>.md``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from negmargin.errors import UserError
from negmargin.io import write_text
from negmargin.reporting.markdown import describe, format_margin, link, markdown_table, num
from negmargin.reporting.metrics import dataset_runs, task_of
from negmargin.reporting.summary import seed_cell


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
                 out_path: str | os.PathLike, margin: float | dict[str, float] | None = None,
                 reference_source: str | None = None, metrics_name: str = "results/metrics.json",
                 root: str | os.PathLike = ".", train_logs: str | None = None) -> str:
    """Markdown results table of one dataset, in mmfewshot's columns; written atomically to ``out_path``.

    Section 1: every (arch, task, seed) run at the table margin, best-validation checkpoint (the paper's
    rule), with the final checkpoint's accuracy beside it where it was meta-tested, and reference and Δ
    (ours − reference) columns where references are given (5-way rows); the mean over seeds where there
    are several. Section 2: every run of the sweep. Checkpoints are named, not linked: they live in DVC's
    cache (``dvc pull``) or are retrained by the workflow; ``log`` links the committed training-log CSV.
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
    log_link = link("log", train_logs, table_dir, root) if train_logs else "–"

    def best(run):
        return run["checkpoints"].get("best", {}).get("tasks", {})

    rows_at_margin = [(run, task, result) for run in chosen for task, result in best(run).items()]
    rows_at_margin.sort(key=lambda item: (item[0]["arch"], task_of(item[1]), item[0]["seed"]))
    reference_rows = {(r["arch"], res["shots"]) for r, _, res in rows_at_margin if res["ways"] == 5}
    reference_rows |= {(r["backbone"], res["shots"]) for r, _, res in rows_at_margin if res["ways"] == 5}
    unused = [key for key in references if key not in reference_rows]
    if unused:
        names = ", ".join(f"{arch}:{shot}" for arch, shot in unused)
        raise UserError(f"reference {names} matches no 5-way {dataset} result at margin {margin_text}")

    def reference_of(run, result):
        if result["ways"] != 5:
            return None
        return references.get((run["arch"], result["shots"]), references.get((run["backbone"], result["shots"])))

    has_final = any("final" in run["checkpoints"] for run in chosen)
    header = ["Arch", "Head", "Input Size", "Batch Size", "way", "shot", "mean Acc", "std", "ckpt", "log", "seed"]
    header += ["final Acc"] if has_final else []
    header += ["reference", "Δ"] if references else []
    rows = []
    for run, task, result in rows_at_margin:
        size = run.get("image_size")
        checkpoint = Path(result["checkpoint"]).name if result.get("checkpoint") else "–"
        if result.get("epoch") is not None:
            checkpoint += f" (epoch {result['epoch']})"
        row = [
            run["arch"], f"{run.get('metric')}, T={run.get('temperature'):g}", f"{size}x{size}" if size else "–",
            str(run.get("batch_size") or "–"), str(result["ways"]), str(result["shots"]),
            num(result["accuracy_mean"]), num(result["accuracy_ci95"]), checkpoint, log_link, str(run["seed"]),
        ]
        if has_final:
            final = run["checkpoints"].get("final", {}).get("tasks", {}).get(task)
            row.append(num(final["accuracy_mean"]) if final else "–")
        if references:
            reference = reference_of(run, result)
            row += [num(reference), num(None if reference is None else result["accuracy_mean"] - reference,
                                        signed=True)]
        rows.append(row)

    metric = describe(run.get("metric") for run in chosen)
    temperature = describe(run.get("temperature") for run in chosen)
    lines = [
        f"# {dataset}: negative-margin results",
        "",
        f"## Margin m = {margin_text} ({metric} head, temperature {temperature}; best-validation checkpoint)",
        "",
        *markdown_table(header, rows),
        "",
    ]

    seed_groups = [entry for entry in metrics["aggregate"]
                   if entry["dataset"] == dataset and entry["arch"] in margins_by_arch
                   and entry["margin"] == margins_by_arch[entry["arch"]] and entry["n_seeds"] > 1]
    if seed_groups:
        mean_header = ["Arch", "way", "shot", "seeds", "mean Acc (95% CI over seeds, or the seeds)"]
        mean_header += ["reference", "Δ"] if references else []
        mean_rows = []
        for entry in seed_groups:
            for task, stat in sorted(entry["checkpoints"]["best"]["tasks"].items(), key=lambda t: task_of(t[0])):
                ways, shots = task_of(task)
                row = [entry["arch"], str(ways), str(shots), str(stat["n"]), seed_cell(stat)]
                if references:
                    reference = None if ways != 5 else references.get(
                        (entry["arch"], shots), references.get((entry["backbone"], shots)))
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
        "- `ckpt`: the checkpoint that best validation accuracy picked (the paper's rule). Checkpoints are not "
        "in git: `dvc pull` fetches them from a remote, or `snakemake --cores all` retrains them. `log`: "
        "every run's training log (loss, accuracy, validation per epoch) in one committed CSV.",
        f"- Numbers come from `{metrics_name}`, which collects each run's meta-test results, checkpoint "
        "selections and `train/train.json` (configuration).",
    ]
    if has_final:
        notes.append("- `final Acc`: the same meta-test on the last epoch's checkpoint.")
    if seed_groups:
        notes.append("- Mean over seeds: from 3 seeds on, ± is the Student-t 95% CI across training seeds, "
                     "t₀.₉₇₅,ₙ₋₁·s/√n (s with ddof=1); with fewer seeds their values are listed instead.")
    if references:
        source = reference_source or "given on the command line (--reference)"
        notes.append(f"- `reference`: {source}. `Δ` = mean Acc − reference, in points (5-way rows).")
    lines += notes + [""]

    sweep_rows = []
    for run in sorted(runs, key=lambda r: (r["arch"], r["margin"], r["seed"])):
        picked = run["checkpoints"]
        for task, result in sorted(best(run).items(), key=lambda item: task_of(item[0])):
            selection = result.get("selection") or {}
            final = picked.get("final", {}).get("tasks", {}).get(task)
            row = [run["arch"], format_margin(run["margin"]), str(run["seed"]), str(result["ways"]),
                   str(result["shots"]), num(result["accuracy_mean"]), num(result["accuracy_ci95"])]
            row += [num(final["accuracy_mean"]) if final else "–"] if has_final else []
            row += [str(result.get("epoch") if result.get("epoch") is not None else "–"),
                    num(selection.get("val_accuracy")), num(picked.get("best", {}).get("base_accuracy"))]
            row += [num(picked.get("final", {}).get("base_accuracy"))] if has_final else []
            sweep_rows.append(row)
    sweep_header = ["Arch", "margin", "seed", "way", "shot", "mean Acc", "std"] + (["final Acc"] if has_final else [])
    sweep_header += ["epoch", "val Acc", "base Acc"] + (["final base Acc"] if has_final else [])
    lines += [
        "## Margin sweep: every run",
        "",
        *markdown_table(sweep_header, sweep_rows),
        "",
        "- `mean Acc`, `std`, `epoch`, `val Acc` and `base Acc` are of the best-validation checkpoint; `val Acc`: "
        "its validation accuracy; `base Acc`: accuracy of its trained head on held-out images of the base "
        "classes (analysis.json)" + ("; `final ...`: the last epoch's checkpoint" if has_final else "")
        + ". Accuracies in %.",
        "",
    ]
    text = "\n".join(lines)
    write_text(out_path, text)
    return text

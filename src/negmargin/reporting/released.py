"""mmfewshot's released models meta-tested with our code: ``results/tables/released_<dataset>.md``, and the
published training log's validation curve beside ours (``released_validation.{png,svg,csv}``).

Each released model was imported (``negmargin import-mmfewshot``), its features of the prepared novel split
extracted and meta-tested on our episodes. The table sets our number and CI beside the published number and
its ``std``, which in mmfewshot's tables is the half-width of the 95% CI of the mean over its test episodes
(1.96·std/√N, as ours). Our episodes and mmfewshot's are independent draws, so the 95% half-width of the
difference of the two means is √(ci_ours² + ci_published²); the difference "lies within the combined CIs"
when its size is at most that.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from negmargin.errors import UserError
from negmargin.io import read_json, write_text
from negmargin.reporting.markdown import markdown_table, num

PLOT_STEM = "released_validation"
CURVE_CSV_FIELDS = ("source", "epoch", "accuracy", "ci95")
# "..._1xb64_..." in a released name: 1 GPU x 64 images per GPU
BATCH_IN_NAME = re.compile(r"_(\d+)xb(\d+)_")


# ---------------------------------------------------------------------------------------------- the table


def combined_ci95(ours: float | None, published: float | None) -> float | None:
    """95% half-width of the difference of two independent means, from their 95% half-widths."""
    if ours is None or published is None:
        return None
    return math.hypot(ours, published)


def read_model(folder: str | os.PathLike, shots: Sequence[int]) -> dict[str, Any]:
    """The provenance of a released model imported into ``folder`` and its meta-test of each shot."""
    folder = Path(folder)
    provenance = read_json(folder / "checkpoint.provenance.json")
    results = {}
    for shot in shots:
        path = folder / f"metatest_{shot}shot.json"
        record = read_json(path)
        missing = [key for key in ("accuracy_mean", "accuracy_ci95", "ways", "shots", "episodes") if key not in record]
        if missing:
            raise UserError(f"{path}: not a meta-test result (missing {', '.join(missing)})")
        if int(record["shots"]) != int(shot):
            raise UserError(f"{path}: holds a {record['shots']}-shot result, expected {shot}-shot")
        results[int(shot)] = record
    return {"provenance": provenance, "results": results}


def batch_size_of(source_file: str) -> str:
    """The training batch of a released model, from mmfewshot's config name (``1xb64``: 64)."""
    found = BATCH_IN_NAME.search(source_file)
    return str(int(found.group(1)) * int(found.group(2))) if found else "–"


def _within(delta: float | None, combined: float | None) -> str:
    if delta is None or combined is None:
        return "–"
    return f"{'yes' if abs(delta) <= combined else 'no'} (±{combined:.2f})"


def _url_link(label: str, url: str | None) -> str:
    return f"[{label}]({url})" if url else "–"


def render_released_table(dataset: str, models: dict[str, dict[str, Any]],
                          references: dict[tuple[str, int], float], reference_std: dict[tuple[str, int], float],
                          out_path: str | os.PathLike, reference_source: str | None = None,
                          release_source: str | None = None, urls: dict[str, dict[str, str]] | None = None) -> str:
    """Markdown table of the released models of ``dataset`` (arch -> :func:`read_model`), written atomically.

    Rows follow mmfewshot's columns (Arch, Input Size, Batch Size, way, shot, mean Acc, std, ckpt, log), with
    ours in `mean Acc` / `std`, then the published number and std, Δ = ours − published, and whether |Δ| lies
    within the combined 95% CI."""
    urls = urls or {}
    unused = sorted(set(references) - {(arch, shot) for arch, model in models.items() for shot in model["results"]})
    if unused:
        names = ", ".join(f"{arch}:{shot}" for arch, shot in unused)
        raise UserError(f"reference {names} matches no released {dataset} model meta-tested here")
    header = ["Arch", "Input Size", "Batch Size", "way", "shot", "mean Acc", "std", "published mean Acc",
              "published std", "Δ", "within CIs", "ckpt", "log"]
    rows, notes = [], []
    for arch in sorted(models):
        provenance = models[arch]["provenance"]
        size = provenance.get("image_size")
        for shot, result in sorted(models[arch]["results"].items()):
            published = references.get((arch, shot))
            published_std = reference_std.get((arch, shot))
            delta = None if published is None else result["accuracy_mean"] - published
            rows.append([
                arch, f"{size}x{size}" if size else "–", batch_size_of(provenance.get("source_file", "")),
                str(result["ways"]), str(shot), num(result["accuracy_mean"]), num(result["accuracy_ci95"]),
                num(published), num(published_std), num(delta, signed=True),
                _within(delta, combined_ci95(result["accuracy_ci95"], published_std)),
                _url_link("ckpt", urls.get(arch, {}).get("checkpoint")), _url_link("log", urls.get(arch, {}).get("log")),
            ])
        margin = provenance.get("margin")
        margin_text = "unknown" if margin is None else f"{margin:g} ({provenance.get('margin_from')})"
        shots_text = " and ".join(f"{shot}-shot" for shot in sorted(models[arch]["results"]))
        notes.append(
            f"- {arch}: `{provenance.get('source_file')}`, sha256 `{provenance.get('source_sha256')}`"
            f"{' (prefix in its name checked)' if provenance.get('sha256_prefix_checked') else ''}; training "
            f"margin {margin_text}; head {provenance.get('head_shape')}; {shots_text} from this one checkpoint, "
            "as mmfewshot did."
        )
    results = [result for model in models.values() for result in model["results"].values()]
    episodes = ", ".join(sorted({str(r["episodes"]) for r in results}))
    seeds = ", ".join(sorted({str(r.get("seed")) for r in results}))  # the record's episode seed
    queries = ", ".join(sorted({str(r.get("queries")) for r in results}))
    lines = [
        f"# {dataset}: mmfewshot's released models, meta-tested here",
        "",
        *markdown_table(header, rows),
        "",
        f"- `mean Acc`, `std`: ours, meta-tested on {episodes} episodes (episode seed {seeds}, {queries} "
        "queries per class, mmfewshot's fine-tuning protocol) of the prepared novel split; `std` is the half-width "
        "of the 95% CI of the mean over the episodes, 1.96·std/√episodes (ddof=0), as in mmfewshot's tables.",
        f"- `published mean Acc`, `published std`: {reference_source or 'not given'}.",
        "- `Δ` = mean Acc − published mean Acc, in points. `within CIs`: |Δ| ≤ √(std² + published std²), the "
        "95% half-width of the difference of two independent means (our episodes and mmfewshot's are "
        "independent draws); the half-width is in brackets.",
        f"- `ckpt`, `log`: the released files ({release_source or 'source not given'}).",
        *notes,
        "",
    ]
    text = "\n".join(lines)
    write_text(out_path, text)
    return text


# ---------------------------------------------------------------------------------------------- the curves


def published_curve(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Validation points of an mmcv training log (JSON lines): every ``mode: val`` entry with an
    ``accuracy_mean`` (and ``accuracy_std``, mmfewshot's 95% half-width), by epoch."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: training log not found")
    points = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number} is not JSON ({exc.msg}); expected mmcv's log.json "
                            "(one JSON object per line)") from None
        if isinstance(entry, dict) and entry.get("mode") == "val" and "accuracy_mean" in entry:
            points.append({"source": "published", "epoch": int(entry["epoch"]),
                           "accuracy": float(entry["accuracy_mean"]),
                           "ci95": None if entry.get("accuracy_std") is None else float(entry["accuracy_std"])})
    if not points:
        raise UserError(f"{path}: no validation entries (mode 'val' with accuracy_mean); is it an mmcv log.json?")
    return points


def our_curve(train_summary: str | os.PathLike) -> list[dict[str, Any]]:
    """Validation points of our run's first validation shot, from its train.json history."""
    summary = read_json(train_summary)
    history = summary.get("history") if isinstance(summary, dict) else None
    if not isinstance(history, list):
        raise UserError(f"{train_summary}: not a training summary (no 'history')")
    shots = [int(s) for s in summary.get("config", {}).get("val_shots", [1])]
    shot = str(shots[0]) if shots else "1"
    return [{"source": "ours", "epoch": int(row["epoch"]), "accuracy": float(row["val"][shot]["accuracy"]),
             "ci95": float(row["val"][shot]["ci95"])}
            for row in history if shot in row.get("val", {})]


def plot_released_log(log: str | os.PathLike, out_dir: str | os.PathLike, ours: str | os.PathLike | None = None,
                      title: str = "") -> list[Path]:
    """``released_validation.{png,svg}``: validation accuracy against epoch of the released model's training
    (its log.json), and of our run where ``ours`` (its train.json) is given; every point in the CSV."""
    from negmargin.reporting.plots import _new_figure, _palette, save_figure, write_csv

    curves = [published_curve(log)] + ([our_curve(ours)] if ours is not None else [])
    figure = _new_figure(1, 6.0, 4.0)
    ax = figure.add_subplot(1, 1, 1)
    for points, label, color in zip(curves, ("mmfewshot's released run (log.json)", "our run (train.json)"),
                                    _palette(2), strict=False):
        epochs = [p["epoch"] for p in points]
        accuracy = [p["accuracy"] for p in points]
        ax.plot(epochs, accuracy, marker="o", markersize=3, color=color, label=label)
        if all(p["ci95"] is not None for p in points):
            low = [p["accuracy"] - p["ci95"] for p in points]
            high = [p["accuracy"] + p["ci95"] for p in points]
            ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or "validation during training")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    out_dir = Path(out_dir)
    paths = save_figure(figure, out_dir / PLOT_STEM)
    paths.append(write_csv(out_dir / f"{PLOT_STEM}.csv", CURVE_CSV_FIELDS, [p for points in curves for p in points]))
    return paths

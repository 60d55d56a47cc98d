"""CLI verbs for analysis and reporting: analyze, metrics, table, plot-margins, plot-tsne, summary."""

from __future__ import annotations

import argparse
import re

from negmargin.errors import UserError

_MARGIN_LABEL = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?=")


class _MarginLabelParser(argparse.ArgumentParser):
    """argparse takes ``-0.2=feat.npz`` for an unknown option; here a negative-number label before '=' is
    a value. (``_parse_optional`` returning None means "positional" in every supported Python.)"""

    def _parse_optional(self, arg_string):
        if _MARGIN_LABEL.match(arg_string):
            return None
        return super()._parse_optional(arg_string)


def _analyze(args: argparse.Namespace) -> None:
    from negmargin.analysis import analyze
    from negmargin.io import write_json

    result = analyze(args.checkpoint, args.base_features, args.novel_features, device=args.device)
    write_json(args.out, result)
    ratios = [result[key]["ratio"] for key in ("base_discriminability", "novel_discriminability")]
    base_ratio, novel_ratio = ("undefined" if ratio is None else f"{ratio:.4g}" for ratio in ratios)
    print(f"base accuracy {result['base_accuracy']:.2f} ± {result['base_accuracy_ci95']:.2f} % "
          f"({result['n_base']} images); discriminability base {base_ratio}, novel {novel_ratio} -> {args.out}")


def _metrics(args: argparse.Namespace) -> None:
    from negmargin.reporting.tables import write_metrics

    metrics = write_metrics(args.runs, args.out, root=args.root)
    print(f"{len(metrics['runs'])} runs, {len(metrics['aggregate'])} (dataset, arch, margin) groups -> {args.out}")


def _parse_margins(values: list[str] | None) -> float | dict[str, float] | None:
    """`--margin M` (every arch) or `--margin ARCH=M` (repeatable, one per arch)."""
    if not values:
        return None
    per_arch: dict[str, float] = {}
    for text in values:
        arch, _, number = text.rpartition("=") if "=" in text else ("", "", text)
        try:
            value = float(number)
        except ValueError:
            raise UserError(f"bad --margin {text!r}: expected a number or ARCH=NUMBER, e.g. conv4=-0.02") from None
        if not arch:
            if len(values) > 1:
                raise UserError("give either one --margin NUMBER or one --margin ARCH=NUMBER per arch")
            return value
        per_arch[arch] = value
    return per_arch


def _table(args: argparse.Namespace) -> None:
    from negmargin.reporting.tables import load_metrics, parse_reference, render_table

    references = dict(parse_reference(text) for text in args.reference)
    metrics = load_metrics(args.metrics)
    render_table(metrics, args.dataset, references, args.out, margin=_parse_margins(args.margin),
                 reference_source=args.reference_source, metrics_name=args.metrics, root=args.root)
    print(f"{args.dataset} table -> {args.out}")


def _plot_margins(args: argparse.Namespace) -> None:
    from negmargin.reporting.plots import plot_margins
    from negmargin.reporting.tables import load_metrics

    outputs = plot_margins(load_metrics(args.metrics), args.dataset, args.arch, args.out_dir)
    print("\n".join(str(path) for paths in outputs.values() for path in paths))


def _plot_tsne(args: argparse.Namespace) -> None:
    from negmargin.reporting.plots import parse_labelled_path, plot_tsne

    feature_files = [parse_labelled_path(text) for text in args.features]
    outputs = plot_tsne(feature_files, args.out_dir, classes=args.classes, per_class=args.per_class, seed=args.seed)
    print("\n".join(str(path) for paths in outputs.values() for path in paths))


def _summary(args: argparse.Namespace) -> None:
    from negmargin.reporting.tables import load_metrics, write_summary

    write_summary(load_metrics(args.metrics), args.out)
    print(f"summary -> {args.out}")


def register(subparsers: argparse._SubParsersAction) -> None:
    analyze = subparsers.add_parser(
        "analyze", help="base accuracy and base/novel discriminability of one trained model",
        description="Accuracy of the trained head (argmax, no margin) on held-out base images, with a binomial "
        "95%% CI, and the inter/intra-class variance ratio of L2-normalised base and novel features.",
    )
    analyze.add_argument("--checkpoint", required=True,
                         help="checkpoint .pt, or a selected_<k>shot.json naming one")
    analyze.add_argument("--base-features", required=True,
                         help="features .npz of the base_holdout split (same class order as the head)")
    analyze.add_argument("--novel-features", required=True, help="features .npz of the novel split")
    analyze.add_argument("--out", required=True, help="output JSON, e.g. RUN/analysis.json")
    analyze.add_argument("--device", default="cpu", help="torch device for the head (default cpu)")
    analyze.set_defaults(func=_analyze)

    metrics = subparsers.add_parser(
        "metrics", help="collect run folders into results/metrics.json",
        description="Read every run folder (identity from train/train.json's config), its meta-test results, "
        "checkpoint selections and analysis.json, and write one JSON with every run and the mean and "
        "Student-t 95%% CI over seeds per (dataset, arch, margin).",
    )
    metrics.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR",
                         help="run folders results/<dataset>/<arch>/m<margin>/s<seed>")
    metrics.add_argument("--out", required=True, help="output JSON, e.g. results/metrics.json")
    metrics.add_argument("--root", default=".", help="paths in the output are relative to this folder "
                         "(default: the working directory, the repository root)")
    metrics.set_defaults(func=_metrics)

    table = subparsers.add_parser(
        "table", help="markdown results table of one dataset, in mmfewshot's columns",
        description="Write results/tables/<dataset>.md: the runs at the table margin (Arch, Input Size, "
        "Batch Size, way, shot, mean Acc, std = 95%% CI half-width, ckpt, log, seed, optional reference and Δ), "
        "then every run of the margin sweep.",
    )
    table.add_argument("--metrics", required=True, help="results/metrics.json from `negmargin metrics`")
    table.add_argument("--dataset", required=True, help="dataset name as in train.json, e.g. cub")
    table.add_argument("--margin", action="append", default=None, metavar="[ARCH=]M",
                       help="margin of the main table, for every arch or per arch (ARCH=M, repeatable); "
                       "required when the dataset has runs at several margins; write --margin=-0.1")
    table.add_argument("--reference", action="append", default=[], metavar="ARCH:SHOT=ACC",
                       help="published accuracy to compare with, e.g. conv4:1=64.08 (repeatable)")
    table.add_argument("--reference-source", default=None, metavar="TEXT",
                       help="where the reference numbers come from, printed under the table")
    table.add_argument("--out", required=True, help="output markdown, e.g. results/tables/cub.md")
    table.add_argument("--root", default=".",
                       help="folder the metrics paths are relative to (default: the working directory)")
    table.set_defaults(func=_table)

    plot_margins = subparsers.add_parser(
        "plot-margins", help="accuracy and discriminability against the margin (PNG, SVG, CSV)",
        description="Write accuracy_vs_margin and discriminability_vs_margin (.png and .svg) and "
        "margin_analysis.csv (every plotted number) for one dataset and arch; bands are 95%% CIs over seeds.",
    )
    plot_margins.add_argument("--metrics", required=True, help="results/metrics.json from `negmargin metrics`")
    plot_margins.add_argument("--dataset", required=True, help="dataset name, e.g. cub")
    plot_margins.add_argument("--arch", required=True, help="backbone, e.g. conv4")
    plot_margins.add_argument("--out-dir", required=True, help="output folder, e.g. results/plots/cub/conv4")
    plot_margins.set_defaults(func=_plot_margins)

    plot_tsne = subparsers.add_parser(
        "plot-tsne", help="t-SNE of novel-class features, one panel per margin (PNG, SVG, CSV)",
        description="Write tsne_novel (.png and .svg) and tsne.csv (panel, margin, class, x, y). The same "
        "classes, drawn with --seed, appear in every panel.",
    )
    # add_parser builds a plain ArgumentParser; the subclass only changes how "-0.2=FILE" is classified.
    plot_tsne.__class__ = _MarginLabelParser
    plot_tsne.add_argument("--features", required=True, nargs="+", action="extend", metavar="MARGIN=FILE.npz",
                           help="novel features per margin, e.g. --features -0.2=a.npz 0=b.npz 0.2=c.npz "
                           "(or --features=-0.2=a.npz; repeatable)")
    plot_tsne.add_argument("--classes", type=int, default=5, help="number of novel classes shown (default 5)")
    plot_tsne.add_argument("--per-class", type=int, default=20, help="samples per class (default 20)")
    plot_tsne.add_argument("--seed", type=int, default=0, help="seed of the class and sample choice and t-SNE")
    plot_tsne.add_argument("--out-dir", required=True, help="output folder, e.g. results/plots/cub/conv4")
    plot_tsne.set_defaults(func=_plot_tsne)

    summary = subparsers.add_parser(
        "summary", help="markdown summary of the margin sweep with computed statements",
        description="Per dataset and arch: novel accuracy, base accuracy and discriminability per margin "
        "(mean ± Student-t 95%% CI over seeds), and whether novel accuracy peaks at a negative margin and "
        "base accuracy rises with the margin, computed from the numbers.",
    )
    summary.add_argument("--metrics", required=True, help="results/metrics.json from `negmargin metrics`")
    summary.add_argument("--out", required=True, help="output markdown, e.g. results/summary.md")
    summary.set_defaults(func=_summary)

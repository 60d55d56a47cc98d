"""Stage 4, reporting: `negmargin metrics`, `table`, `plot-margins`, `plot-tsne`, `summary`, and for mmfewshot's
released models `released-table` and `plot-released-log`."""

from __future__ import annotations

import argparse

from negmargin import settings
from negmargin.errors import UserError
from negmargin.options import TsneConfig


def _metrics(args: argparse.Namespace) -> None:
    from negmargin.reporting.metrics import write_metrics

    metrics = write_metrics(args.runs, args.out, root=args.root, train_logs=args.train_logs)
    print(f"{len(metrics['runs'])} runs, {len(metrics['aggregate'])} (dataset, arch, margin) groups -> {args.out}")


def parse_margins(values: list[str] | None) -> float | dict[str, float] | None:
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
    from negmargin.reporting.metrics import load_metrics
    from negmargin.reporting.tables import parse_reference, render_table

    references = dict(parse_reference(text) for text in args.reference)
    render_table(load_metrics(args.metrics), args.dataset, references, args.out, margin=parse_margins(args.margin),
                 reference_source=args.reference_source, metrics_name=args.metrics, root=args.root,
                 train_logs=args.train_logs)
    print(f"{args.dataset} table -> {args.out}")


def _plot_margins(args: argparse.Namespace) -> None:
    from negmargin.reporting.metrics import load_metrics
    from negmargin.reporting.plots import plot_margins

    outputs = plot_margins(load_metrics(args.metrics), args.dataset, args.arch, args.out_dir)
    print("\n".join(str(path) for paths in outputs.values() for path in paths))


def _plot_tsne(args: argparse.Namespace) -> None:
    from negmargin.reporting.plots import parse_labelled_path, plot_tsne

    options = settings.from_namespace(TsneConfig, args)
    feature_files = [parse_labelled_path(text) for text in args.features]
    outputs = plot_tsne(feature_files, args.out_dir, classes=options.classes, per_class=options.per_class,
                        seed=options.seed)
    print("\n".join(str(path) for paths in outputs.values() for path in paths))


def _summary(args: argparse.Namespace) -> None:
    from negmargin.reporting.metrics import load_metrics
    from negmargin.reporting.summary import write_summary

    write_summary(load_metrics(args.metrics), args.out)
    print(f"summary -> {args.out}")


def parse_labelled(values: list[str], flag: str) -> dict[str, str]:
    """``ARCH=VALUE`` words (repeatable flag) -> {arch: value}."""
    pairs = {}
    for text in values:
        arch, sep, value = text.partition("=")
        if not sep or not arch or not value:
            raise UserError(f"bad {flag} {text!r}: expected ARCH=VALUE, e.g. conv4=results/released/cub/conv4")
        pairs[arch] = value
    return pairs


def _released_table(args: argparse.Namespace) -> None:
    from negmargin.reporting.released import read_model, render_released_table
    from negmargin.reporting.tables import parse_reference

    folders = parse_labelled(args.model, "--model")
    references = dict(parse_reference(text) for text in args.reference)
    reference_std = dict(parse_reference(text) for text in args.reference_std)
    urls: dict[str, dict[str, str]] = {}
    for flag, kind in (("ckpt_url", "checkpoint"), ("log_url", "log")):
        for arch, url in parse_labelled(getattr(args, flag), f"--{flag.replace('_', '-')}").items():
            urls.setdefault(arch, {})[kind] = url
    models = {arch: read_model(folder, args.shots) for arch, folder in folders.items()}
    render_released_table(args.dataset, models, references, reference_std, args.out,
                          reference_source=args.reference_source, release_source=args.release_source, urls=urls)
    print(f"{args.dataset}: {len(models)} released model(s) -> {args.out}")


def _plot_released_log(args: argparse.Namespace) -> None:
    from negmargin.reporting.released import plot_released_log

    paths = plot_released_log(args.log, args.out_dir, ours=args.ours, title=args.title)
    print("\n".join(str(path) for path in paths))


def _add_metrics_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", required=True, help="results/metrics.json from `negmargin metrics`")


def register(subparsers: argparse._SubParsersAction) -> None:
    metrics = subparsers.add_parser(
        "metrics", help="collect run folders into results/metrics.json",
        description="Read every run folder (identity from train/train.json's config), its meta-test results, "
        "checkpoint selections and analysis.json, and write one JSON with every run and the mean and "
        "Student-t 95% CI over seeds per (dataset, arch, margin).",
    )
    metrics.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR",
                         help="run folders results/<dataset>/<arch>/m<margin>/s<seed>")
    metrics.add_argument("--out", required=True, help="output JSON, e.g. results/metrics.json")
    metrics.add_argument("--train-logs", default=None, metavar="CSV",
                         help="also write every run's training log (epoch, lr, loss, validation) into one CSV")
    metrics.add_argument("--root", default=".", help="paths in the output are relative to this folder "
                         "(default: the working directory, the repository root)")
    metrics.set_defaults(func=_metrics)

    table = subparsers.add_parser(
        "table", help="markdown results table of one dataset, in mmfewshot's columns",
        description="Write results/tables/<dataset>.md: the runs at the table margin (Arch, Input Size, "
        "Batch Size, way, shot, mean Acc, std = 95% CI half-width, ckpt, log, seed, optional reference and Δ), "
        "then every run of the margin sweep.",
    )
    _add_metrics_input(table)
    table.add_argument("--dataset", required=True, help="dataset name as in train.json, e.g. cub")
    table.add_argument("--margin", action="append", default=None, metavar="[ARCH=]M",
                       help="margin of the main table, for every arch or per arch (ARCH=M, repeatable); "
                       "required when the dataset has runs at several margins")
    table.add_argument("--reference", action="append", default=[], metavar="ARCH:SHOT=ACC",
                       help="published accuracy to compare with, e.g. conv4:1=64.08 (repeatable)")
    table.add_argument("--reference-source", default=None, metavar="TEXT",
                       help="where the reference numbers come from, printed under the table")
    table.add_argument("--train-logs", default=None, metavar="CSV",
                       help="the training-log CSV of `negmargin metrics --train-logs`, linked from the table")
    table.add_argument("--out", required=True, help="output markdown, e.g. results/tables/cub.md")
    table.add_argument("--root", default=".",
                       help="folder the metrics paths are relative to (default: the working directory)")
    table.set_defaults(func=_table)

    plot_margins = subparsers.add_parser(
        "plot-margins", help="accuracy and discriminability against the margin (PNG, SVG, CSV)",
        description="Write accuracy_vs_margin and discriminability_vs_margin (.png and .svg) and "
        "margin_analysis.csv (every plotted number) for one dataset and arch; bands are 95% CIs over seeds.",
    )
    _add_metrics_input(plot_margins)
    plot_margins.add_argument("--dataset", required=True, help="dataset name, e.g. cub")
    plot_margins.add_argument("--arch", required=True, help="backbone, e.g. conv4")
    plot_margins.add_argument("--out-dir", required=True, help="output folder, e.g. results/plots/cub/conv4")
    plot_margins.set_defaults(func=_plot_margins)

    plot_tsne = subparsers.add_parser(
        "plot-tsne", help="t-SNE of novel-class features, one panel per margin (PNG, SVG, CSV)",
        description="Write tsne_novel (.png and .svg) and tsne.csv (panel, margin, class, x, y). The same "
        "classes, drawn with --seed, appear in every panel.",
    )
    plot_tsne.add_argument("--features", required=True, nargs="+", action="extend", metavar="MARGIN=FILE.npz",
                           help="novel features per margin, e.g. --features -0.2=a.npz 0=b.npz 0.2=c.npz "
                           "(repeatable)")
    settings.add_arguments(plot_tsne, TsneConfig)
    plot_tsne.add_argument("--out-dir", required=True, help="output folder, e.g. results/plots/cub/conv4")
    plot_tsne.set_defaults(func=_plot_tsne)

    summary = subparsers.add_parser(
        "summary", help="markdown summary of the margin sweep with computed statements",
        description="Per dataset and arch: novel accuracy, base accuracy and discriminability per margin "
        "(mean ± Student-t 95% CI over seeds), and whether novel accuracy peaks at a negative margin and "
        "base accuracy rises with the margin, computed from the numbers.",
    )
    _add_metrics_input(summary)
    summary.add_argument("--out", required=True, help="output markdown, e.g. results/summary.md")
    summary.set_defaults(func=_summary)

    released = subparsers.add_parser(
        "released-table", help="mmfewshot's released models meta-tested here, beside the published numbers",
        description="Write results/tables/released_<dataset>.md: per released model and shot, our mean "
        "accuracy and 95% CI (from its imported folder: checkpoint.provenance.json, metatest_<shot>shot.json), "
        "the published number and std (mmfewshot's 95% CI half-width), the difference, and whether it lies "
        "within the combined CI, sqrt(ours^2 + published^2).",
    )
    released.add_argument("--dataset", required=True, help="dataset name, e.g. cub")
    released.add_argument("--model", action="append", required=True, metavar="ARCH=DIR",
                          help="folder of an imported released model, e.g. conv4=results/released/cub/conv4 "
                          "(repeatable)")
    released.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="meta-test shots to read")
    released.add_argument("--reference", action="append", default=[], metavar="ARCH:SHOT=ACC",
                          help="published accuracy, e.g. conv4:1=64.08 (repeatable)")
    released.add_argument("--reference-std", action="append", default=[], metavar="ARCH:SHOT=STD",
                          help="published std column (95%% CI half-width), e.g. conv4:1=0.48 (repeatable)")
    released.add_argument("--reference-source", default=None, metavar="TEXT",
                          help="where the published numbers come from")
    released.add_argument("--ckpt-url", action="append", default=[], metavar="ARCH=URL",
                          help="the released checkpoint's URL, linked in the table")
    released.add_argument("--log-url", action="append", default=[], metavar="ARCH=URL",
                          help="the released training log's URL, linked in the table")
    released.add_argument("--release-source", default=None, metavar="TEXT", help="where the URLs come from")
    released.add_argument("--out", required=True, help="output markdown, e.g. results/tables/released_cub.md")
    released.set_defaults(func=_released_table)

    curve = subparsers.add_parser(
        "plot-released-log", help="validation accuracy against epoch: the released model's log and our run",
        description="Write released_validation.{png,svg,csv} in --out-dir: the validation accuracy (and its "
        "95% CI) per epoch from mmfewshot's training log (mmcv log.json, mode 'val' entries), and from our "
        "run's train.json where --ours is given.",
    )
    curve.add_argument("--log", required=True, help="the released model's training log (log.json)")
    curve.add_argument("--ours", default=None, help="train.json of our run of the same dataset and arch")
    curve.add_argument("--title", default="", help="figure title")
    curve.add_argument("--out-dir", required=True, help="output folder, e.g. results/plots/cub/conv4")
    curve.set_defaults(func=_plot_released_log)

"""Stage 3, evaluation: `negmargin features`, `negmargin metatest` and `negmargin analyze`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from negmargin import settings
from negmargin.commands import add_threads
from negmargin.options import ARCHS, EpisodeConfig, FeatureConfig, FinetuneConfig, TrainConfig
from negmargin.runtime import set_threads


def _features(args: argparse.Namespace) -> None:
    from negmargin.features import features_of_checkpoint
    from negmargin.models import resolve_checkpoint

    set_threads(args.threads)
    options = settings.from_namespace(FeatureConfig, args)
    info = features_of_checkpoint(resolve_checkpoint(args.checkpoint), args.split, args.out,
                                  device=args.device, batch_size=options.batch_size, arch=args.arch)
    print(f"features {tuple(info['features'])} of {args.split} -> {args.out}")


def _metatest(args: argparse.Namespace) -> None:
    from negmargin.io import load_features, sha256_file, write_json
    from negmargin.metatest import run_metatest

    set_threads(args.threads)
    episodes = settings.from_namespace(EpisodeConfig, args)
    finetune = settings.from_namespace(FinetuneConfig, args)
    path = Path(args.features)
    bank = load_features(path, require_class_names=False)
    record = run_metatest(bank["features"], bank["labels"], episodes.ways, episodes.shots, episodes.queries,
                          episodes.episodes, episodes.episodes_seed, finetune, bank.get("class_names"))
    if record["excluded_classes"]:
        print(f"negmargin metatest: warning: {exclusion_note(record)}", file=sys.stderr, flush=True)
    episode_accuracies = record.pop("episode_accuracies")
    record = {**record, "features": str(path), "features_sha256": sha256_file(path),
              "episode_accuracies": episode_accuracies}
    write_json(args.out, record)
    print(f"{episodes.ways}-way {episodes.shots}-shot, {episodes.episodes} episodes: "
          f"{record['accuracy_mean']:.2f} ± {record['accuracy_ci95']:.2f} -> {args.out}")


def exclusion_note(record: dict) -> str:
    """One line: which classes the episodes could not draw, and why."""
    excluded = record["excluded_classes"]
    shown = ", ".join(f"{item['name'] if item['name'] is not None else item['label']} ({item['images']})"
                      for item in excluded[:10])
    more = f" and {len(excluded) - 10} more" if len(excluded) > 10 else ""
    return (f"{len(excluded)} of {record['classes_total']} classes have fewer than {record['shots']} shots + "
            f"{record['queries']} queries = {record['shots'] + record['queries']} images and are left out of every "
            f"episode (images in brackets): {shown}{more}; the result JSON lists them under excluded_classes")


def _analyze(args: argparse.Namespace) -> None:
    from negmargin.analysis import analyze
    from negmargin.io import write_json

    result = analyze(args.checkpoint, args.base_features, args.novel_features, device=args.device)
    write_json(args.out, result)
    ratios = [result[key]["ratio"] for key in ("base_discriminability", "novel_discriminability")]
    base_ratio, novel_ratio = ("undefined" if ratio is None else f"{ratio:.4g}" for ratio in ratios)
    print(f"base accuracy {result['base_accuracy']:.2f} ± {result['base_accuracy_ci95']:.2f} % "
          f"({result['n_base']} images); discriminability base {base_ratio}, novel {novel_ratio} -> {args.out}")


def register(subparsers: argparse._SubParsersAction) -> None:
    features = subparsers.add_parser(
        "features", help="extract backbone features of a split (eval mode, no grad)",
        description="Run the backbone of a checkpoint over a prepared split with the test transform and "
        "write features float32 [N, D], labels int64 [N] and class_names to an .npz.",
    )
    features.add_argument("--checkpoint", required=True, help="a .pt checkpoint or a `negmargin select` JSON")
    features.add_argument("--split", required=True, help="prepared split folder, e.g. data/omniglot/novel")
    features.add_argument("--out", required=True, help="output .npz")
    settings.add_arguments(features, FeatureConfig)
    settings.add_arguments(features, TrainConfig, names=["device"])
    features.add_argument("--arch", choices=tuple(ARCHS), default=None,
                          help="refuse a checkpoint of another backbone")
    add_threads(features)
    features.set_defaults(func=_features)

    metatest = subparsers.add_parser(
        "metatest", help="episodic meta-test on cached features (batched)",
        description="mmfewshot's fine-tuning meta-test: per episode a new cosine head (m = 0) is fine-tuned "
        "on the support set with SGD, then scores the queries. The fine-tuning options default to "
        "mmfewshot's values.",
    )
    metatest.add_argument("--features", required=True, help=".npz with features [N, D] and labels [N]")
    metatest.add_argument("--out", required=True, help="result JSON")
    settings.add_arguments(metatest, EpisodeConfig)
    settings.add_arguments(metatest, FinetuneConfig)
    add_threads(metatest)
    metatest.set_defaults(func=_metatest)

    analyze = subparsers.add_parser(
        "analyze", help="base accuracy and base/novel discriminability of one trained model",
        description="Accuracy of the trained head (argmax, no margin) on held-out base images, with a binomial "
        "95% CI, and the inter/intra-class variance ratio of L2-normalised base and novel features.",
    )
    analyze.add_argument("--checkpoint", required=True, help="checkpoint .pt, or a selected_<k>shot.json naming one")
    analyze.add_argument("--base-features", required=True,
                         help="features .npz of the base_holdout split (same class order as the head)")
    analyze.add_argument("--novel-features", required=True, help="features .npz of the novel split")
    analyze.add_argument("--out", required=True, help="output JSON, e.g. RUN/analysis.json")
    analyze.add_argument("--device", default="cpu", help="torch device of the head (default: cpu)")
    analyze.set_defaults(func=_analyze)

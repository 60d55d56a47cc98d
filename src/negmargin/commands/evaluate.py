"""Stage 3, evaluation: `negmargin features`, `negmargin metatest`, `negmargin analyze`, and
`negmargin import-mmfewshot` (a released mmfewshot model as a checkpoint the others accept)."""

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
    margin = "unknown" if result["margin"] is None else f"{result['margin']:g}"
    print(f"base accuracy {result['base_accuracy']:.2f} ± {result['base_accuracy_ci95']:.2f} % "
          f"({result['n_base']} images); discriminability base {base_ratio}, novel {novel_ratio}; "
          f"training margin {margin} -> {args.out}")


def _import_mmfewshot(args: argparse.Namespace) -> None:
    from negmargin.models.mmfewshot import import_mmfewshot, provenance_path

    record = import_mmfewshot(Path(args.src), args.arch, Path(args.out), args.dataset)
    margin = "unknown" if record["margin"] is None else f"{record['margin']:g}"
    print(f"{args.src}: {record['arch']} of {record['dataset'] or 'an unknown dataset'}, head "
          f"{record['head_shape'][0]}x{record['head_shape'][1]}, margin {margin}, sha256 "
          f"{record['source_sha256'][:12]}... -> {args.out} (provenance {provenance_path(Path(args.out))})")


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

    imported = subparsers.add_parser(
        "import-mmfewshot", help="convert a released mmfewshot Neg-Margin checkpoint into a negmargin checkpoint",
        description="Read an mmcv checkpoint of mmfewshot's NegMargin model (weights_only: tensors, plain "
        "containers and numpy scalars only), map every tensor onto our backbone and head (every key used, every "
        "shape equal), check the sha256 prefix in a released file name, and write DST.pt (for `negmargin "
        "features` and `analyze`) and DST.provenance.json. Bad input: one line, exit 2, nothing written.",
    )
    imported.add_argument("src", metavar="SRC.pth", help="the mmfewshot checkpoint, e.g. "
                          "neg-margin_cosine_conv4_1xb64_cub_5way-1shot_20211120_100620-5415a152.pth")
    # Values are checked by the importer, so a wrong one gets the verb's one-line error.
    imported.add_argument("--arch", required=True, metavar="{conv4,resnet12}", help="the backbone the file holds")
    imported.add_argument("--dataset", default=None, metavar="{cub,mini-imagenet,tiered-imagenet}",
                          help="the training dataset (default: what the file's meta config or released name "
                          "says); fixes the order of the head rows, needed by `analyze`")
    imported.add_argument("--out", required=True, metavar="DST.pt", help="the negmargin checkpoint to write")
    imported.set_defaults(func=_import_mmfewshot)

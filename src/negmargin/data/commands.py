"""CLI verbs for data: `negmargin prepare <dataset>` and `negmargin download`."""

from __future__ import annotations

import argparse
import functools

PAPER_DATASETS = ("cub", "mini-imagenet", "tiered-imagenet")


def _prepare_omniglot(args: argparse.Namespace) -> None:
    from negmargin.data.omniglot import prepare_omniglot

    summary = prepare_omniglot(
        args.source,
        args.out,
        image_size=args.image_size,
        base_holdout=args.base_holdout,
        rotations=tuple(args.rotations),
        seed=args.seed,
        max_classes=args.max_classes,
    )
    for split, counts in summary["splits"].items():
        print(f"{split}: {counts['classes']} classes, {counts['images']} images")


def _prepare_benchmark(dataset: str, args: argparse.Namespace) -> None:
    if dataset == "cub":
        from negmargin.data.cub import prepare_cub as prepare
    elif dataset == "mini-imagenet":
        from negmargin.data.mini_imagenet import prepare_mini_imagenet as prepare
    else:
        from negmargin.data.tiered_imagenet import prepare_tiered_imagenet as prepare
    summary = prepare(
        args.source,
        args.out,
        raw_dir=args.raw_dir,
        md5=args.md5,
        sha256=args.sha256,
        size=args.size,
        mirrors=tuple(args.mirror),
        image_size=args.image_size,
        base_holdout=args.base_holdout,
        seed=args.seed,
        expect_full=not args.fixture,
        workers=args.workers,
        skip_bad_images=args.skip_bad_images,
    )
    for split, counts in summary["splits"].items():
        print(f"{split}: {counts['classes']} classes, {counts['images']} images")
    if args.skip_bad_images:
        skipped = sum(len(items) for items in summary["skipped_images"].values())
        print(f"skipped {skipped} unreadable image(s)")
    print(
        f"wrote {args.out} (images {summary['image_size']}x{summary['image_size']}, "
        f"source sha256 {summary.get('source_sha256') or '-'})"
    )


def _download(args: argparse.Namespace) -> None:
    from negmargin.data.download import download

    path = download(
        args.url,
        args.out,
        md5=args.md5,
        sha256=args.sha256,
        size=args.size,
        mirrors=tuple(args.mirror),
        retries=args.retries,
        backoff=args.backoff,
        timeout=args.timeout,
    )
    print(path)


def _add_checks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--md5", metavar="HEX", help="expected md5 of the file (32 hex digits)")
    parser.add_argument("--sha256", metavar="HEX", help="expected sha256 of the file (64 hex digits)")
    parser.add_argument("--size", type=int, metavar="BYTES", help="expected size in bytes")
    parser.add_argument(
        "--mirror",
        action="extend",
        nargs="+",
        default=[],
        metavar="URL",
        help="other URLs of the same file, tried in order when the main one fails; repeatable",
    )


_BENCHMARK_HELP = {
    "cub": (
        "CUB-200-2011 (class split 100/50/50 by the sorted-index rule)",
        "CUB_200_2011.tgz: URL or path (default: the official CaltechDATA URL, with the legacy Caltech URL "
        "as mirror), or a folder holding CUB_200_2011/",
        "96",
        "5 images per base class, taken out of base",
        "Without --md5/--sha256/--size the official archive's md5 97eceeb196236b17998738112f37df78 and size "
        "1150585339 are checked.",
    ),
    "mini-imagenet": (
        "mini-ImageNet (Ravi split 64/16/20 x 600), from ILSVRC-2012 or Ravi's images.zip",
        "ILSVRC2012_img_train.tar, Ravi's images.zip, a folder in either layout, or a URL of an archive. "
        "No default: ImageNet needs an account (https://image-net.org/). Workflow config key "
        "datasets.mini_imagenet.prepare.source",
        "96 for ILSVRC, 84 for Ravi's images",
        "ILSVRC: all base-class images not in train.csv (the paper's "
        "base_val); Ravi's images: 20 per base class, taken out of base",
        "Without --md5/--sha256/--size an ILSVRC train tar must have md5 1d675b47d978889d74fa0da5fadfb00e.",
    ),
    "tiered-imagenet": (
        "tiered-ImageNet (Ren et al. split 351/97/160 classes in 20/6/8 categories)",
        "tiered-imagenet.tar (URL or path) or a folder holding {train,val,test}_{images_png,labels}.pkl",
        "84 (the images' own size)",
        "20 images per base class, taken out of base",
        "Without --md5/--sha256/--size the archive must have md5 e07e811b9f29362d159a9edd0d838c62.",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    prepare = subparsers.add_parser(
        "prepare",
        help="prepare a dataset into the store (data/<dataset>/{base,base_holdout,val,novel})",
        description="Obtain, verify and split a dataset, and write it as prepared splits.",
    )
    datasets = prepare.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    omni = datasets.add_parser("omniglot", help="the embedded Omniglot archive (Vinyals split 1028/172/423)")
    omni.add_argument("--source", required=True, help="path to omniglot_105.npz")
    omni.add_argument("--out", required=True, help="output folder, e.g. data/omniglot")
    omni.add_argument("--image-size", type=int, default=28, help="stored side length in pixels (default 28)")
    omni.add_argument(
        "--base-holdout",
        type=int,
        default=4,
        help="drawings per base class held out of training for base accuracy (default 4 of 20)",
    )
    omni.add_argument(
        "--rotations",
        type=int,
        nargs="+",
        default=[0],
        help="rotation-augmented classes, e.g. 0 90 180 270 (default 0: no augmentation)",
    )
    omni.add_argument("--seed", type=int, default=0, help="seed of the held-out drawer choice")
    omni.add_argument("--max-classes", type=int, default=None,
                      help="keep only the first N characters of each split (tiny test runs; default: all)")
    omni.set_defaults(func=_prepare_omniglot)

    for dataset in PAPER_DATASETS:
        summary, source_help, size_default, holdout_default, checks = _BENCHMARK_HELP[dataset]
        folder = dataset.replace("-", "_")
        sub = datasets.add_parser(
            dataset,
            help=summary,
            description=f"Prepare {summary} into data/{folder}/{{base,base_holdout,val,novel}} and prepared.json. "
            f"A URL source is downloaded into --raw-dir first (resumable, verified). {checks} Images are "
            "stored pre-resized (short side to --image-size, centre square), RGB uint8; see docs/datasets.md.",
        )
        sub.add_argument(
            "--source", metavar="PATH_OR_URL", default=None, help=source_help
        )
        _add_checks(sub)
        sub.add_argument(
            "--raw-dir",
            default="data/raw",
            metavar="DIR",
            help="where downloads and extracted archives go (default data/raw)",
        )
        sub.add_argument("--out", required=True, metavar="DIR", help=f"output folder, e.g. data/{folder}")
        sub.add_argument(
            "--image-size",
            type=int,
            default=None,
            metavar="PX",
            help=f"stored side length in pixels (default {size_default})",
        )
        sub.add_argument(
            "--base-holdout",
            type=int,
            default=None,
            metavar="N",
            help=f"held-out base images per class for base-class accuracy (default: {holdout_default})",
        )
        sub.add_argument("--seed", type=int, default=0, help="seed of the held-out image choice (default 0)")
        sub.add_argument(
            "--workers", type=int, default=None, metavar="N", help="decoding threads (default: min(8, CPUs))"
        )
        sub.add_argument(
            "--skip-bad-images",
            action="store_true",
            help="leave out images that cannot be decoded (corrupt or truncated files) instead of stopping "
            "at the first one; each is named in the log and counted in prepared.json",
        )
        sub.add_argument(
            "--fixture",
            action="store_true",
            help="accept a subset of the real classes and skip the full-size checks and default "
            "checksums (for tests and tiny fixture archives)",
        )
        sub.set_defaults(func=functools.partial(_prepare_benchmark, dataset))

    down = subparsers.add_parser(
        "download",
        help="download one file, resumably, and verify it",
        description="Stream URL into FILE via FILE.part: resumes with HTTP Range after a dropped connection "
        "(and across runs), retries with exponential back-off, tries --mirror URLs in order, and renames "
        "FILE.part onto FILE only when size and checksums match. A local path as --url is verified in place.",
    )
    down.add_argument("--url", required=True, help="http(s) URL (or a local path, verified in place)")
    _add_checks(down)
    down.add_argument("--out", required=True, metavar="FILE", help="where the verified file goes")
    down.add_argument(
        "--retries",
        type=int,
        default=5,
        help="further attempts per URL after a transient failure (default 5)",
    )
    down.add_argument(
        "--backoff",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="first retry delay; doubles each retry, at most 60 s (default 2)",
    )
    down.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a server silent for this long counts as a dropped connection, retried and resumed (default 60)",
    )
    down.set_defaults(func=_download)

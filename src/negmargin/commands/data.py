"""Stage 1, data: `negmargin prepare <dataset>` (one sub-command per registered dataset) and `negmargin download`."""

from __future__ import annotations

import argparse
import functools

from negmargin import settings
from negmargin.datasets import DATASETS, DatasetSpec
from negmargin.options import SourceConfig

# The download and checksum options; a dataset without `fetch` (the embedded Omniglot) takes --source only.
_FETCH = ("md5", "sha256", "size", "mirrors", "retries", "backoff", "timeout", "raw_dir")


def _prepare(spec: DatasetSpec, args: argparse.Namespace) -> None:
    source = settings.from_namespace(SourceConfig, args)
    options = settings.from_namespace(spec.options, args)
    from negmargin.data.staging import prepare_replacing

    # Into a staging folder first: a failed re-run leaves the earlier preparation as it was.
    summary = prepare_replacing(spec.load_prepare(), args.out, source, options)
    for split, counts in summary["splits"].items():
        print(f"{split}: {counts['classes']} classes, {counts['images']} images")
    if source.skip_bad_images:
        skipped = sum(len(items) for items in summary.get("skipped_images", {}).values())
        print(f"skipped {skipped} unreadable image(s)")
    sha = summary.get("source_sha256") or "-"
    print(f"wrote {args.out} (images {summary['image_size']}x{summary['image_size']}, source sha256 {sha})")


def _download(args: argparse.Namespace) -> None:
    from negmargin.data.download import download

    source = settings.from_namespace(SourceConfig, args)
    path = download(args.url, args.out, **source.checks, mirrors=source.mirrors, retries=source.retries,
                    backoff=source.backoff, timeout=source.timeout, sha256_prefix=args.sha256_prefix)
    print(path)


def register(subparsers: argparse._SubParsersAction) -> None:
    prepare = subparsers.add_parser(
        "prepare",
        help="prepare a dataset into the store (data/<dataset>/{base,base_holdout,val,novel})",
        description="Obtain, verify and split a dataset, and write it as prepared splits (docs/datasets.md).",
    )
    datasets = prepare.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for spec in DATASETS.values():
        sub = datasets.add_parser(
            spec.command, help=spec.title,
            description=f"Prepare {spec.title} into OUT/{{base,base_holdout,val,novel}} and OUT/prepared.json"
            + (". A URL source is downloaded into --raw-dir first (resumable, verified)" if spec.fetch else "")
            + ". Images are stored pre-resized in a memory-mappable array (docs/datasets.md).",
        )
        sub.add_argument("--out", required=True, metavar="DIR", help=f"output folder, e.g. data/{spec.name}")
        fetch = spec.fetch
        settings.add_arguments(sub, SourceConfig, names=None if fetch else ["source"],
                               exclude=() if fetch else _FETCH)
        settings.add_arguments(sub, spec.options)
        sub.set_defaults(func=functools.partial(_prepare, spec))

    down = subparsers.add_parser(
        "download",
        help="download one file, resumably, and verify it",
        description="Stream URL into FILE via FILE.part: resumes with HTTP Range after a dropped connection "
        "(and across runs), retries with exponential back-off, tries --mirrors in order, and renames "
        "FILE.part onto FILE only when size and checksums match. A local path as --url is verified in place.",
    )
    down.add_argument("--url", required=True, help="http(s) URL (or a local path, verified in place)")
    down.add_argument("--out", required=True, metavar="FILE", help="where the verified file goes")
    settings.add_arguments(down, SourceConfig, names=["md5", "sha256", "size", "mirrors", "retries", "backoff",
                                                      "timeout"])
    down.add_argument("--sha256-prefix", default=None, metavar="HEX",
                      help="the leading hex digits of the file's sha256, where that is all the publisher states "
                      "(OpenMMLab's 8 before .pth in a released file name)")
    down.set_defaults(func=_download)

"""CLI verbs for data: `negmargin prepare <dataset>` (and, with the paper benchmarks, `download`)."""

from __future__ import annotations

import argparse


def _prepare_omniglot(args: argparse.Namespace) -> None:
    from negmargin.data.omniglot import prepare_omniglot

    summary = prepare_omniglot(
        args.source, args.out, image_size=args.image_size, base_holdout=args.base_holdout,
        rotations=tuple(args.rotations), seed=args.seed,
    )
    for split, counts in summary["splits"].items():
        print(f"{split}: {counts['classes']} classes, {counts['images']} images")


def register(subparsers: argparse._SubParsersAction) -> None:
    prepare = subparsers.add_parser(
        "prepare", help="prepare a dataset into the store (data/<dataset>/{base,base_holdout,val,novel})",
        description="Obtain, verify and split a dataset, and write it as prepared splits.",
    )
    datasets = prepare.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    omni = datasets.add_parser("omniglot", help="the embedded Omniglot archive (Vinyals split 1028/172/423)")
    omni.add_argument("--source", required=True, help="path to omniglot_105.npz")
    omni.add_argument("--out", required=True, help="output folder, e.g. data/omniglot")
    omni.add_argument("--image-size", type=int, default=28, help="stored side length in pixels (default 28)")
    omni.add_argument("--base-holdout", type=int, default=4,
                      help="drawings per base class held out of training for base accuracy (default 4 of 20)")
    omni.add_argument("--rotations", type=int, nargs="+", default=[0],
                      help="rotation-augmented classes, e.g. 0 90 180 270 (default 0: no augmentation)")
    omni.add_argument("--seed", type=int, default=0, help="seed of the held-out drawer choice")
    omni.set_defaults(func=_prepare_omniglot)

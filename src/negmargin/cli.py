"""`negmargin <verb>`: the command line, one verb per workflow rule (negmargin.commands.<stage>).

A user error (bad path, bad argument, wrong checkpoint) is printed as one line naming the problem,
with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from negmargin import __version__
from negmargin.commands import Parser, data, evaluate, report, train
from negmargin.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="negmargin",
        description="Negative-margin few-shot classification: prepare data, train, extract features, "
        "meta-test, analyse and report.",
    )
    parser.add_argument("--version", action="version", version=f"negmargin {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="VERB", parser_class=Parser)
    for stage in (data, train, evaluate, report):
        stage.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("SLURM_JOB_ID"):
        # In a cluster job the log names the job, for `sacct -j` / `squeue -j` and the records.
        job = os.environ["SLURM_JOB_ID"]
        print(f"negmargin {args.command}: Slurm job {job}", file=sys.stderr, flush=True)
    try:
        args.func(args)
    except UserError as exc:
        print(f"negmargin {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"negmargin {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0

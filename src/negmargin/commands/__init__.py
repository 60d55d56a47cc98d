"""The verbs of `negmargin`, one module per stage of the workflow: data, train, evaluate, report.

Each module has ``register(subparsers)``; a verb parses its options (derived from the declarations in
negmargin.options and negmargin.datasets), calls one package function and prints one line of what it wrote.
"""

from __future__ import annotations

import argparse
import re

# "-0.2", "-.5", "-1e-3", "-0.2=file.npz": values (a negative margin, a labelled file), not options.
_NEGATIVE_VALUE = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(=|$)")


class Parser(argparse.ArgumentParser):
    """argparse, except that a word starting with a negative number is a value, never an option.

    Plain argparse takes ``-0.2=a.npz`` for an unknown option. Every verb's parser is of this class
    (``add_subparsers(parser_class=Parser)``), so ``--features -0.2=a.npz`` and ``--margin -0.5`` both work.
    """

    def _parse_optional(self, arg_string):
        if _NEGATIVE_VALUE.match(arg_string):
            return None  # a positional (a value) in every supported Python
        return super()._parse_optional(arg_string)


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; the workflow passes the job's share)")

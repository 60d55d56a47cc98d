"""CLI verbs for analysis and reporting (filled in by the analysis/reporting work)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    return None

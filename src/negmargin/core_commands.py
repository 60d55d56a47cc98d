"""CLI verbs of the core library: train, select, features, metatest."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    return None

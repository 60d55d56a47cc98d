"""Formatting shared by the markdown outputs (tables and summary)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def format_margin(margin: float) -> str:
    return f"{margin:g}"


def num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def pm(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± ci95 (n)`` of an aggregate; ``mean (n=1)`` where no CI exists."""
    if not stat or stat.get("mean") is None:
        return "–"
    if stat.get("ci95") is None:
        return f"{stat['mean']:.{digits}f} (n={stat['n']})"
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f} (n={stat['n']})"


def link(label: str, target: str | None, table_dir: Path, root: Path) -> str:
    if target is None:
        return "–"
    relative = os.path.relpath((root / target).resolve(), table_dir.resolve())
    return f"[{label}]({Path(relative).as_posix()})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def describe(values: Iterable[Any]) -> str:
    distinct = sorted({value for value in values if value is not None}, key=str)
    return ", ".join(str(value) for value in distinct) if distinct else "unknown"

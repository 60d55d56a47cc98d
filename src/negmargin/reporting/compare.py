"""Do regenerated results equal the committed ones? Every number of ``metrics.json``, the tables, the summary
and the plot CSVs, compared; timings excepted.

    python -m negmargin.reporting.compare COMMITTED_RESULTS REGENERATED_RESULTS [--tolerance 0]

CI (``.ci/run``) copies the committed ``results/`` aside, reruns the default workflow from the fresh clone
and runs this: the first differing number is named (file, key or line, both values) and the exit status is 1.
With ``--tolerance`` numbers may differ by that much (absolute); the default, 0, asks for bit-identical
numbers.

Bit-identical numbers hold within one environment: the same torch and the same CPU instruction set
(``metrics.json: environment``). Across instruction sets CPU training rounds differently and the runs
diverge (AVX2 against AVX-512: every weight differs after one epoch; a 3-epoch default run can then pick
another best epoch), so no small tolerance holds. When the two environments differ, the comparison says so,
checks only that the same files, keys, runs and list lengths were regenerated, and exits 0 unless
``--strict`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

# Wall-clock measurements: they differ run to run by nature.
TIMING_KEYS = frozenset({"elapsed_s", "elapsed_s_this_invocation", "epoch_s", "images_per_s"})
ENVIRONMENT_KEY = "environment"  # of metrics.json: compared first, by compare_results
COMPARED = ("metrics.json", "summary.md", "train_logs.csv", "tables/*.md", "plots/*/*/*.csv")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class Mismatch(Exception):
    """The first difference, as one line naming where it is."""


def _close(a: float, b: float, tolerance: float) -> bool:
    return a == b or (tolerance > 0 and math.isclose(a, b, rel_tol=0.0, abs_tol=tolerance))


def compare_json(committed: Any, fresh: Any, where: str, tolerance: float) -> None:
    if isinstance(committed, dict) and isinstance(fresh, dict):
        for key in committed.keys() | fresh.keys():
            if key in TIMING_KEYS or (key == ENVIRONMENT_KEY and where == "metrics.json"):
                continue
            if key not in committed or key not in fresh:
                raise Mismatch(f"{where}.{key}: present in only one of the two "
                               f"({'committed' if key in committed else 'regenerated'})")
            compare_json(committed[key], fresh[key], f"{where}.{key}", tolerance)
    elif isinstance(committed, list) and isinstance(fresh, list):
        if len(committed) != len(fresh):
            raise Mismatch(f"{where}: {len(committed)} entries committed, {len(fresh)} regenerated")
        for index, (a, b) in enumerate(zip(committed, fresh, strict=True)):
            compare_json(a, b, f"{where}[{index}]", tolerance)
    elif isinstance(committed, bool | str) or committed is None or isinstance(fresh, bool | str) or fresh is None:
        if committed != fresh:
            raise Mismatch(f"{where}: {committed!r} committed, {fresh!r} regenerated")
    elif not _close(float(committed), float(fresh), tolerance):
        raise Mismatch(f"{where}: {committed!r} committed, {fresh!r} regenerated")


def compare_text(committed: str, fresh: str, where: str, tolerance: float) -> None:
    """Line by line; the numbers of a line compared as numbers, the rest as text."""
    old, new = committed.splitlines(), fresh.splitlines()
    for number, (a, b) in enumerate(zip(old, new, strict=False), start=1):
        if a == b:
            continue
        numbers_a, numbers_b = _NUMBER.findall(a), _NUMBER.findall(b)
        if _NUMBER.sub("#", a) != _NUMBER.sub("#", b) or len(numbers_a) != len(numbers_b):
            raise Mismatch(f"{where}:{number}: the line differs\n  committed:   {a}\n  regenerated: {b}")
        for x, y in zip(numbers_a, numbers_b, strict=True):
            if not _close(float(x), float(y), tolerance):
                raise Mismatch(f"{where}:{number}: {x} committed, {y} regenerated\n  committed:   {a}\n"
                               f"  regenerated: {b}")
    if len(old) != len(new):
        raise Mismatch(f"{where}: {len(old)} lines committed, {len(new)} regenerated")


def environments(committed: Path, fresh: Path) -> tuple[Any, Any]:
    """The ``environment`` of each side's metrics.json (None where absent)."""
    def read(root: Path) -> Any:
        path = root / "metrics.json"
        return json.loads(path.read_text()).get(ENVIRONMENT_KEY) if path.is_file() else None
    return read(committed), read(fresh)


def compare_results(committed: str | Path, fresh: str | Path, tolerance: float = 0.0,
                    numbers: bool = True) -> int:
    """Compare every file of :data:`COMPARED`; returns how many files were compared; Mismatch at the first
    difference (a file present on one side only is one). With ``numbers`` False only the structure is
    compared: the same files, and in the JSON files the same keys and list lengths."""
    committed, fresh = Path(committed), Path(fresh)
    if not numbers:
        tolerance = math.inf
    names = sorted({p.relative_to(root).as_posix() for root in (committed, fresh) for pattern in COMPARED
                    for p in root.glob(pattern)})
    if not names:
        raise Mismatch(f"{committed}: none of {', '.join(COMPARED)} found")
    for name in names:
        a, b = committed / name, fresh / name
        if not a.is_file() or not b.is_file():
            raise Mismatch(f"{name}: {'not regenerated' if a.is_file() else 'not committed'}")
        if name.endswith(".json"):
            compare_json(json.loads(a.read_text()), json.loads(b.read_text()), name, tolerance)
        elif numbers:
            compare_text(a.read_text(), b.read_text(), name, tolerance)
    return len(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m negmargin.reporting.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("committed", help="the committed results folder (a copy taken before the rerun)")
    parser.add_argument("regenerated", help="the results folder the rerun wrote")
    parser.add_argument("--tolerance", type=float, default=0.0, help="absolute tolerance of a number (default 0)")
    parser.add_argument("--strict", action="store_true",
                        help="compare the numbers even when the two environments differ")
    args = parser.parse_args(argv)
    old_env, new_env = environments(Path(args.committed), Path(args.regenerated))
    numbers = args.strict or old_env == new_env
    if not numbers:
        print(f"The committed results were made in another environment ({old_env}) than this rerun ({new_env}): "
              "CPU training rounds differently there and its numbers diverge, so only the structure is compared "
              "(the same files, keys, runs and list lengths). Rerun on a machine of the committed environment to "
              "check the numbers bit for bit.", file=sys.stderr)
    try:
        count = compare_results(args.committed, args.regenerated, args.tolerance, numbers=numbers)
    except Mismatch as exc:
        print(f"results differ from the committed ones: {exc}", file=sys.stderr)
        print("If the change was meant to move numbers, rerun the workflow and commit results/ and dvc.lock "
              "(CONTRIBUTING.md).", file=sys.stderr)
        return 1
    if numbers:
        print(f"{count} result files equal the committed ones (timings excepted)")
    else:
        print(f"{count} result files regenerated with the committed structure (numbers not compared: "
              "another environment)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

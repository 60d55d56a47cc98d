"""Prepare CUB-200-2011 into the store: ``base`` 100 / ``val`` 50 / ``novel`` 50 classes, plus ``base_holdout``.

Source: ``CUB_200_2011.tgz`` (by URL, downloaded resumably and verified, or a local path) or a folder
holding ``CUB_200_2011/`` (or being it). The archive is extracted safely into ``<raw_dir>/cub/``.

Class split (CloserLookFewShot, negative-margin, mmfewshot): sort the 200 folder names of ``images/``;
with 0-based index i, ``i % 2 == 0`` -> base, ``i % 4 == 1`` -> val, ``i % 4 == 3`` -> novel. The split
so computed is checked against the committed lists ``splits/CUB/{base,val,novel}.txt``. Full images are
used (no bounding-box crop), as in mmfewshot.

``base_holdout``: CUB has no images beyond the 11,788, so the hold-out is taken from the base classes:
``base_holdout`` images per base class (default 5, about 8% of the roughly 59 per class), chosen by a
seeded permutation; they are removed from ``base``. The paper trains on all base images; 5 per class is
the smallest number that still gives a usable base-class accuracy (500 images over 100 classes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from negmargin.data.benchmark import (
    FULL_RESOLUTION_IMAGE_SIZE,
    PlannedSplit,
    holdout_positions,
    obtain,
    source_summary,
    split_file,
    write_benchmark,
)
from negmargin.data.extract import extract_once
from negmargin.datasets import BenchmarkOptions
from negmargin.errors import UserError
from negmargin.options import SourceConfig

CUB_IMAGES = 11_788
CUB_CLASSES = 200
DEFAULT_BASE_HOLDOUT = 5


def committed_classes() -> list[str]:
    """The 200 class folder names, ``001.Black_footed_Albatross`` ... ``200.Common_Yellowthroat``."""
    return [line.split()[1] for line in split_file("CUB/classes.txt").splitlines() if line.strip()]


def split_by_rule(folders: Sequence[str]) -> dict[str, list[str]]:
    """The CloserLookFewShot rule over the *sorted* folder names."""
    splits: dict[str, list[str]] = {"base": [], "val": [], "novel": []}
    for i, folder in enumerate(sorted(folders)):
        if i % 2 == 0:
            splits["base"].append(folder)
        elif i % 4 == 1:
            splits["val"].append(folder)
        else:
            splits["novel"].append(folder)
    return splits


def committed_split() -> dict[str, list[str]]:
    """The rule applied to the 200 committed names, checked against the committed split lists."""
    names = committed_classes()
    by_rule = split_by_rule(names)
    for split in ("base", "val", "novel"):
        listed = [line.strip() for line in split_file(f"CUB/{split}.txt").splitlines() if line.strip()]
        if listed != by_rule[split]:
            raise UserError(
                f"splits/CUB/{split}.txt disagrees with the sorted-index rule; the package data is damaged"
            )
    return by_rule


def find_root(path: Path) -> Path:
    """The folder holding ``images/`` (``path`` itself or ``path/CUB_200_2011``)."""
    for candidate in (path, path / "CUB_200_2011"):
        if (candidate / "images").is_dir():
            return candidate
    raise UserError(f"{path}: no CUB_200_2011/images/ folder inside; is this the CUB-200-2011 archive?")


def list_images(root: Path) -> dict[str, list[str]]:
    """Class folder -> sorted image file names; cross-checked against ``images.txt`` when present."""
    images = root / "images"
    listing = {
        folder.name: sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() == ".jpg")
        for folder in sorted(images.iterdir())
        if folder.is_dir()
    }
    index = root / "images.txt"
    if index.is_file():
        listed = {
            line.split(maxsplit=1)[1].strip() for line in index.read_text().splitlines() if line.strip()
        }
        found = {f"{folder}/{name}" for folder, names in listing.items() for name in names}
        if listed != found:
            missing, extra = sorted(listed - found), sorted(found - listed)
            detail = f"missing {missing[0]!r}" if missing else f"not in images.txt: {extra[0]!r}"
            raise UserError(
                f"{root}: images/ does not match images.txt ({len(missing)} missing, "
                f"{len(extra)} extra; {detail})"
            )
    return listing


def prepare_cub(out: str | os.PathLike, source: SourceConfig, options: BenchmarkOptions) -> dict:
    """Prepare CUB-200-2011 into ``out`` (``base``, ``base_holdout``, ``val``, ``novel``, ``prepared.json``).

    * ``source.source``: URL, ``.tgz`` path or folder; null means the official archive (the registry's).
      With no checksum or size given, an archive must be the official one (unless ``options.fixture``).
    * ``options.image_size``: stored side length (default 96); ``options.base_holdout``: images per base
      class kept out of ``base`` (default 5).
    * ``options.fixture``: accept a subset of the real classes (test fixtures); otherwise the real dataset
      (200 classes, 11,788 images) is asserted.
    """
    expect_full = not options.fixture
    image_size = FULL_RESOLUTION_IMAGE_SIZE if options.image_size is None else options.image_size
    base_holdout = DEFAULT_BASE_HOLDOUT if options.base_holdout is None else options.base_holdout
    seed = options.seed
    source_text, path, digests = obtain("cub", source, options.fixture)
    if path.is_file():
        root = find_root(extract_once(path, Path(source.raw_dir) / "cub"))
    else:
        root = find_root(path)

    listing = list_images(root)
    names = committed_classes()
    unknown = sorted(set(listing) - set(names))
    if unknown:
        raise UserError(
            f"{root}/images: unknown class folder {unknown[0]!r} (not one of the 200 CUB classes)"
        )
    total = sum(len(files) for files in listing.values())
    if expect_full:
        if len(listing) != CUB_CLASSES:
            missing = sorted(set(names) - set(listing))
            raise UserError(
                f"{root}/images: {len(listing)} class folders, expected {CUB_CLASSES} (missing {missing[0]!r})"
            )
        if total != CUB_IMAGES:
            raise UserError(f"{root}/images: {total} images, expected {CUB_IMAGES}")
    # The rule is defined on the sorted 200 names; a fixture's subset keeps each class's split.
    split_of = {folder: split for split, folders in committed_split().items() for folder in folders}
    if expect_full and split_by_rule(list(listing)) != committed_split():
        raise UserError(f"{root}/images: the class split differs from splits/CUB/*.txt")

    rng = np.random.default_rng(seed)
    plans: dict[str, PlannedSplit] = {}
    for split in ("base", "val", "novel"):
        folders = [f for f in sorted(listing) if split_of[f] == split]
        plans[split] = PlannedSplit(folders)
    plans["base_holdout"] = PlannedSplit(list(plans["base"].class_names))
    for split in ("base", "val", "novel"):
        for label, folder in enumerate(list(plans[split].class_names)):
            files = listing[folder]
            held: set[int] = set()
            if split == "base":
                if len(files) <= base_holdout:
                    raise UserError(
                        f"{root}/images/{folder}: {len(files)} images, too few to hold out {base_holdout}"
                    )
                held = set(holdout_positions(len(files), base_holdout, rng).tolist())
            for position, name in enumerate(files):
                item = (label, f"{folder}/{name}", root / "images" / folder / name)
                plans["base_holdout" if position in held else split].items.append(item)

    summary = {
        **source_summary(source_text, path, digests),
        "source_kind": "archive" if path.is_file() else "folder",
        "images_root": str(root),
        "class_split": "sorted folder index i: i%2==0 base, i%4==1 val, i%4==3 novel (checked against splits/CUB)",
        "base_holdout": base_holdout,
        "base_holdout_rule": f"{base_holdout} images per base class, seeded permutation (seed {seed}), removed from base",
        "seed": seed,
        "expect_full": expect_full,
        "total_images": total,
    }
    return write_benchmark(out, "cub", plans, Path.read_bytes, image_size, summary, options.workers,
                           source.skip_bad_images)

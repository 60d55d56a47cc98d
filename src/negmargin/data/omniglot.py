"""Prepare the embedded Omniglot archive (resources/omniglot/omniglot_105.npz) into the store.

Classes follow the Vinyals split stored in the archive: 1028 base / 172 val / 423 novel characters.
Images are rendered at ``image_size`` (default 28) as ink coverage (area averaging of the 105x105 binary
drawing, 0 = paper, 255 = ink), one channel.

Options:
* ``base_holdout``: drawings per base class kept out of training (split ``base_holdout``), for
  base-class accuracy. They are chosen per class by a seeded permutation of the 20 drawers.
* ``max_classes``: keep only the first N characters of each split (tiny runs and tests).
* ``rotations``: e.g. (0, 90, 180, 270) turns every character into 4 classes, as Vinyals et al. did;
  the default (0,) keeps the 1623 original characters. A rotated copy is a class of its own, in the same
  split as its character, so no character leaks across splits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from negmargin.data.store import SplitWriter
from negmargin.datasets import DATASETS, OMNIGLOT_DRAWERS, OmniglotOptions
from negmargin.errors import UserError
from negmargin.io import sha256_file, write_json
from negmargin.options import SourceConfig

SPLITS = {0: "base", 1: "val", 2: "novel"}
OMNIGLOT_105_SHA256 = "5e8688706581db953313960f125e1badbc0c0aac21177480a2327007f8db9771"


def _render(ink: np.ndarray, image_size: int, rotation: int) -> np.ndarray:
    """Binary 105x105 ink mask -> uint8 [image_size, image_size] ink coverage, rotated by k*90 degrees."""
    picture = Image.fromarray(ink.astype(np.uint8) * 255)
    if image_size != ink.shape[0]:
        picture = picture.resize((image_size, image_size), Image.BOX)
    return np.rot90(np.asarray(picture, dtype=np.uint8), k=rotation // 90).copy()


def prepare_omniglot(out: str | os.PathLike, source: SourceConfig, options: OmniglotOptions,
                     verify: bool = True) -> dict:
    """Prepare the embedded archive (``source.source``, null: the registry's default path) into ``out``."""
    out = Path(out)
    source = Path(source.source or DATASETS["omniglot"].default_source)
    image_size, base_holdout, seed = options.image_size, options.base_holdout, options.seed
    rotations, max_classes = tuple(options.rotations), options.max_classes
    if not source.is_file():
        raise UserError(f"{source}: Omniglot archive not found (expected resources/omniglot/omniglot_105.npz)")
    digest = sha256_file(source)
    if verify and digest != OMNIGLOT_105_SHA256:
        raise UserError(f"{source}: sha256 is {digest}, expected {OMNIGLOT_105_SHA256}")
    archive = np.load(source)
    ink = np.unpackbits(archive["ink_rows"], axis=-1, count=105).astype(bool)
    alphabet_names = archive["alphabet_names"]
    names = [
        f"{alphabet_names[a]}/character{c:02d}"
        for a, c in zip(archive["alphabet_index"], archive["character_number"], strict=True)
    ]
    class_ids = archive["class_id"]
    holdout_rng = np.random.default_rng(seed)
    summary = {"dataset": "omniglot", "source": str(source), "source_sha256": digest, "image_size": image_size,
               "base_holdout": base_holdout, "rotations": list(rotations), "seed": seed, "max_classes": max_classes,
               "splits": {}}

    # Held-out drawers per base class, fixed before any split is written.
    base_rows = np.flatnonzero(archive["vinyals_split"] == 0)
    held = {int(row): set(holdout_rng.permutation(OMNIGLOT_DRAWERS)[:base_holdout].tolist()) for row in base_rows}

    plan: dict[str, list[tuple[int, int, list[int]]]] = {"base": [], "base_holdout": [], "val": [], "novel": []}
    for code, split in SPLITS.items():
        for row in np.flatnonzero(archive["vinyals_split"] == code)[:max_classes]:
            for rotation in rotations:
                if split == "base":
                    keep = [d for d in range(OMNIGLOT_DRAWERS) if d not in held[int(row)]]
                    plan["base"].append((int(row), rotation, keep))
                    if base_holdout:
                        plan["base_holdout"].append((int(row), rotation, sorted(held[int(row)])))
                else:
                    plan[split].append((int(row), rotation, list(range(OMNIGLOT_DRAWERS))))
    if not base_holdout:
        del plan["base_holdout"]

    for split, entries in plan.items():
        class_names = [names[row] + (f"/rot{rot:03d}" if rotations != (0,) else "") for row, rot, _ in entries]
        total = sum(len(drawers) for _, _, drawers in entries)
        meta = {"dataset": "omniglot", "split": split, "pipeline": "omniglot",
                "source": str(source), "source_sha256": digest}
        with SplitWriter(out / split, total, (image_size, image_size, 1), class_names, meta) as writer:
            for label, (row, rotation, drawers) in enumerate(entries):
                for drawer in drawers:
                    image_id = f"{class_ids[row]:04d}_{drawer + 1:02d}.png" + (f"@rot{rotation:03d}" if rotations != (0,) else "")
                    writer.add(_render(ink[row, drawer], image_size, rotation)[:, :, None], label, image_id)
        summary["splits"][split] = {"classes": len(entries), "images": total}
    write_json(out / "prepared.json", summary)
    return summary

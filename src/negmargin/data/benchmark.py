"""What the paper benchmarks (CUB, mini-ImageNet, tiered-ImageNet) share when they are prepared.

* ``decode_resized``: encoded image bytes -> RGB uint8 ``[S, S, 3]``: the short side is resized to
  ``S`` and the centre square is kept (pipeline ``imagenet84``).
* ``PlannedSplit`` / ``write_benchmark``: each dataset module decides *which* images go to which split
  and class (a plan); this module decodes them in a thread pool and streams them into the store with
  ``SplitWriter``, so no split is ever held decoded in memory.
* ``split_file``: the committed split files (package data under ``negmargin/data/splits/``).

Pre-resizing, and how it differs from the paper's pipeline: mmfewshot and the original code decode the
full-resolution image every epoch and apply ``RandomResizedCrop(84)`` to the whole picture. Here the
image is decoded once, its short side resized to ``image_size`` (96 by default for full-resolution
sources) and the centre square kept; training then takes its random-resized crops from that square.
Two consequences: the strips beyond the centre square of non-square images are never seen (on CUB and
ImageNet typically 12-25% of the picture, on the long side), and crops are interpolated from a 96-pixel
picture rather than from the original, which is slightly blurrier for small crop scales. In exchange an
epoch only slices a memory map, which is what makes 200 epochs on one GPU cheap.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from negmargin.data.download import Digests, DownloadFailed, fetch_source, is_url, local_path
from negmargin.data.store import SplitWriter
from negmargin.datasets import DATASETS, SPLITS
from negmargin.errors import UserError
from negmargin.io import write_json
from negmargin.options import SourceConfig
from negmargin.runtime import Progress

PIPELINE = "imagenet84"
FULL_RESOLUTION_IMAGE_SIZE = 96
BATCH = 256


def split_file(relative: str) -> str:
    """Text of a committed split file, e.g. ``split_file("CUB/base.txt")``."""
    return (
        resources.files("negmargin.data").joinpath("splits", *relative.split("/")).read_text(encoding="utf-8")
    )


def preprocessing_note(image_size: int) -> str:
    return f"decoded once; short side resized to {image_size} px (bicubic, antialiased), centre square kept; RGB uint8"


class UndecodableImage(UserError):
    """An image file that cannot be decoded (corrupt or truncated); ``reason`` is the decoder's complaint."""

    def __init__(self, image_id: str, reason: Exception) -> None:
        self.reason = f"({reason})"
        super().__init__(f"{image_id or 'image'}: cannot decode {self.reason}")


def decode_resized(data: bytes, image_size: int, image_id: str = "") -> np.ndarray:
    """Encoded image -> uint8 ``[image_size, image_size, 3]``: short side to ``image_size``, centre square."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notes and the like
            with Image.open(io.BytesIO(data)) as picture:
                if picture.format == "JPEG":
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result stays >= image_size.
                    picture.draft("RGB", (image_size, image_size))
                rgb = picture.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UndecodableImage(image_id, exc) from None
    width, height = rgb.size
    short = min(width, height)
    left, top = (width - short) // 2, (height - short) // 2
    box = (left, top, left + short, top + short)
    if short == image_size:
        square = rgb.crop(box) if width != height else rgb
    else:
        square = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(square, dtype=np.uint8)


@dataclass
class PlannedSplit:
    """Which images make up a split: ``items`` are ``(label, image_id, ref)``, ``ref`` meaning what the
    dataset's reader needs to fetch the encoded bytes."""

    class_names: list[str]
    items: list[tuple[int, str, Any]] = field(default_factory=list)

    def counts(self, skipped: int = 0) -> dict[str, int]:
        """Classes and images of the split as written, ``skipped`` unreadable images left out."""
        return {"classes": len(self.class_names), "images": len(self.items) - skipped}


def holdout_positions(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``n`` positions chosen by ``rng``, in increasing order."""
    return np.sort(rng.permutation(n)[:k])


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


SKIP_HINT = "set datasets.<name>.prepare.skip_bad_images: true (--skip-bad-images) to leave such images out"


def _decode_or_error(data: bytes, image_size: int, image_id: str) -> np.ndarray | UndecodableImage:
    try:
        return decode_resized(data, image_size, image_id)
    except UndecodableImage as exc:
        return exc


def write_planned_split(
    path: Path,
    planned: PlannedSplit,
    read: Callable[[Any], bytes],
    image_size: int,
    meta: dict[str, Any],
    workers: int | None = None,
    skip_bad_images: bool = False,
) -> list[str]:
    """Decode, resize and write one split. ``read(ref)`` runs in this thread (archives are not thread-safe);
    decoding runs in a pool of ``workers`` threads (Pillow releases the GIL while decoding).

    An image that cannot be decoded (corrupt or truncated file) stops preparation with an error naming the
    file and its class; with ``skip_bad_images`` it is left out instead. Returns the skipped images as
    ``"<image_id> (class <name>): <reason>"``."""
    workers = workers or min(8, os.cpu_count() or 1)
    progress = Progress(
        f"{meta.get('dataset', '')} {meta.get('split', path.name)}".strip(), len(planned.items), unit="images"
    )
    shape = (image_size, image_size, 3)
    skipped: list[str] = []
    with (
        SplitWriter(path, len(planned.items), shape, planned.class_names, meta) as writer,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        for batch in _batches(planned.items, BATCH):
            encoded = [read(ref) for _, _, ref in batch]
            images = pool.map(_decode_or_error, encoded, [image_size] * len(batch), [i for _, i, _ in batch])
            for (label, image_id, ref), image in zip(batch, images, strict=True):
                if isinstance(image, UndecodableImage):
                    where = ref if isinstance(ref, Path) else image_id
                    what = f"{where} (class {planned.class_names[label]}): cannot decode {image.reason}"
                    if not skip_bad_images:
                        raise UserError(f"{what}; {SKIP_HINT}")
                    print(f"skipping unreadable image {what}", file=sys.stderr, flush=True)
                    skipped.append(what)
                    writer.skip(image_id)
                    continue
                writer.add(image, label, image_id)
            progress.update(len(batch))
    progress.close()
    return skipped


def write_benchmark(
    out: str | os.PathLike,
    dataset: str,
    plans: dict[str, PlannedSplit],
    read: Callable[[Any], bytes],
    image_size: int,
    summary: dict[str, Any],
    workers: int | None = None,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Write the four splits and ``prepared.json`` (written last: its presence means the folder is whole).
    ``skip_bad_images``: leave out undecodable images (counted in the log and in ``prepared.json``) instead
    of stopping at the first one."""
    out = Path(out)
    if set(plans) != set(SPLITS):
        raise ValueError(f"plans must have the splits {SPLITS}, got {sorted(plans)}")
    if plans["base_holdout"].class_names != plans["base"].class_names:
        raise ValueError("base_holdout must have the same class_names, in the same order, as base")
    base_ids = {image_id for _, image_id, _ in plans["base"].items}
    if any(image_id in base_ids for _, image_id, _ in plans["base_holdout"].items):
        raise ValueError("base_holdout shares images with base")
    if image_size < 8:
        raise UserError(f"image_size must be at least 8 pixels, got {image_size}")
    (out / "prepared.json").unlink(missing_ok=True)
    common = {
        "dataset": dataset,
        "pipeline": PIPELINE,
        "source": summary.get("source"),
        "source_sha256": summary.get("source_sha256"),
        "preprocessing": preprocessing_note(image_size),
    }
    skipped: dict[str, list[str]] = {}
    for split in SPLITS:
        skipped[split] = write_planned_split(
            out / split, plans[split], read, image_size, {**common, "split": split}, workers, skip_bad_images
        )
    total_skipped = sum(len(items) for items in skipped.values())
    if skip_bad_images:
        print(
            f"{dataset}: skipped {total_skipped} unreadable image(s)"
            + "".join(f"; {split} {len(items)}" for split, items in skipped.items() if items),
            file=sys.stderr,
            flush=True,
        )
    summary = {
        "dataset": dataset,
        **summary,
        "image_size": image_size,
        "pipeline": PIPELINE,
        "preprocessing": preprocessing_note(image_size),
        "splits": {split: plans[split].counts(len(skipped[split])) for split in SPLITS},
        "skip_bad_images": skip_bad_images,
        "skipped_images": {split: items for split, items in skipped.items() if items},
    }
    write_json(out / "prepared.json", summary)
    return summary


def obtain(dataset: str, source: SourceConfig, fixture: bool) -> tuple[str, Path, Digests | None]:
    """A dataset's raw data as a local path, downloaded and verified when it is a URL: the configured source,
    else the registry's official archive. Returns (the source as given or defaulted, path, digests).

    With no checksum or size given, an archive that is not a test fixture must pass the official archive's
    checks (the registry's ``archive.md5``/``size``); a folder is taken as it is.
    """
    spec = DATASETS[dataset]
    location, mirrors = source.source, source.mirrors
    if location is None or not str(location).strip():
        location, mirrors = spec.archive.url or spec.default_source, mirrors or spec.archive.mirrors
    if location is None:
        raise UserError(f"no {dataset} source configured (datasets.{dataset}.prepare.source, --source): "
                        f"{spec.how_to_get}")
    md5, sha256, size = source.md5, source.sha256, source.size
    checks_given = bool(md5 or sha256 or size is not None)
    is_folder = not is_url(location) and local_path(location).is_dir()
    if not (fixture or checks_given or is_folder):
        md5, size = spec.archive.md5, spec.archive.size
    try:
        path, digests = fetch_source(location, source.raw_dir, md5=md5, sha256=sha256, size=size,
                                     mirrors=mirrors, retries=source.retries, backoff=source.backoff,
                                     timeout=source.timeout)
    except DownloadFailed as exc:
        raise UserError(by_hand_hint(dataset, exc.out, str(location), md5, size) + f"; {exc}") from None
    return str(location), path, digests


def by_hand_hint(dataset: str, out: Path, url: str, md5: str | None, size: int | None) -> str:
    """What to do when the download cannot happen here (no network, a blocked host): where the file goes."""
    checks = ", ".join(part for part in (f"md5 {md5}" if md5 else "", f"{size:,} bytes" if size else "") if part)
    return (f"cannot download {out.name} for {dataset}; without a network here, download {url} elsewhere"
            f"{f' ({checks})' if checks else ''} and put it at {out}, or set datasets.{dataset}.prepare.source "
            f"(--source) to its path, then run again")


def source_summary(source: str | os.PathLike, path: Path, digests) -> dict[str, Any]:
    """The ``source*`` fields of ``prepared.json``."""
    info: dict[str, Any] = {"source": str(source), "source_path": str(path)}
    if digests is not None:
        info.update(source_size=digests.size, source_md5=digests.md5, source_sha256=digests.sha256)
    else:
        info.update(source_size=None, source_md5=None, source_sha256=None)
    return info

"""The prepared-split store: one on-disk format for every dataset and split.

A prepared split is a folder::

    <split>/
        images.npy      uint8 [N, H, W, C], C = 1 (grey) or 3 (RGB), pre-resized, memory-mappable
        labels.npy      int64 [N], split-local class index 0..num_classes-1
        image_ids.txt   N lines: where each image came from (original file name or id)
        meta.json       format tag, dataset, split, class_names, pipeline, provenance

Images are stored pre-resized so that an epoch only slices a memory map; see the README section
"Input pipeline" for how this differs from decoding full-resolution files every epoch.

The folder is written under a temporary name and renamed into place when complete, so a folder that
exists under its final name is always whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from negmargin.errors import UserError
from negmargin.io import publish_mode, write_error

FORMAT = "negmargin-store/1"
PIPELINES = ("omniglot", "imagenet84")


@dataclass(frozen=True)
class Split:
    """A prepared split, opened read-only. ``images`` is a memory map."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    image_ids: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def pipeline(self) -> str:
        return str(self.meta.get("pipeline", "imagenet84"))

    def indices_by_class(self) -> list[np.ndarray]:
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return np.split(order, np.cumsum(counts)[:-1])


def load_split(path: str | os.PathLike, mmap: bool = True) -> Split:
    """Open a prepared split. Raises UserError naming the folder if it is missing or malformed."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"{path}: not a prepared split (no meta.json); run `negmargin prepare` first"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_path}: not valid JSON ({exc.msg})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        images = np.load(path / "images.npy", mmap_mode="r" if mmap else None)
        labels = np.load(path / "labels.npy")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read images.npy/labels.npy ({exc})") from None
    ids_path = path / "image_ids.txt"
    image_ids = ids_path.read_text(encoding="utf-8").splitlines() if ids_path.is_file() else []
    class_names = list(meta.get("class_names", []))
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"{path}/images.npy: expected uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise UserError(f"{path}/labels.npy: expected {images.shape[0]} labels, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise UserError(f"{path}/labels.npy: labels must lie in 0..{len(class_names) - 1}")
    if image_ids and len(image_ids) != len(labels):
        raise UserError(f"{ids_path}: {len(image_ids)} lines for {len(labels)} images")
    return Split(path, images, labels.astype(np.int64), class_names, image_ids, meta)


class SplitWriter:
    """Write a split image by image into a temporary folder, then rename it into place.

    Use as a context manager; if the block raises, nothing appears under the final name::

        with SplitWriter(out, num_images=n, image_shape=(84, 84, 3), class_names=names,
                         meta={"dataset": "cub", "split": "base", "pipeline": "imagenet84"}) as w:
            for image, label, image_id in items:
                w.add(image, label, image_id)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_images: int,
        image_shape: tuple[int, int, int],
        class_names: list[str],
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.num_images = int(num_images)
        self.image_shape = tuple(int(v) for v in image_shape)
        self.class_names = list(class_names)
        self.meta = dict(meta or {})
        if self.meta.get("pipeline", "imagenet84") not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {self.meta.get('pipeline')!r}")
        self._count = 0
        self.skipped: list[str] = []

    def skip(self, image_id: str) -> None:
        """Leave out one of the declared images (an unreadable file): the split ends up one image shorter."""
        self.skipped.append(str(image_id))

    def __enter__(self) -> SplitWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        try:
            self._images = np.lib.format.open_memmap(
                self._tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(self.num_images, *self.image_shape)
            )
        except OSError as exc:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise write_error(self.path / "images.npy", exc) from None
        self._labels = np.zeros(self.num_images, dtype=np.int64)
        self._ids: list[str] = []
        return self

    def add(self, image: np.ndarray, label: int, image_id: str = "") -> None:
        if self._count >= self.num_images:
            raise ValueError(f"more than the declared {self.num_images} images")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape != self.image_shape or image.dtype != np.uint8:
            raise ValueError(f"image {image_id!r}: expected uint8 {self.image_shape}, got {image.dtype} {image.shape}")
        if not 0 <= int(label) < len(self.class_names):
            raise ValueError(f"image {image_id!r}: label {label} outside 0..{len(self.class_names) - 1}")
        self._images[self._count] = image
        self._labels[self._count] = int(label)
        self._ids.append(str(image_id).replace("\n", " "))
        self._count += 1

    def _shrink(self) -> None:
        """Copy the images written so far into an images.npy of the final (smaller) length."""
        full = self._tmp / "images.npy"
        short = self._tmp / "images.short.npy"
        out = np.lib.format.open_memmap(short, mode="w+", dtype=np.uint8, shape=(self._count, *self.image_shape))
        for start in range(0, self._count, 4096):
            stop = min(start + 4096, self._count)
            out[start:stop] = self._images[start:stop]
        out.flush()
        del out
        del self._images
        os.replace(short, full)
        self._images = None

    def add_batch(self, images: np.ndarray, labels: np.ndarray, image_ids: list[str]) -> None:
        n = len(labels)
        if self._count + n > self.num_images:
            raise ValueError(f"more than the declared {self.num_images} images")
        if images.shape[1:] != self.image_shape or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 [n, {self.image_shape}], got {images.dtype} {images.shape}")
        self._images[self._count : self._count + n] = images
        self._labels[self._count : self._count + n] = labels
        self._ids.extend(str(i) for i in image_ids)
        self._count += n

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                return
            if self._count + len(self.skipped) != self.num_images:
                raise ValueError(f"{self.path}: declared {self.num_images} images, wrote {self._count}")
            self._images.flush()
            if self.skipped:
                self._shrink()
            del self._images
            self._labels = self._labels[: self._count]
            counts = np.bincount(self._labels, minlength=len(self.class_names))
            empty = [name for name, count in zip(self.class_names, counts, strict=True) if count == 0]
            if empty and self.skipped:
                raise UserError(
                    f"{self.path}: class {empty[0]!r} has no readable image left after skipping "
                    f"{len(self.skipped)} unreadable one(s)"
                )
            np.save(self._tmp / "labels.npy", self._labels)
            (self._tmp / "image_ids.txt").write_text("\n".join(self._ids) + ("\n" if self._ids else ""))
            meta = {
                "format": FORMAT,
                **self.meta,
                "num_images": self._count,
                "num_classes": len(self.class_names),
                "image_shape": list(self.image_shape),
                "images_per_class": {"min": int(counts.min()), "max": int(counts.max())} if len(counts) else {},
                "class_names": self.class_names,
            }
            if self.skipped:
                meta["skipped_images"] = self.skipped
            (self._tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            if self.path.exists():
                shutil.rmtree(self.path)
            publish_mode(self._tmp, directory=True)
            os.replace(self._tmp, self.path)
        except OSError as exc:  # a full disk while finishing the split: name it; the old split stays
            raise write_error(self.path, exc) from None
        finally:
            if self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)


def write_split(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    image_ids: list[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> Split:
    """Write a whole split held in memory; returns it re-opened from disk."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    ids = list(image_ids) if image_ids is not None else [str(i) for i in range(len(labels))]
    with SplitWriter(path, len(labels), images.shape[1:], class_names, meta) as writer:
        writer.add_batch(images, np.asarray(labels, dtype=np.int64), ids)
    return load_split(path)

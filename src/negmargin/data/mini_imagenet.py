"""Prepare mini-ImageNet (Ravi & Larochelle split: 64 / 16 / 20 classes x 600 images) into the store.

ImageNet cannot be downloaded automatically (an account and acceptance of its terms are needed). Sources:

(a) ``ILSVRC2012_img_train.tar``: a tar of per-class tars ``nXXXXXXXX.tar`` holding ``nXXXXXXXX_N.JPEG``.
    It is read in place (nothing is extracted). A CSV row ``n0153282900000005.jpg`` is the 5th file
    (1-based) of class ``n01532829`` with the files sorted by the number ``N`` in ``<wnid>_<N>.JPEG``,
    the rule of CloserLookFewShot / negative-margin / mmfewshot.
(b) Ravi's ``images.zip`` (``images/n0153282900000005.jpg``, 84x84): names used directly.
(c) a folder: ILSVRC layout (``[train/]<wnid>/<wnid>_<N>.JPEG`` or ``<wnid>.tar`` files) or Ravi layout
    (``[images/]n0153282900000005.jpg``).

``base_holdout``:
* ILSVRC sources: the ImageNet images of the 64 base classes that ``train.csv`` does not list (about 700
  per class), as the paper's ``base_val`` (negative-margin ``write_miniImagenet_base_val_filelist.py``).
  ``base`` keeps all 38,400 images. ``base_holdout=N`` keeps a seeded choice of N of them per class.
* Ravi layout (only the 60,000 listed images exist): ``base_holdout`` images per base class (default 20)
  are taken out of ``base``, which then holds 600 - 20 per class.

For ILSVRC sources the image ids are the ImageNet file names; ``ravi_to_ilsvrc.csv`` in the output
folder maps every CSV name to its file.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import tarfile
import zipfile
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
from negmargin.data.download import check_digests, is_url, local_path
from negmargin.data.extract import archive_kind
from negmargin.datasets import BenchmarkOptions
from negmargin.errors import UserError
from negmargin.io import write_text
from negmargin.options import SourceConfig

ILSVRC_TRAIN_TAR = "ILSVRC2012_img_train.tar"
ILSVRC_TRAIN_MD5 = "1d675b47d978889d74fa0da5fadfb00e"
RAVI_ZIP_STATED_MD5 = "987d2dfede486f633ec052ff463b62c6"  # third-party statement, not verified: not enforced
RAVI_IMAGE_SIZE = 84
IMAGES_PER_CLASS = 600
NUM_CLASSES = {"base": 64, "val": 16, "novel": 20}
CSV_OF = {"base": "train", "val": "val", "novel": "test"}
DEFAULT_RAVI_BASE_HOLDOUT = 20
CONFIG_KEY = "datasets.mini_imagenet.prepare.source"

HOW_TO_GET = (
    "mini-ImageNet cannot be downloaded automatically (ImageNet terms of access). "
    "1) Get an ImageNet account at https://image-net.org/ and download ILSVRC2012_img_train.tar "
    f"(about 138 GB, md5 {ILSVRC_TRAIN_MD5}), or get Ravi & Larochelle's images.zip (84x84 images named "
    f"as in the split CSVs). 2) Set the config key {CONFIG_KEY} (negmargin prepare "
    "mini-imagenet --source) to that file, or to a folder with the extracted train/<wnid>/<wnid>_<N>.JPEG "
    "or images/<name>.jpg files."
)

_WNID = re.compile(r"n\d{8}")
_RAVI_NAME = re.compile(r"(n\d{8})(\d{8})\.jpg")
_ILSVRC_NAME = re.compile(r"(n\d{8})_(\d+)\.jpe?g", re.IGNORECASE)
_CLASS_TAR = re.compile(r"(n\d{8})\.tar")


@functools.lru_cache(maxsize=3)
def read_ravi_csv(split: str) -> tuple[tuple[str, str], ...]:
    """Rows ``(filename, wnid)`` of Ravi's ``train``/``val``/``test`` CSV, in file order."""
    rows = list(csv.reader(io.StringIO(split_file(f"miniImageNet/ravi/{split}.csv"))))
    if rows[0] != ["filename", "label"]:
        raise UserError(f"splits/miniImageNet/ravi/{split}.csv: unexpected header {rows[0]}")
    out = []
    for filename, wnid in rows[1:]:
        match = _RAVI_NAME.fullmatch(filename)
        if not match or match.group(1) != wnid:
            raise UserError(f"splits/miniImageNet/ravi/{split}.csv: bad row {filename},{wnid}")
        out.append((filename, wnid))
    return tuple(out)


def ravi_position(filename: str) -> tuple[str, int]:
    """``n0153282900000005.jpg`` -> ``("n01532829", 5)``: the class and the 1-based file position."""
    match = _RAVI_NAME.fullmatch(filename)
    if not match:
        raise ValueError(f"not a mini-ImageNet file name: {filename!r}")
    return match.group(1), int(match.group(2))


def ilsvrc_number(name: str) -> int:
    """``n01532829_1234.JPEG`` -> 1234, the key the class folder is sorted by."""
    match = _ILSVRC_NAME.fullmatch(Path(name).name)
    if not match:
        raise ValueError(f"not an ILSVRC train file name: {name!r}")
    return int(match.group(2))


def sorted_class_files(names: Sequence[str]) -> list[str]:
    """ILSVRC file names of one class, sorted by their number (not lexicographically)."""
    return sorted(names, key=ilsvrc_number)


# ---------------------------------------------------------------------------------------------- sources


class _ClassTars:
    """Per-class tars (inside the ILSVRC train tar, or as files in a folder), opened one at a time."""

    kind = "ilsvrc"

    def __init__(self, where: str, opener: dict) -> None:
        self.where = where
        self._opener = opener  # wnid -> callable returning a seekable file object of the class tar
        self._current: tuple[str, tarfile.TarFile, dict[str, tarfile.TarInfo]] | None = None

    def classes(self) -> set[str]:
        return set(self._opener)

    def _open_class(self, wnid: str) -> dict[str, tarfile.TarInfo]:
        if self._current is None or self._current[0] != wnid:
            if self._current is not None:
                self._current[1].close()
            try:
                inner = tarfile.open(fileobj=self._opener[wnid](), mode="r:")
                members = {
                    Path(m.name).name: m
                    for m in inner.getmembers()
                    if m.isfile() and _ILSVRC_NAME.fullmatch(Path(m.name).name)
                }
            except tarfile.TarError as exc:
                raise UserError(f"{self.where}: {wnid}.tar is not a readable tar ({exc})") from None
            self._current = (wnid, inner, members)
        return self._current[2]

    def files(self, wnid: str) -> list[str]:
        return sorted_class_files(list(self._open_class(wnid)))

    def read(self, ref: tuple[str, str]) -> bytes:
        wnid, name = ref
        members = self._open_class(wnid)
        handle = self._current[1].extractfile(members[name])
        return handle.read()

    def close(self) -> None:
        if self._current is not None:
            self._current[1].close()
            self._current = None


class _IlsvrcTar(_ClassTars):
    def __init__(self, path: Path) -> None:
        try:
            self.outer = tarfile.open(path, mode="r:")  # uncompressed: members are read in place
        except tarfile.ReadError:
            raise UserError(
                f"{path}: a compressed tar; expected the uncompressed {ILSVRC_TRAIN_TAR} (a tar of "
                "per-class tars). Extract other archives and pass the train folder"
            ) from None
        members = {}
        for member in self.outer.getmembers():
            match = _CLASS_TAR.fullmatch(Path(member.name).name)
            if member.isfile() and match:
                members[match.group(1)] = member
        super().__init__(
            str(path), {wnid: (lambda m=m: self.outer.extractfile(m)) for wnid, m in members.items()}
        )

    def close(self) -> None:
        super().close()
        self.outer.close()


class _IlsvrcFolder:
    """``<root>/<wnid>/<wnid>_<N>.JPEG``."""

    kind = "ilsvrc"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def classes(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_dir() and _WNID.fullmatch(p.name)}

    def files(self, wnid: str) -> list[str]:
        return sorted_class_files(
            [p.name for p in (self.root / wnid).iterdir() if _ILSVRC_NAME.fullmatch(p.name)]
        )

    def read(self, ref: tuple[str, str]) -> bytes:
        return (self.root / ref[0] / ref[1]).read_bytes()

    def close(self) -> None:
        pass


class _RaviZip:
    kind = "ravi"

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        self.zip = zipfile.ZipFile(path)
        self.members = {Path(n).name: n for n in self.zip.namelist() if _RAVI_NAME.fullmatch(Path(n).name)}

    def names(self) -> set[str]:
        return set(self.members)

    def read(self, name: str) -> bytes:
        return self.zip.read(self.members[name])

    def close(self) -> None:
        self.zip.close()


class _RaviFolder:
    kind = "ravi"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def names(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if _RAVI_NAME.fullmatch(p.name)}

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def close(self) -> None:
        pass


def open_source(path: Path):
    """Recognise the layout of a local file or folder (see the module docstring)."""
    if path.is_file():
        if archive_kind(path) == "zip":
            return _RaviZip(path)
        source = _IlsvrcTar(path)
        if not source.classes():
            source.close()
            raise UserError(
                f"{path}: a tar without per-class tars nXXXXXXXX.tar; expected {ILSVRC_TRAIN_TAR} "
                "(other archives: extract them and pass the folder)"
            )
        return source
    class_tars = {
        m.group(1): p for p in path.iterdir() if (m := _CLASS_TAR.fullmatch(p.name)) and p.is_file()
    }
    if class_tars:
        return _ClassTars(str(path), {wnid: (lambda p=p: open(p, "rb")) for wnid, p in class_tars.items()})
    for candidate in (path, path / "train"):
        if candidate.is_dir() and any(p.is_dir() and _WNID.fullmatch(p.name) for p in candidate.iterdir()):
            return _IlsvrcFolder(candidate)
    for candidate in (path / "images", path):
        if candidate.is_dir() and any(_RAVI_NAME.fullmatch(p.name) for p in candidate.iterdir()):
            return _RaviFolder(candidate)
    raise UserError(
        f"{path}: neither ILSVRC ([train/]<wnid>/<wnid>_<N>.JPEG, <wnid>.tar) nor Ravi "
        "([images/]n0153282900000005.jpg) layout. " + HOW_TO_GET
    )


# ---------------------------------------------------------------------------------------------- plans


def _csv_classes(expect_full: bool) -> dict[str, list[tuple[str, list[str]]]]:
    """Per store split: ``[(wnid, [csv filenames in order])]`` in CSV order."""
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for split, csv_name in CSV_OF.items():
        by_class: dict[str, list[str]] = {}
        for filename, wnid in read_ravi_csv(csv_name):
            by_class.setdefault(wnid, []).append(filename)
        if expect_full:
            if len(by_class) != NUM_CLASSES[split]:
                raise UserError(f"{csv_name}.csv: {len(by_class)} classes, expected {NUM_CLASSES[split]}")
            wrong = [w for w, names in by_class.items() if len(names) != IMAGES_PER_CLASS]
            if wrong:
                raise UserError(
                    f"{csv_name}.csv: class {wrong[0]} has {len(by_class[wrong[0]])} rows, expected {IMAGES_PER_CLASS}"
                )
        out[split] = list(by_class.items())
    return out


def _plan_ilsvrc(source, base_holdout: int | None, rng: np.random.Generator, expect_full: bool):
    plans: dict[str, PlannedSplit] = {}
    holdout_files: dict[str, list[str]] = {}
    mapping: list[tuple[str, str, str]] = []
    available = source.classes()
    for split, classes in _csv_classes(expect_full).items():
        present = [(w, names) for w, names in classes if w in available]
        if expect_full and len(present) != len(classes):
            missing = next(w for w, _ in classes if w not in available)
            raise UserError(f"{source.where}: class {missing} ({CSV_OF[split]}.csv) not found. " + HOW_TO_GET)
        plans[split] = PlannedSplit([w for w, _ in present])
        for label, (wnid, names) in enumerate(present):
            files = source.files(wnid)
            used = set()
            for filename in names:
                _, position = ravi_position(filename)
                if position > len(files):
                    if expect_full:
                        raise UserError(
                            f"{source.where}: class {wnid} has {len(files)} images, but {filename} "
                            f"refers to the {position}th"
                        )
                    continue  # a fixture with fewer images per class
                ilsvrc_name = files[position - 1]
                used.add(position - 1)
                plans[split].items.append((label, ilsvrc_name, (wnid, ilsvrc_name)))
                mapping.append((CSV_OF[split], filename, ilsvrc_name))
            if split == "base":
                holdout_files[wnid] = [f for i, f in enumerate(files) if i not in used]
    plans["base_holdout"] = PlannedSplit(list(plans["base"].class_names))
    for label, wnid in enumerate(plans["base"].class_names):
        rest = holdout_files[wnid]
        if base_holdout is not None:
            if base_holdout > len(rest):
                raise UserError(
                    f"{source.where}: class {wnid} has {len(rest)} images outside train.csv, "
                    f"fewer than base_holdout={base_holdout}"
                )
            rest = [rest[i] for i in holdout_positions(len(rest), base_holdout, rng)]
        plans["base_holdout"].items.extend((label, name, (wnid, name)) for name in rest)
    return plans, mapping


def _plan_ravi(source, base_holdout: int, rng: np.random.Generator, expect_full: bool):
    plans: dict[str, PlannedSplit] = {}
    available = source.names()
    for split, classes in _csv_classes(expect_full).items():
        present = []
        for wnid, names in classes:
            found = [n for n in names if n in available]
            if expect_full and len(found) != len(names):
                missing = next(n for n in names if n not in available)
                raise UserError(f"{source.where}: {missing} ({CSV_OF[split]}.csv) not found")
            if found:
                present.append((wnid, found))
        plans[split] = PlannedSplit([w for w, _ in present])
        if split == "base":
            plans["base_holdout"] = PlannedSplit([w for w, _ in present])
        for label, (wnid, names) in enumerate(present):
            held: set[int] = set()
            if split == "base":
                if len(names) <= base_holdout:
                    raise UserError(
                        f"{source.where}: class {wnid} has {len(names)} images, too few to hold out {base_holdout}"
                    )
                held = set(holdout_positions(len(names), base_holdout, rng).tolist())
            for position, name in enumerate(names):
                plans["base_holdout" if position in held else split].items.append((label, name, name))
    return plans


def prepare_mini_imagenet(out: str | os.PathLike, source: SourceConfig, options: BenchmarkOptions) -> dict:
    """Prepare mini-ImageNet into ``out`` (``base``, ``base_holdout``, ``val``, ``novel``, ``prepared.json``).

    * ``source.source``: ILSVRC train tar, Ravi's images.zip, a folder (either layout), or a URL of one of
      the archives. Null or a missing path: UserError with the steps to obtain the images.
      With no checksum or size given, an ILSVRC tar must have the official md5 (unless ``options.fixture``).
    * ``options.image_size``: default 96 for ILSVRC (full resolution), 84 (the native size) for Ravi's images.
    * ``options.base_holdout``: see the module docstring (default: all non-CSV images for ILSVRC, 20 for Ravi).
    * ``options.fixture``: accept a subset (test fixtures); otherwise 64/16/20 classes x 600 images are asserted.
    """
    expect_full = not options.fixture
    image_size, base_holdout, seed = options.image_size, options.base_holdout, options.seed
    if source.source is None or str(source.source).strip() == "":
        raise UserError(f"no mini-ImageNet source configured ({CONFIG_KEY}). " + HOW_TO_GET)
    if not is_url(source.source) and not local_path(source.source).exists():
        raise UserError(f"{local_path(source.source)}: mini-ImageNet source not found. " + HOW_TO_GET)
    source_text, path, digests = obtain("mini_imagenet", source, options.fixture)
    md5, sha256, size = source.md5, source.sha256, source.size
    reader = open_source(path)
    try:
        summary = source_summary(source_text, path, digests)
        if reader.kind == "ilsvrc" and path.is_file():
            if expect_full and digests is not None and not (md5 or sha256 or size is not None):
                check_digests(str(path), digests, md5=ILSVRC_TRAIN_MD5)
            summary["source_kind"] = "ilsvrc-train-tar"
        elif reader.kind == "ilsvrc":
            summary["source_kind"] = "ilsvrc-folder"
        else:
            summary["source_kind"] = "ravi-zip" if path.is_file() else "ravi-folder"
            if digests is not None:
                summary["ravi_zip_stated_md5"] = RAVI_ZIP_STATED_MD5
                summary["ravi_zip_stated_md5_matches"] = digests.md5 == RAVI_ZIP_STATED_MD5

        rng = np.random.default_rng(seed)
        out = Path(out)
        if reader.kind == "ilsvrc":
            image_size = FULL_RESOLUTION_IMAGE_SIZE if image_size is None else int(image_size)
            plans, mapping = _plan_ilsvrc(reader, base_holdout, rng, expect_full)
            rule = (
                "ImageNet train images of the base classes not listed in train.csv (the paper's base_val)"
                + (
                    ""
                    if base_holdout is None
                    else f"; a seeded choice of {base_holdout} per class (seed {seed})"
                )
            )
            lines = ["split,ravi_filename,ilsvrc_filename"] + [",".join(row) for row in mapping]
            write_text(out / "ravi_to_ilsvrc.csv", "\n".join(lines) + "\n")
            summary["mapping"] = (
                "ravi_to_ilsvrc.csv: row n<wnid><k>.jpg = k-th file (1-based) of the class, sorted by N in <wnid>_<N>.JPEG"
            )
        else:
            image_size = RAVI_IMAGE_SIZE if image_size is None else int(image_size)
            base_holdout = DEFAULT_RAVI_BASE_HOLDOUT if base_holdout is None else base_holdout
            plans = _plan_ravi(reader, base_holdout, rng, expect_full)
            rule = (
                f"{base_holdout} images per base class, seeded permutation (seed {seed}), removed from base"
            )
        summary.update(
            split_files="splits/miniImageNet/ravi/{train,val,test}.csv",
            base_holdout=base_holdout,
            base_holdout_rule=rule,
            seed=seed,
            expect_full=expect_full,
        )
        return write_benchmark(out, "mini_imagenet", plans, reader.read, image_size, summary, options.workers,
                               source.skip_bad_images)
    finally:
        reader.close()

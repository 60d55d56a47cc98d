"""Prepare tiered-ImageNet (Ren et al. 2018: 351 / 97 / 160 classes in 20 / 6 / 8 categories) into the store.

Source: Ren et al.'s ``tiered-imagenet.tar`` (by URL or local path; md5 ``e07e811b...``) or a folder, holding
``[tiered-imagenet/]{train,val,test}_images_png.pkl`` (a pickled list of PNG-encoded 84x84 images, each
``bytes`` or a uint8 array) and ``{split}_labels.pkl`` (a dict with ``label_specific``,
``label_general``, ``label_specific_str``, ``label_general_str``; Python-2 pickles, so strings may
arrive as ``bytes``). The tar is read in place, nothing is extracted.

* Pickles are loaded with a restricted unpickler that only builds numpy arrays and plain containers: a
  pickle from the internet cannot run code.
* The labels pickles name classes by WordNet words (``"Yorkshire terrier"``) and categories by words cut
  to 46 characters; both are resolved to synsets through ``splits/tieredImageNet/classes.csv`` and
  checked against ``{train,val,test}.csv`` (every class in its split, in the category the CSV gives).
  The store's ``class_names`` are the class synsets, in CSV order.
* Memory: the PNG bytes of one split sit in RAM while it is written (about 7 GB for train, as with the
  original loader), but decoded images are streamed to disk.
* ``image_size`` defaults to 84, the images' own size (no resampling at all).
* ``base_holdout``: the archive holds only the split images, so ``base_holdout`` images per base class
  (default 20, about 1.6% of the roughly 1,280 per class) are taken out of ``base`` by a seeded permutation.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import tarfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from negmargin.data.benchmark import (
    PlannedSplit,
    holdout_positions,
    obtain,
    source_summary,
    split_file,
    write_benchmark,
)
from negmargin.datasets import BenchmarkOptions
from negmargin.errors import UserError
from negmargin.options import SourceConfig

TIERED_IMAGE_SIZE = 84
SOURCE_SPLIT = {"base": "train", "val": "val", "novel": "test"}
NUM_IMAGES = {"train": 448_695, "val": 124_261, "test": 206_209}
NUM_CLASSES = {"train": 351, "val": 97, "test": 160}
NUM_CATEGORIES = {"train": 20, "val": 6, "test": 8}
DEFAULT_BASE_HOLDOUT = 20
LABEL_KEYS = ("label_specific", "label_general", "label_specific_str", "label_general_str")

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("copyreg", "_reconstructor"),
    ("copy_reg", "_reconstructor"),
    ("collections", "OrderedDict"),
    ("builtins", "object"),
    ("__builtin__", "object"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays and plain data are allowed"
            )
        return super().find_class(module, name)


def safe_load_pickle(handle: BinaryIO, what: str) -> Any:
    """Load a (possibly Python-2) pickle that may only hold numpy arrays, bytes, strings and containers."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy.core -> numpy._core deprecation notes
            return _RestrictedUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise UserError(f"{what}: cannot load pickle ({exc})") from None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _png_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, np.ndarray):
        return item.tobytes()
    if isinstance(item, str):  # a Python-2 str read with latin1
        return item.encode("latin1")
    raise TypeError(type(item).__name__)


def read_split_csv(split: str) -> list[tuple[str, str]]:
    """``[(class_synset, category_synset)]`` of ``splits/tieredImageNet/<split>.csv`` in file order."""
    return [
        (row[0], row[1]) for row in csv.reader(io.StringIO(split_file(f"tieredImageNet/{split}.csv"))) if row
    ]


def _words() -> tuple[dict[str, str], dict[str, str]]:
    """WordNet words of every class synset and every category synset (``classes.csv``)."""
    class_words, category_words = {}, {}
    for row in csv.DictReader(io.StringIO(split_file("tieredImageNet/classes.csv"))):
        class_words[row["synset"]] = row["wordnet_words"]
        category_words[row["category_synset"]] = row["category_words"]
    return class_words, category_words


class SplitNames:
    """Resolve the strings of a labels pickle to synsets, for one split.

    The pickles name classes by their WordNet words (``"Yorkshire terrier"``) and categories by words
    cut to 46 characters (``"protective covering, protective cover, protect"``); synset ids are accepted
    too. Anything that matches no class (category) of the split's CSV is an error.
    """

    def __init__(self, split: str) -> None:
        self.split = split
        self.rows = read_split_csv(split)
        class_words, category_words = _words()
        self.category_of = dict(self.rows)
        self._class = {synset: synset for synset, _ in self.rows}
        self._class.update({class_words[synset]: synset for synset, _ in self.rows})
        self._category_words = {cat: category_words[cat] for cat in set(self.category_of.values())}

    def class_synset(self, name: str) -> str | None:
        return self._class.get(name)

    def category_synset(self, name: str) -> str | None:
        if name in self._category_words:
            return name
        matches = [
            cat
            for cat, words in self._category_words.items()
            if words == name or (len(name) >= 20 and words.startswith(name))
        ]
        return matches[0] if len(matches) == 1 else None


class _Files:
    """The six pickles, inside the tar or in a folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        wanted = {f"{s}_{kind}.pkl" for s in SOURCE_SPLIT.values() for kind in ("images_png", "labels")}
        self.members: dict[str, Any] = {}
        if path.is_file():
            try:
                self.tar = tarfile.open(path, mode="r:*")
                candidates = [(Path(m.name).name, m) for m in self.tar.getmembers() if m.isfile()]
            except tarfile.TarError as exc:
                raise UserError(f"{path}: not a readable tar ({exc})") from None
        else:
            candidates = [(p.name, p) for p in sorted(path.rglob("*.pkl"))]
        for name, member in candidates:
            if name in wanted:
                if name in self.members:
                    raise UserError(f"{path}: {name} appears more than once")
                self.members[name] = member
        missing = sorted(wanted - set(self.members))
        if missing:
            raise UserError(
                f"{path}: {missing[0]} not found; expected tiered-imagenet/{{train,val,test}}_"
                "{images_png,labels}.pkl (Ren et al.'s tiered-imagenet.tar)"
            )

    def load(self, name: str) -> Any:
        member = self.members[name]
        what = f"{self.path}: {name}"
        if self.tar is not None:
            with self.tar.extractfile(member) as handle:
                return safe_load_pickle(handle, what)
        with open(member, "rb") as handle:
            return safe_load_pickle(handle, what)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def read_labels(files: _Files, split: str) -> tuple[list[str], list[str]]:
    """Per image of ``<split>_labels.pkl``: its class synset and its category synset, checked against the
    committed split (class in ``<split>.csv``, category as the CSV says)."""
    raw = files.load(f"{split}_labels.pkl")
    what = f"{files.path}: {split}_labels.pkl"
    if not isinstance(raw, dict):
        raise UserError(f"{what} holds {type(raw).__name__}, expected a dict")
    labels = {_text(k): v for k, v in raw.items()}
    missing = [k for k in LABEL_KEYS if k not in labels]
    if missing:
        raise UserError(f"{what} lacks the key {missing[0]!r}")
    specific = np.asarray(labels["label_specific"]).astype(np.int64).ravel()
    general = np.asarray(labels["label_general"]).astype(np.int64).ravel()
    specific_str = [_text(s) for s in labels["label_specific_str"]]
    general_str = [_text(s) for s in labels["label_general_str"]]
    if len(specific) != len(general):
        raise UserError(f"{what} has {len(specific)} label_specific but {len(general)} label_general")
    for values, names, key in (
        (specific, specific_str, "label_specific"),
        (general, general_str, "label_general"),
    ):
        if len(values) and (values.min() < 0 or values.max() >= len(names)):
            raise UserError(f"{what}: {key} outside 0..{len(names) - 1}")
    names = SplitNames(split)
    classes = []
    for name in specific_str:
        synset = names.class_synset(name)
        if synset is None:
            raise UserError(f"{what}: class {name!r} is not in splits/tieredImageNet/{split}.csv")
        classes.append(synset)
    categories = []
    for name in general_str:
        synset = names.category_synset(name)
        if synset is None:
            raise UserError(
                f"{what}: category {name!r} is not a category of splits/tieredImageNet/{split}.csv"
            )
        categories.append(synset)
    image_classes = [classes[i] for i in specific]
    image_categories = [categories[i] for i in general]
    for index, (cls, cat) in enumerate(zip(image_classes, image_categories, strict=True)):
        if names.category_of[cls] != cat:
            raise UserError(
                f"{what}: image {index} has class {cls} ({specific_str[specific[index]]!r}) in category "
                f"{cat}, but splits/tieredImageNet/{split}.csv puts it in {names.category_of[cls]}"
            )
    return image_classes, image_categories


def prepare_tiered_imagenet(out: str | os.PathLike, source: SourceConfig, options: BenchmarkOptions) -> dict:
    """Prepare tiered-ImageNet into ``out`` (``base``, ``base_holdout``, ``val``, ``novel``, ``prepared.json``).

    * ``source.source``: ``tiered-imagenet.tar`` (URL or path) or a folder holding the pickles. With no
      checksum or size given, the archive must have the md5 stated by torchmeta (unless ``options.fixture``).
    * ``options.image_size``: default 84 (the pickles' own size); ``options.base_holdout``: images per base
      class kept out of ``base`` (default 20).
    * ``options.fixture``: accept a subset of the real classes (test fixtures); otherwise 351/97/160 classes
      and 448,695/124,261/206,209 images are asserted.
    """
    expect_full = not options.fixture
    image_size = TIERED_IMAGE_SIZE if options.image_size is None else options.image_size
    base_holdout = DEFAULT_BASE_HOLDOUT if options.base_holdout is None else options.base_holdout
    seed = options.seed
    source_text, path, digests = obtain("tiered_imagenet", source, options.fixture)
    files = _Files(path)
    rng = np.random.default_rng(seed)
    plans: dict[str, PlannedSplit] = {}
    num_labels: dict[str, int] = {}
    try:
        for split, source_split in SOURCE_SPLIT.items():
            classes, categories = read_labels(files, source_split)
            committed = read_split_csv(source_split)
            present = set(classes)
            class_names = [c for c, _ in committed if c in present]
            if expect_full:
                if (
                    len(class_names) != NUM_CLASSES[source_split]
                    or len(set(categories)) != NUM_CATEGORIES[source_split]
                ):
                    raise UserError(
                        f"{path}: {source_split} has {len(class_names)} classes in {len(set(categories))} "
                        f"categories, expected {NUM_CLASSES[source_split]} in {NUM_CATEGORIES[source_split]}"
                    )
                if len(classes) != NUM_IMAGES[source_split]:
                    raise UserError(
                        f"{path}: {source_split} has {len(classes)} images, expected {NUM_IMAGES[source_split]}"
                    )
            label_of = {c: i for i, c in enumerate(class_names)}
            labels = np.array([label_of[c] for c in classes], dtype=np.int64)
            order = np.argsort(labels, kind="stable")  # grouped by class, pickle order within a class
            plans[split] = PlannedSplit(class_names)
            if split == "base":
                plans["base_holdout"] = PlannedSplit(list(class_names))
                held = np.zeros(len(labels), dtype=bool)
                for label in range(len(class_names)):
                    members = np.flatnonzero(labels == label)
                    if len(members) <= base_holdout:
                        raise UserError(
                            f"{path}: class {class_names[label]} has {len(members)} images, "
                            f"too few to hold out {base_holdout}"
                        )
                    held[members[holdout_positions(len(members), base_holdout, rng)]] = True
            for index in order.tolist():
                target = "base_holdout" if split == "base" and held[index] else split
                plans[target].items.append((int(labels[index]), f"{source_split}/{index}", index))
            num_labels[source_split] = len(classes)
        summary = {
            **source_summary(source_text, path, digests),
            "source_kind": "archive" if path.is_file() else "folder",
            "split_files": "splits/tieredImageNet/{train,val,test}.csv",
            "image_ids": "<source split>/<index in <split>_images_png.pkl>",
            "base_holdout": base_holdout,
            "base_holdout_rule": f"{base_holdout} images per base class, seeded permutation (seed {seed}), removed from base",
            "seed": seed,
            "expect_full": expect_full,
        }
        return _write(out, plans, files, image_size, summary, options.workers, num_labels, source.skip_bad_images)
    finally:
        files.close()


def _write(
    out,
    plans: dict[str, PlannedSplit],
    files: _Files,
    image_size: int,
    summary: dict,
    workers: int | None,
    num_labels: dict[str, int],
    skip_bad_images: bool = False,
) -> dict:
    """Write split by split, holding one split's PNG bytes at a time (base and base_holdout share them)."""
    loaded: dict[str, list] = {}

    def read(ref: tuple[str, int]) -> bytes:
        source_split, index = ref
        if source_split not in loaded:
            loaded.clear()
            images = files.load(f"{source_split}_images_png.pkl")
            if isinstance(images, np.ndarray) and images.dtype != object:
                raise UserError(
                    f"{files.path}: {source_split}_images_png.pkl holds a {images.dtype} array, "
                    "expected a list of PNG-encoded images"
                )
            images = list(images)
            if len(images) != num_labels[source_split]:
                raise UserError(
                    f"{files.path}: {source_split}_images_png.pkl has {len(images)} images but "
                    f"{source_split}_labels.pkl {num_labels[source_split]} labels"
                )
            loaded[source_split] = images
        try:
            return _png_bytes(loaded[source_split][index])
        except TypeError as exc:
            raise UserError(
                f"{files.path}: {source_split}_images_png.pkl: image {index} is a {exc}, expected PNG bytes"
            ) from None

    for split, planned in plans.items():
        source_split = SOURCE_SPLIT["base" if split == "base_holdout" else split]
        planned.items = [(label, image_id, (source_split, index)) for label, image_id, index in planned.items]
    return write_benchmark(out, "tiered_imagenet", plans, read, image_size, summary, workers, skip_bad_images)

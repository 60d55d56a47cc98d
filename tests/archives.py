"""Tiny fixture archives in the real formats of CUB-200-2011, ILSVRC-2012, Ravi's mini-ImageNet zip and
Ren et al.'s tiered-ImageNet pickles. Real class names (from the committed split files), few small images.

Every image is a solid colour that says which file it is, so tests can check that preparation picked
the right file: JPEGs of flat colour come back within a few levels, PNGs exactly.
"""

from __future__ import annotations

import csv
import functools
import io
import pickle
import random
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = Path(__file__).resolve().parents[1] / "src" / "negmargin" / "data" / "splits"


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (32, 32), border: int = 0) -> bytes:
    """A flat-colour JPEG (4:4:4, quality 95). ``border`` > 0 paints black strips of that width on the
    left and right (or top and bottom) so that only the centre square has ``color``."""
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:] = color
    if border:
        if width > height:
            pixels[:, :border] = 0
            pixels[:, width - border :] = 0
        else:
            pixels[:border] = 0
            pixels[height - border :] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


# --------------------------------------------------------------------------------------------------- CUB


def cub_class_names() -> list[str]:
    return [
        line.split()[1] for line in (SPLITS / "CUB" / "classes.txt").read_text().splitlines() if line.strip()
    ]


def cub_color(class_id: int, image_index: int) -> tuple[int, int, int]:
    return (class_id, 20 + 25 * image_index, 200)


def make_cub_tgz(
    path: Path, class_ids: list[int], images_per_class: int = 6, size=(48, 32)
) -> dict[str, tuple]:
    """``CUB_200_2011.tgz`` with the given 1-based class ids. Images are wider than tall with black side
    strips; the centre square of image k of class c has colour ``cub_color(c, k)``.

    Returns ``{"<folder>/<file>": colour}``.
    """
    names = cub_class_names()
    colors: dict[str, tuple] = {}
    images_txt, labels_txt, split_txt, boxes_txt = [], [], [], []
    image_id = 0
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "attributes.txt", b"1 has_bill_shape::curved_(up_or_down)\n")
        _add_dir(tar, "CUB_200_2011")
        _add_dir(tar, "CUB_200_2011/images")
        for class_id in class_ids:
            folder = names[class_id - 1]
            _add_dir(tar, f"CUB_200_2011/images/{folder}")
            bird = folder.split(".", 1)[1]
            # Files listed in reverse order inside the tar: the code must sort, not trust tar order.
            for k in reversed(range(images_per_class)):
                file = f"{bird}_{k + 1:04d}_{class_id * 1000 + k}.jpg"
                relative = f"{folder}/{file}"
                colors[relative] = cub_color(class_id, k)
                _add(
                    tar,
                    f"CUB_200_2011/images/{relative}",
                    jpeg(colors[relative], size, border=(size[0] - size[1]) // 2),
                )
        for relative in sorted(colors):
            image_id += 1
            class_id = int(relative[:3])
            images_txt.append(f"{image_id} {relative}")
            labels_txt.append(f"{image_id} {class_id}")
            split_txt.append(f"{image_id} {image_id % 2}")
            boxes_txt.append(f"{image_id} 1.0 1.0 20.0 20.0")
        classes_txt = [f"{c} {names[c - 1]}" for c in class_ids]
        for name, lines in (
            ("classes.txt", classes_txt),
            ("images.txt", images_txt),
            ("image_class_labels.txt", labels_txt),
            ("train_test_split.txt", split_txt),
            ("bounding_boxes.txt", boxes_txt),
        ):
            _add(tar, f"CUB_200_2011/{name}", ("\n".join(lines) + "\n").encode())
        _add(tar, "CUB_200_2011/README", b"CUB-200-2011 fixture\n")
    return colors


# ------------------------------------------------------------------------------------------ mini-ImageNet


@functools.lru_cache(maxsize=3)
def ravi_rows(split: str) -> list[tuple[str, str]]:
    with open(SPLITS / "miniImageNet" / "ravi" / f"{split}.csv") as handle:
        return [(row[0], row[1]) for row in list(csv.reader(handle))[1:]]


def ilsvrc_color(class_number: int, file_number: int) -> tuple[int, int, int]:
    """Colour of ``<wnid>_<file_number>.JPEG``; distinct by at least 12 levels per file of a class."""
    return (12 * (file_number % 20) + 4, 30 * class_number + 10, 12 * (file_number // 20) + 4)


def make_ilsvrc_train_tar(path: Path, classes: dict[str, list[int]], size=(40, 30)) -> dict[str, tuple]:
    """``ILSVRC2012_img_train.tar``: a tar of ``<wnid>.tar``, each holding ``<wnid>_<N>.JPEG`` for the given
    numbers N (stored in a shuffled order). Returns ``{"<wnid>_<N>.JPEG": colour}``."""
    colors: dict[str, tuple] = {}
    shuffle = random.Random(0)
    with tarfile.open(path, "w") as outer:
        for class_number, (wnid, numbers) in enumerate(classes.items()):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                order = list(numbers)
                shuffle.shuffle(order)
                for number in order:
                    name = f"{wnid}_{number}.JPEG"
                    colors[name] = ilsvrc_color(class_number, number)
                    _add(inner, name, jpeg(colors[name], size))
            _add(outer, f"{wnid}.tar", inner_bytes.getvalue())
    return colors


def ravi_color(row: int) -> tuple[int, int, int]:
    return (10 + 15 * (row % 16), 10 + 15 * (row // 16 % 16), 90)


def make_ravi_zip(path: Path, names: list[str], size: int = 84) -> dict[str, tuple]:
    """Ravi's ``images.zip``: ``images/<name>`` 84x84 JPEGs. Returns ``{name: colour}``."""
    colors = {}
    with zipfile.ZipFile(path, "w") as archive:
        for row, name in enumerate(names):
            colors[name] = ravi_color(row)
            archive.writestr(f"images/{name}", jpeg(colors[name], (size, size)))
    return colors


# ---------------------------------------------------------------------------------------- tiered-ImageNet


def tiered_classes(split: str) -> list[tuple[str, str, str, str]]:
    """``(synset, category_synset, words, category_words)`` of the split's classes, CSV order."""
    with open(SPLITS / "tieredImageNet" / "classes.csv") as handle:
        words = {row["synset"]: row for row in csv.DictReader(handle)}
    with open(SPLITS / "tieredImageNet" / f"{split}.csv") as handle:
        rows = [row for row in csv.reader(handle) if row]
    return [(s, c, words[s]["wordnet_words"], words[s]["category_words"]) for s, c in rows]


def tiered_pixels(split_number: int, index: int, class_number: int, size: int) -> np.ndarray:
    """Image ``index`` of a split: R,G = the index, B = split and class."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 0] = index // 256
    pixels[..., 1] = index % 256
    pixels[..., 2] = 16 * split_number + class_number
    return pixels


def make_tiered_tar(
    path: Path,
    classes: dict[str, list[str]],
    images_per_class: int = 5,
    size: int = 84,
    bytes_keys: bool = False,
    extra_class: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """``tiered-imagenet.tar`` holding ``tiered-imagenet/{split}_images_png.pkl`` and ``{split}_labels.pkl``.

    ``classes``: split -> class synsets (real ones). As in the real files: classes and categories are named
    by WordNet words, categories cut to 46 characters, images are uint8 arrays of PNG bytes (the val split
    uses plain ``bytes``), labels interleave the classes. ``bytes_keys``: dict keys and strings as bytes,
    as a Python-2 pickle read with ``encoding="bytes"`` gives them. ``extra_class``: split -> a words string
    added to that split's labels (to test rejection).

    Returns split -> the synset of every image, in pickle order.
    """
    image_classes: dict[str, list[str]] = {}
    with tarfile.open(path, "w") as tar:
        _add_dir(tar, "tiered-imagenet")
        for split_number, split in enumerate(("train", "val", "test")):
            info = {s: (c, w, cw) for s, c, w, cw in tiered_classes(split)}
            chosen = classes.get(split, [])
            # The pickle's own class order differs from the CSV order: reversed.
            specific_str = [info[s][1] for s in reversed(chosen)]
            general_words = sorted({info[s][2][:46] for s in chosen})
            if extra_class and split in extra_class:
                specific_str.append(extra_class[split])
            label_specific, label_general, images, order = [], [], [], []
            for _ in range(images_per_class):
                for class_number, synset in enumerate(chosen):
                    index = len(images)
                    label_specific.append(specific_str.index(info[synset][1]))
                    label_general.append(general_words.index(info[synset][2][:46]))
                    data = png(tiered_pixels(split_number, index, class_number, size))
                    images.append(data if split == "val" else np.frombuffer(data, dtype=np.uint8))
                    order.append(synset)
            image_classes[split] = order

            def key(text: str):
                return text.encode() if bytes_keys else text

            labels = {
                key("label_specific"): np.array(label_specific, dtype=np.int64),
                key("label_general"): np.array(label_general, dtype=np.int64),
                key("label_specific_str"): [key(s) for s in specific_str],
                key("label_general_str"): [key(s) for s in general_words],
            }
            _add(tar, f"tiered-imagenet/{split}_images_png.pkl", pickle.dumps(images, protocol=2))
            _add(tar, f"tiered-imagenet/{split}_labels.pkl", pickle.dumps(labels, protocol=2))
    return image_classes

"""The dataset registry: every fact the workflow, `negmargin prepare` and the tables need about a dataset.

Adding a dataset is one module that prepares it (``negmargin/data/<name>.py``, a function
``prepare_<name>(out, source, options) -> summary`` that writes the four splits with
``negmargin.data.benchmark.write_benchmark`` or ``SplitWriter``) and one entry in :data:`DATASETS`.
docs/datasets.md ("Adding a dataset") walks through it.

Standard library only: the Snakemake process reads the registry to validate a configuration before any job runs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

from negmargin.settings import Settings, setting

SPLITS = ("base", "base_holdout", "val", "novel")
OMNIGLOT_CLASSES = {"base": 1028, "val": 172, "novel": 423}  # Vinyals et al.'s split
OMNIGLOT_DRAWERS = 20  # drawings of each character
EPISODE_SPLITS = ("val", "novel")  # validation and meta-test episodes are drawn from these


@dataclass(frozen=True)
class OmniglotOptions(Settings):
    """Preparation of the embedded Omniglot archive."""

    image_size: int = setting(28, "stored side length in pixels", minimum=8, section="options")
    base_holdout: int = setting(4, "drawings per base class held out of training, for base accuracy",
                                minimum=0, maximum=OMNIGLOT_DRAWERS - 1,
                                section="options")
    rotations: tuple[int, ...] = setting((0,), "rotation-augmented classes, e.g. 0 90 180 270; 0 alone: none",
                                         choices=(0, 90, 180, 270), min_items=1, section="options")
    seed: int = setting(0, "seed of the held-out drawing choice", minimum=0, section="options")
    max_classes: int | None = setting(None, "keep only the first N characters of each split (tiny runs); "
                                      "null: all", minimum=1, section="options")


@dataclass(frozen=True)
class BenchmarkOptions(Settings):
    """Preparation of a paper benchmark (CUB, mini-ImageNet, tiered-ImageNet)."""

    image_size: int | None = setting(None, "stored side length in pixels; null: the dataset's default "
                                     "(docs/datasets.md)", minimum=8, section="options")
    base_holdout: int | None = setting(None, "held-out base images per class, for base accuracy; null: the "
                                       "dataset's default (docs/datasets.md)", minimum=1, section="options")
    seed: int = setting(0, "seed of the held-out image choice", minimum=0, section="options")
    workers: int | None = setting(None, "decoding threads; null: min(8, CPUs)", minimum=1, section="options")
    fixture: bool = setting(False, "accept a subset of the real classes and skip the full-size checks and "
                            "default checksums (tests and tiny fixture archives)", section="options")


@dataclass(frozen=True)
class Archive:
    """The official download of a dataset: where it lives and how to verify it."""

    url: str | None = None
    mirrors: tuple[str, ...] = ()
    md5: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # key under `datasets:`, folder under data/ and results/; `negmargin prepare <name with ->`
    title: str
    classes: Mapping[str, int]  # classes of base, val and novel in the published split
    images_per_class: int | None  # fewest images of a val/novel class; None: known only after preparation
    pipeline: str  # input pipeline of negmargin.data.transforms: 'omniglot' or 'imagenet84'
    prepare: str  # "module:function" that prepares it (imported only when it runs)
    options: type  # dataclass of its preparation options (config: datasets.<name>.prepare.options)
    fetch: bool = True  # takes the download and checksum options (md5, sha256, size, mirrors, ...)
    archive: Archive = field(default_factory=Archive)  # the official archive, when there is one
    default_source: str | None = None  # a source to use when the config's is null (besides archive.url)
    how_to_get: str = ""  # what to do when no source is configured and there is no default
    references: str = ""  # where published numbers for this dataset live
    # classes of an episode split as prepared with `options`; None: unknown before preparation
    split_classes: Callable[[Any, str], int | None] | None = None

    @property
    def command(self) -> str:
        """The `negmargin prepare` sub-command."""
        return self.name.replace("_", "-")

    def load_prepare(self) -> Callable[..., dict]:
        module, _, function = self.prepare.partition(":")
        return getattr(importlib.import_module(module), function)

    def classes_of(self, split: str, options: Any) -> int | None:
        if self.split_classes is not None:
            return self.split_classes(options, split)
        return None if getattr(options, "fixture", False) else self.classes[split]

    def fewest_images(self, options: Any) -> int | None:
        return None if getattr(options, "fixture", False) else self.images_per_class


def _omniglot_classes(options: OmniglotOptions, split: str) -> int:
    classes = OMNIGLOT_CLASSES[split]
    if options.max_classes is not None:
        classes = min(classes, options.max_classes)
    return classes * len(options.rotations)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="omniglot",
            title="Omniglot, embedded (1623 characters x 20 drawings; Vinyals split 1028/172/423)",
            classes=OMNIGLOT_CLASSES,
            images_per_class=OMNIGLOT_DRAWERS,
            pipeline="omniglot",
            prepare="negmargin.data.omniglot:prepare_omniglot",
            options=OmniglotOptions,
            fetch=False,
            default_source="resources/omniglot/omniglot_105.npz",
            references="none: no published Negative-Margin numbers exist for Omniglot",
            split_classes=_omniglot_classes,
        ),
        DatasetSpec(
            name="cub",
            title="CUB-200-2011 (class split 100/50/50 by the sorted-index rule)",
            classes={"base": 100, "val": 50, "novel": 50},
            images_per_class=None,
            pipeline="imagenet84",
            prepare="negmargin.data.cub:prepare_cub",
            options=BenchmarkOptions,
            archive=Archive(
                url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                mirrors=("http://www.vision.caltech.edu/visipedia-data/CUB-200-2011/CUB_200_2011.tgz",),
                md5="97eceeb196236b17998738112f37df78",  # stated by torchmeta and avalanche
                size=1_150_585_339,
            ),
            references="config/paper.yaml, datasets.cub.references (mmfewshot's README)",
        ),
        DatasetSpec(
            name="mini_imagenet",
            title="mini-ImageNet (Ravi split 64/16/20 x 600), from ILSVRC-2012 or Ravi's images.zip",
            classes={"base": 64, "val": 16, "novel": 20},
            images_per_class=600,
            pipeline="imagenet84",
            prepare="negmargin.data.mini_imagenet:prepare_mini_imagenet",
            options=BenchmarkOptions,
            how_to_get="ImageNet needs an account; see `negmargin prepare mini-imagenet --help` and "
            "docs/datasets.md",
            references="config/paper.yaml, datasets.mini_imagenet.references (mmfewshot's README)",
        ),
        DatasetSpec(
            name="tiered_imagenet",
            title="tiered-ImageNet (Ren et al. split 351/97/160 classes in 20/6/8 categories)",
            classes={"base": 351, "val": 97, "novel": 160},
            images_per_class=None,
            pipeline="imagenet84",
            prepare="negmargin.data.tiered_imagenet:prepare_tiered_imagenet",
            options=BenchmarkOptions,
            archive=Archive(md5="e07e811b9f29362d159a9edd0d838c62"),  # stated by torchmeta
            how_to_get="download tiered-imagenet.tar (Google Drive id 1g1aIDy2Ar_MViF2gDXFYDBTR-HYecV07, from "
            "renmengye/few-shot-ssl-public, 12.9 GB) and set its path or URL",
            references="config/paper.yaml, datasets.tiered_imagenet.references (mmfewshot's README)",
        ),
    )
}


def dataset(name: str) -> DatasetSpec:
    from negmargin.errors import UserError

    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def prepare(name: str, source: Any, out: Any, **values: Any) -> dict:
    """Prepare dataset ``name`` from ``source`` (None: the registry's default) into ``out``, as `negmargin
    prepare` does, from plain values: each keyword is a setting of :class:`negmargin.options.SourceConfig`
    or of the dataset's options (unknown ones are an error). Returns the preparation summary (prepared.json)."""
    from negmargin.errors import UserError
    from negmargin.options import SourceConfig

    spec = dataset(name)
    source_keys = {item.name for item in dataclass_fields(SourceConfig)}
    option_keys = {item.name for item in dataclass_fields(spec.options)}
    values = {key: os.fspath(v) if isinstance(v, os.PathLike) else v for key, v in values.items()}
    unknown = sorted(set(values) - source_keys - option_keys)
    if unknown:
        raise UserError(f"prepare {name}: unknown setting(s) {', '.join(unknown)}")
    source_config = SourceConfig.from_mapping({k: v for k, v in values.items() if k in source_keys},
                                              source=None if source is None else os.fspath(source))
    options = spec.options.from_mapping({k: v for k, v in values.items() if k in option_keys})
    from negmargin.data.staging import prepare_replacing

    return prepare_replacing(spec.load_prepare(), out, source_config, options)

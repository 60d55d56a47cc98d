"""The declared settings as the docs show them: docs/workflow.md's tables of config keys are generated here.

    python -m negmargin.pipeline.docs docs/workflow.md     # rewrite the tables between the markers

tests/test_settings.py checks that the committed page equals what this generates, so a changed default,
bound or help text shows up there first.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from negmargin import settings
from negmargin.datasets import DATASETS, BenchmarkOptions, OmniglotOptions
from negmargin.options import (
    ComputeConfig,
    EpisodeConfig,
    FeatureConfig,
    FinetuneConfig,
    SelectConfig,
    SourceConfig,
    TrainConfig,
    TsneConfig,
    WorkflowConfig,
)

START, END = "<!-- settings:start -->", "<!-- settings:end -->"

# (heading, [(class, section, key prefix)]) in the order the page shows them.
TABLES = (
    ("Top-level switches", [(SelectConfig, "top", ""), (WorkflowConfig, "top", "")]),
    ("`metatest`: the episodes (`negmargin metatest`)", [(EpisodeConfig, "metatest", "metatest.")]),
    ("`metatest.finetune`: the per-episode head", [(FinetuneConfig, "finetune", "metatest.finetune.")]),
    ("`compute`: devices", [(TrainConfig, "compute", "compute."), (ComputeConfig, "compute", "compute.")]),
    ("`features` and `tsne`", [(FeatureConfig, "features", "features."), (TsneConfig, "tsne", "tsne.")]),
    ("`datasets.<name>.train.<arch>`: training (`negmargin train`)",
     [(TrainConfig, "train", "train.<arch>.")]),
    ("`datasets.<name>.prepare`: raw data and its checks (`negmargin prepare <name>`; "
     + ", ".join(f"`{name}`" for name, spec in DATASETS.items() if not spec.fetch) + " takes `source` only)",
     [(SourceConfig, "prepare", "prepare.")]),
    ("`datasets.omniglot.prepare.options`", [(OmniglotOptions, "options", "prepare.options.")]),
    ("`datasets.<cub | mini_imagenet | tiered_imagenet>.prepare.options`",
     [(BenchmarkOptions, "options", "prepare.options.")]),
)


def config_reference() -> str:
    """The generated markdown: one table per block of declared settings."""
    lines = []
    for heading, parts in TABLES:
        lines += [f"#### {heading}", "", *settings.DOCS_HEADER]
        for cls, section, prefix in parts:
            lines += list(settings.docs_rows(cls, section, prefix))
        lines.append("")
    return "\n".join(lines)


def rewrite(page: str) -> str:
    """``page`` with the text between the markers replaced by :func:`config_reference`."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(page):
        raise ValueError(f"no {START} ... {END} block in the page")
    return pattern.sub(lambda _: f"{START}\n{config_reference()}{END}", page)


def main(argv: list[str]) -> int:
    for name in argv or ["docs/workflow.md"]:
        path = Path(name)
        path.write_text(rewrite(path.read_text()))
        print(f"rewrote the settings tables of {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

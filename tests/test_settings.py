"""One declaration per setting: the command line and the config accept and reject the same values, and
everything shown to users (help, schema defaults, docs tables) comes from the declaration."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml

from negmargin import settings
from negmargin.cli import build_parser
from negmargin.datasets import DATASETS, BenchmarkOptions, OmniglotOptions
from negmargin.errors import UserError
from negmargin.options import (
    EpisodeConfig,
    FeatureConfig,
    FinetuneConfig,
    SelectConfig,
    SourceConfig,
    TrainConfig,
    TsneConfig,
)
from negmargin.pipeline import config as pipeline_config
from negmargin.pipeline import docs

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PARSER = build_parser()

# Where each declared config block lives in the config, and which verb (with its other required words) parses it.
BLOCKS = [
    (TrainConfig, "train", ("datasets", "omniglot", "train", "conv4"), ["train", "--data", "d", "--out", "o"]),
    (TrainConfig, "compute", ("compute",), ["train", "--data", "d", "--out", "o"]),
    (EpisodeConfig, "metatest", ("metatest",), ["metatest", "--features", "f.npz", "--out", "o.json"]),
    (FinetuneConfig, "finetune", ("metatest", "finetune"), ["metatest", "--features", "f.npz", "--out", "o.json"]),
    (SelectConfig, "top", (), ["select", "--train-dir", "t", "--shot", "1", "--out", "o.json"]),
    (FeatureConfig, "features", ("features",), ["features", "--checkpoint", "c.pt", "--split", "s", "--out", "o"]),
    (TsneConfig, "tsne", ("tsne",), ["plot-tsne", "--features=0=a.npz", "--out-dir", "o"]),
    (SourceConfig, "prepare", ("datasets", "cub", "prepare"), ["prepare", "cub", "--out", "o"]),
    (OmniglotOptions, "options", ("datasets", "omniglot", "prepare", "options"), ["prepare", "omniglot", "--out", "o"]),
    (BenchmarkOptions, "options", ("datasets", "cub", "prepare", "options"), ["prepare", "cub", "--out", "o"]),
]


def _candidates(declared: settings.Field) -> list:
    """Values around every bound and choice of a setting, valid and not."""
    spec = declared.spec
    if declared.kind is bool:
        items = [True, False]
    elif spec.choices is not None:
        items = [*spec.choices, "bogus" if declared.kind is str else 7]
    elif declared.kind is str:
        items = ["auto", "cpu", "cuda:1", "cuda:x", "0" * 32, "a" * 64, "f" * 31, "data/raw", "ABC"]
    else:
        bounds = [b for b in (spec.minimum, spec.exclusive_minimum, spec.maximum) if b is not None]
        items = [-1, 0, 1, 2, 0.5, 1e9, -0.5]
        for bound in bounds:
            items += [bound - 1, bound, bound + 1, bound - 0.25, bound + 0.25]
        if declared.kind is int:
            items = [v for v in items if isinstance(v, int) or not float(v).is_integer()]
        items = sorted({v for v in items if math.isfinite(v)}, key=float)
    if declared.optional:
        items.append(None)
    if declared.is_list:
        return [[], items[:1], items[:2], items[-2:]] + [[v] for v in items[1:] if v is not None]
    return items


def _cli_accepts(verb: list[str], declared: settings.Field, value) -> bool:
    if declared.kind is bool:
        words = [declared.flag if value else "--no-" + declared.flag[2:]]
    elif declared.is_list:
        words = [declared.flag, *map(str, value)]
    else:
        words = [declared.flag, "null" if value is None else str(value)]
    try:
        PARSER.parse_args([*verb, *words])
    except SystemExit:
        return False
    return True


@pytest.fixture(scope="module")
def base_config() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    config["datasets"]["cub"] = paper["datasets"]["cub"]
    return config


def _config_accepts(config: dict, where: tuple, name: str, value) -> bool:
    config = copy.deepcopy(config)
    block = config
    for key in where:
        block = block[key]
    block[name] = value
    key = ".".join([*where, name])
    try:
        pipeline_config.validate(config, SCHEMA)
    except pipeline_config.ConfigError as error:
        return not any(line.startswith(key) for line in error.problems)
    return True


@pytest.mark.parametrize(("cls", "section", "where", "verb"), BLOCKS,
                         ids=[f"{c.__name__}-{s}" for c, s, _, _ in BLOCKS])
def test_cli_and_config_accept_and_reject_the_same_values(base_config, cls, section, where, verb):
    checked = 0
    for declared in settings.fields(cls, section, cli=True):
        for value in _candidates(declared):
            cli = _cli_accepts(verb, declared, value)
            conf = _config_accepts(base_config, where, declared.name, value)
            assert cli == conf, f"{declared.name}={value!r}: command line {'accepts' if cli else 'rejects'}, " \
                                f"config {'accepts' if conf else 'rejects'}"
            # and both agree with the declaration's own check (what the dataclass does when built)
            assert conf == (settings.problem(declared, value) is None), (declared.name, value)
            checked += 1
    assert checked >= 2


def test_a_value_training_rejects_is_rejected_when_the_workflow_starts(base_config):
    config = copy.deepcopy(base_config)
    config["datasets"]["omniglot"]["train"]["conv4"]["warmup_ratio"] = 0
    with pytest.raises(pipeline_config.ConfigError) as error:
        pipeline_config.validate(config, SCHEMA)
    assert error.value.problems == ["datasets.omniglot.train.conv4.warmup_ratio: 0 is less than or equal to the "
                                    "minimum of 0"]
    with pytest.raises(UserError, match="warmup_ratio must be > 0 and <= 1, got 0"):
        TrainConfig(warmup_ratio=0)


def test_defaults_of_schema_cli_and_dataclass_are_one():
    schema = pipeline_config.load_schema(SCHEMA)
    train = schema["$defs"]["train"]["properties"]
    parser_defaults = vars(build_parser().parse_args(["train", "--data", "d", "--out", "o"]))
    for declared in settings.fields(TrainConfig):
        default = list(declared.default) if isinstance(declared.default, tuple) else declared.default
        assert parser_defaults[declared.dest] == default, declared.name
        if declared.spec.section == "train":
            assert train[declared.name]["default"] == default, declared.name
            assert train[declared.name]["description"] == declared.spec.help


def test_help_shows_declared_help_and_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["metatest", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--finetune-batch-size FINETUNE_BATCH_SIZE support features per fine-tuning step (default: 4)" in text
    assert "%%" not in text


def test_every_dataset_has_its_own_prepare_block():
    schema = pipeline_config.load_schema(SCHEMA)
    for name, spec in DATASETS.items():
        prepare = schema["$defs"][f"dataset_{name}"]["properties"]["prepare"]["properties"]
        assert set(prepare["options"]["properties"]) == {f.name for f in settings.fields(spec.options)}
        assert ("md5" in prepare) == spec.fetch


def test_docs_tables_are_generated_from_the_declarations():
    page = (REPO / "docs" / "workflow.md").read_text()
    assert docs.rewrite(page) == page, "run: python -m negmargin.pipeline.docs docs/workflow.md"
    for declared in settings.fields(TrainConfig, "train"):
        assert f"| `train.<arch>.{declared.name}` |" in page


def test_cli_flags_round_trip_through_the_parser():
    values = {"epochs": 7, "lr_steps": [3, 5], "num_classes": None, "metric": "softmax", "warmup_ratio": 0.5}
    words = settings.cli_flags(TrainConfig, values, "train").split()
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", *words])
    parsed = settings.from_namespace(TrainConfig, args)
    assert (parsed.epochs, parsed.lr_steps, parsed.num_classes, parsed.metric, parsed.warmup_ratio) == (
        7, (3, 5), None, "softmax", 0.5)
    assert "--num-classes" not in words  # null: the verb's default

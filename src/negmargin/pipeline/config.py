"""The workflow's configuration: its JSON schema, assembled from the declarations, and its validation.

``workflow/schemas/config.schema.yaml`` holds the structure (which blocks exist, the grid, resources); every
block of declared settings (``train``, ``compute``, ``metatest``, ``finetune``, ``features``, ``tsne``, the
top-level switches and each dataset's ``prepare``) is filled in from negmargin.options and negmargin.datasets
by :func:`load_schema`, so a bound or default is written once. :func:`validate` checks a config against it,
one line per problem naming the key, fills in the defaults, and then runs the checks a schema cannot
express (ways against the classes a split will have, references against the grid, ...).

Standard library, PyYAML and jsonschema only: this runs in the Snakemake process before any job.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from negmargin import settings
from negmargin.datasets import DATASETS, EPISODE_SPLITS, DatasetSpec
from negmargin.options import (
    ARCHS,
    MODEL_PATTERN,
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

_FETCH_ONLY = ("md5", "sha256", "size", "mirrors", "skip_bad_images", "retries", "timeout")


def _without_docs(schema: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in schema.items() if key not in ("description", "default")}


def _merge(*objects: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(objects[0])
    for other in objects[1:]:
        merged["properties"].update(copy.deepcopy(other["properties"]))
    return merged


def prepare_schema(spec: DatasetSpec) -> dict[str, Any]:
    """``datasets.<name>.prepare`` of one dataset: its source options and its own ``options`` block."""
    schema = settings.json_schema(SourceConfig, "prepare")
    if not spec.fetch:
        for name in _FETCH_ONLY:
            schema["properties"].pop(name)
    schema["properties"]["options"] = {
        **settings.json_schema(spec.options, "options"),
        "description": f"options of `negmargin prepare {spec.command}` (docs/workflow.md)",
    }
    return schema


def grid_schema(declared: settings.Field, description: str, default: list) -> dict[str, Any]:
    """A config list of values of one declared setting: one job per entry."""
    return {"description": description, "type": "array", "items": _without_docs(settings.field_schema(declared)),
            "minItems": 1, "uniqueItems": True, "default": default}


GRIDS = {  # metatest.<key>: (class, field, description, default)
    "ways": (EpisodeConfig, "ways", "classes per episode; one meta-test per entry. The first is also the "
             "validation's (`--val-ways`).", [5]),
    "shots": (EpisodeConfig, "shots", "support images per class; one meta-test per entry. The first is the "
              "validation shot under selection_mode `shared`.", [1, 5]),
    "checkpoints": (SelectConfig, "pick", "which checkpoints of each run are meta-tested and analysed: `best` "
                    "(best validation accuracy, the paper's rule) and/or `final` (the last epoch's).", ["best"]),
}


def declared_definitions() -> dict[str, Any]:
    """The ``$defs`` that come from the declarations."""
    metatest = settings.json_schema(EpisodeConfig, "metatest")
    for key, (cls, name, description, default) in GRIDS.items():
        metatest["properties"][key] = grid_schema(settings.field_of(cls, name), description, default)
    metatest["properties"]["finetune"] = {"$ref": "#/$defs/finetune", "default": {}}
    return {
        "backbone": {"enum": list(ARCHS)},
        "arch": {"type": "string", "pattern": f"^(?:{MODEL_PATTERN})$",
                 "description": f"a backbone ({', '.join(ARCHS)}), optionally with -<variant> (e.g. conv4-softmax)"},
        "margin": _without_docs(settings.field_schema(settings.field_of(TrainConfig, "margin"))),
        "train": settings.json_schema(TrainConfig, "train"),
        "compute": _merge(settings.json_schema(TrainConfig, "compute"), settings.json_schema(ComputeConfig)),
        "metatest": metatest,
        "finetune": settings.json_schema(FinetuneConfig, "finetune"),
        "features": settings.json_schema(FeatureConfig, "features"),
        "tsne": settings.json_schema(TsneConfig, "tsne"),
    }


def load_schema(path: str | Path) -> dict[str, Any]:
    """The structure in ``path`` with every declared block filled in (a fresh copy each call)."""
    return copy.deepcopy(_load_schema(str(Path(path).resolve())))


@functools.lru_cache(maxsize=4)
def _load_schema(path: str) -> dict[str, Any]:
    import yaml

    schema = yaml.safe_load(Path(path).read_text())
    definitions = schema.setdefault("$defs", {})
    definitions.update(declared_definitions())
    for cls in (SelectConfig, WorkflowConfig):
        schema["properties"].update(settings.json_schema(cls, "top")["properties"])
    generic = definitions.pop("dataset")
    datasets = schema["properties"]["datasets"]
    datasets["additionalProperties"] = False
    datasets["properties"] = {}
    for name, spec in DATASETS.items():
        entry = copy.deepcopy(generic)
        entry["properties"]["prepare"] = {**prepare_schema(spec), "default": {}}
        definitions[f"dataset_{name}"] = entry
        datasets["properties"][name] = {"$ref": f"#/$defs/dataset_{name}"}
    return schema


# ------------------------------------------------------------------------------------------------ validation


def config_key(path) -> str:
    """['datasets', 'omniglot', 'margins', 1] -> 'datasets.omniglot.margins[1]'."""
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "(top level)"


def schema_problem(error) -> str:
    """One line for a schema violation: the key, the value, what is allowed. Of the alternatives of a
    oneOf/anyOf the deepest failure is the telling one ("'0.2' is not of type 'number'", not "not valid
    under any of the given schemas")."""
    while error.context:
        deepest = max(len(e.absolute_path) for e in error.context)
        candidates = [e for e in error.context if len(e.absolute_path) == deepest]
        # Of equally deep alternatives, the one that is not about null says what is wanted.
        error = next((e for e in candidates if e.validator_value != "null"), candidates[0])
    message = error.message
    if error.validator == "type" and isinstance(error.instance, str):
        expected = error.validator_value
        expected = [expected] if isinstance(expected, str) else list(expected)
        if {"number", "integer"} & set(expected):
            message += " (write the number without quotes)"
    elif error.validator == "pattern" and error.schema.get("description"):
        message = f"{error.instance!r}: expected {error.schema['description']}"
    elif error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        if allowed:
            message += f"; allowed: {', '.join(allowed)}"
    return f"{config_key(error.absolute_path)}: {message}"


def _defaulting_validator(schema: dict[str, Any]):
    """A Draft 2020-12 validator that also writes each missing property's ``default`` into the instance
    (the behaviour of Snakemake's ``validate``), before it checks that property."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def properties(validator, props, instance, schema_):
        if isinstance(instance, dict):
            for name, subschema in props.items():
                if name not in instance and isinstance(subschema, dict) and "default" in subschema:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from check_properties(validator, props, instance, schema_)

    return jsonschema.validators.extend(base, {"properties": properties})(schema)


class ConfigError(ValueError):
    """An invalid configuration: one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


def validate(config: dict[str, Any], schema_path: str | Path, workdir: str | Path = ".") -> None:
    """Check ``config`` and fill in its defaults, in place; ConfigError lists every problem."""
    schema = load_schema(schema_path)
    # Defaults are filled on a copy first, so that the messages describe the config as written.
    problems = sorted({schema_problem(e) for e in _defaulting_validator(schema).iter_errors(copy.deepcopy(config))})
    if problems:
        raise ConfigError(problems)
    _defaulting_validator(schema).validate(config)
    problems = list(cross_checks(config, Path(workdir)))
    if problems:
        raise ConfigError(problems)


def notices(config: dict[str, Any]) -> Iterator[str]:
    """What a user should know before the run starts, though nothing is wrong yet."""
    for name in config["run_datasets"]:
        spec = DATASETS[name]
        if config["datasets"][name]["prepare"]["source"] is None and not (spec.archive.url or spec.default_source):
            yield (f"negmargin workflow: datasets.{name}.prepare.source is not set and {name} has no default "
                   f"source; its prepare job will stop and say what to download ({spec.how_to_get})")


# --------------------------------------------------------------------------------------------- cross-checks


def margins(config: dict[str, Any], dataset: str, arch: str) -> list[float]:
    grid = config["datasets"][dataset]["margins"]
    return [float(m) for m in (grid[arch] if isinstance(grid, dict) else grid)]


def shots(config: dict[str, Any]) -> list[int]:
    return [int(s) for s in config["metatest"]["shots"]]


def ways(config: dict[str, Any]) -> list[int]:
    return [int(w) for w in config["metatest"]["ways"]]


def validation_shots(config: dict[str, Any]) -> list[int]:
    """The shots training validates on: the first meta-test shot under `shared`, every shot under `per-shot`."""
    return shots(config)[:1] if config["selection_mode"] == "shared" else shots(config)


def prepare_options(config: dict[str, Any], dataset: str) -> Any:
    spec = DATASETS[dataset]
    return spec.options.from_mapping(config["datasets"][dataset]["prepare"]["options"])


def split_facts(config: dict[str, Any], dataset: str, split: str, workdir: Path
                ) -> tuple[int | None, str, int | None, str]:
    """(classes, why, fewest images per class, why) of a split as the configuration will prepare it; None
    where that is not known before preparation (then data/<dataset>/<split>/meta.json is read if it exists).
    ``why`` says where a number comes from, when not obvious."""
    spec = DATASETS[dataset]
    options = prepare_options(config, dataset)
    classes, per_class = spec.classes_of(split, options), spec.fewest_images(options)
    classes_why = per_class_why = ""
    if getattr(options, "max_classes", None) is not None:
        classes_why = f" (prepare.options.max_classes {options.max_classes})"
    meta = workdir / "data" / dataset / split / "meta.json"
    if (classes is None or per_class is None) and meta.is_file():
        try:
            stored = json.loads(meta.read_text())
            if classes is None:
                classes, classes_why = int(stored["num_classes"]), f" ({meta.relative_to(workdir)})"
            if per_class is None:
                per_class = int(stored["images_per_class"]["min"])
                per_class_why = f" (at least, in {meta.relative_to(workdir)})"
        except (ValueError, KeyError, TypeError):
            pass
    return classes, classes_why, per_class, per_class_why


def _episode_problems(config: dict[str, Any], dataset: str, workdir: Path) -> Iterator[str]:
    """Ways against the classes of the val and novel splits; shots + queries against images per class."""
    queries = int(config["metatest"]["queries"])
    for split in EPISODE_SPLITS:
        split_shots = validation_shots(config) if split == "val" else shots(config)
        most_ways = ways(config)[0] if split == "val" else max(ways(config))
        classes, classes_why, per_class, per_class_why = split_facts(config, dataset, split, workdir)
        if classes is not None and most_ways > classes:
            yield (f"metatest.ways {most_ways}: the {split} split of {dataset} has {classes} classes{classes_why}; "
                   f"allowed: 2 to {classes}")
        most = max(split_shots)
        if per_class is not None and most + queries > per_class:
            yield (f"metatest.shots {most} + metatest.queries {queries} = {most + queries} images per class, "
                   f"but the {split} split of {dataset} has {per_class} per class{per_class_why}; "
                   f"allowed: shots + queries <= {per_class}")


def cross_checks(config: dict[str, Any], workdir: Path) -> Iterator[str]:
    """What the schema cannot express; each message names the key to fix."""
    for name in config["run_datasets"]:
        if name not in DATASETS:
            yield f"run_datasets names {name!r}: unknown dataset; allowed: {', '.join(sorted(DATASETS))}"
            continue
        if name not in config["datasets"]:
            yield f"run_datasets names {name!r}, which has no entry under `datasets`"
            continue
        block = config["datasets"][name]
        yield from _episode_problems(config, name, workdir)
        archs = list(block["archs"])
        for arch in archs:
            if arch not in block["train"]:
                yield f"datasets.{name}.train has no block for arch {arch!r}"
        seeds = block["seeds"]
        if isinstance(seeds, dict) and set(archs) - set(seeds):
            yield f"datasets.{name}.seeds lacks archs {sorted(set(archs) - set(seeds))}"
        for key in ("margins", "table_margin"):
            if isinstance(block.get(key), dict):
                missing = set(archs) - set(block[key])
                if missing:
                    yield f"datasets.{name}.{key} lacks archs {sorted(missing)}"
        for key in ("accuracy", "std"):
            for arch, by_shot in block["references"][key].items():
                if arch not in archs:
                    yield f"datasets.{name}.references.{key} names arch {arch!r}, not in archs"
                elif set(map(int, by_shot)) - set(shots(config)):
                    yield f"datasets.{name}.references.{key}.{arch} names shots not in metatest.shots"
        names = [url.rsplit("/", 1)[-1] for model in block["released"]["models"].values() for url in model.values()]
        if len(set(names)) < len(names):
            yield f"datasets.{name}.released.models: two files share a name; each is downloaded under its own"
        table_margin = block["table_margin"]
        for arch in archs:
            chosen = table_margin.get(arch) if isinstance(table_margin, dict) else table_margin
            if chosen is not None and arch in block["train"] and float(chosen) not in margins(config, name, arch):
                yield f"datasets.{name}.table_margin {chosen} is not in the {arch} margin grid"

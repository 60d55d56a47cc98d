"""The workflow's logic without Snakemake: config validation messages and what each rule runs (Plan)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from negmargin.pipeline import config as pipeline_config
from negmargin.pipeline.plan import Plan, margin_label

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def load(*overlays: dict) -> dict:
    """config/config.yaml with overlays merged as Snakemake merges --configfile (mappings by key, lists replace)."""

    def merge(base, over):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for overlay in overlays:
        config = merge(config, overlay)
    return config


def validated(*overlays: dict, workdir: Path = REPO) -> dict:
    config = load(*overlays)
    pipeline_config.validate(config, SCHEMA, workdir)
    return config


def problems(*overlays: dict, workdir: Path = REPO) -> list[str]:
    with pytest.raises(pipeline_config.ConfigError) as error:
        validated(*overlays, workdir=workdir)
    return error.value.problems


def run(**values) -> SimpleNamespace:
    """Wildcards as Snakemake hands them to a rule's functions (attributes and items())."""
    namespace = SimpleNamespace(**values)
    namespace.items = lambda: values.items()
    return namespace


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"run_datasets": ["imagenet1k"]},
         "run_datasets names 'imagenet1k': unknown dataset; allowed: cub, mini_imagenet, omniglot, tiered_imagenet"),
        ({"datasets": {"omniglot": {"archs": ["vgg16"]}}},
         "datasets.omniglot.archs[0]: 'vgg16': expected "
         "a backbone (conv4, resnet12), optionally with -<variant> (e.g. conv4-softmax)"),
        ({"metatest": {"episodes": 0}}, "metatest.episodes: 0 is less than the minimum of 1"),
        ({"metatest": {"ways": [5, 30]}, "datasets": {"omniglot": {"prepare": {"options": {"max_classes": 20}}}}},
         "metatest.ways 30: the novel split of omniglot has 20 classes (prepare.options.max_classes 20); "
         "allowed: 2 to 20"),
        ({"metatest": {"shots": [1, 10], "queries": 15}},
         "metatest.shots 10 + metatest.queries 15 = 25 images per class, but the novel split of omniglot has 20 "
         "per class; allowed: shots + queries <= 20"),
        ({"datasets": {"omniglot": {"margins": [-0.1, "0.2"]}}},
         "datasets.omniglot.margins[1]: '0.2' is not of type 'number' (write the number without quotes)"),
        ({"datasets": {"omniglot": {"prepare": {"skip_bad_images": True}}}},
         "datasets.omniglot.prepare: Additional properties are not allowed ('skip_bad_images' was unexpected); "
         "allowed: options, source"),
        ({"datasets": {"omniglot": {"table_margin": 0.3}}},
         "datasets.omniglot.table_margin 0.3 is not in the conv4 margin grid"),
        ({"datasets": {"imagenet1k": {}}},
         "datasets: Additional properties are not allowed ('imagenet1k' was unexpected); allowed: cub, "
         "mini_imagenet, omniglot, tiered_imagenet"),
    ],
)
def test_invalid_config_gets_one_line_naming_the_key(overlay, message):
    assert message in problems(overlay)


def test_defaults_are_filled_in_from_the_declarations():
    config = validated()
    assert config["metatest"]["finetune"] == {"steps": None, "lr": 0.01, "momentum": 0.9, "dampening": 0.9,
                                              "weight_decay": 0.001, "batch_size": 4, "temperature": 5.0}
    assert config["datasets"]["omniglot"]["prepare"]["options"]["rotations"] == [0]
    assert config["compute"]["gpu_request"] == "gpus" and config["restore_mtimes"] is True


def test_image_counts_of_a_prepared_split_are_read_from_its_meta(tmp_path):
    meta = tmp_path / "data" / "cub" / "novel" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"num_classes": 50, "images_per_class": {"min": 16}}')
    cub = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())["datasets"]["cub"]
    found = problems({"run_datasets": ["cub"], "datasets": {"cub": cub}, "metatest": {"shots": [1, 5]}},
                     workdir=tmp_path)
    assert found == ["metatest.shots 5 + metatest.queries 15 = 20 images per class, but the novel split of cub "
                     "has 16 per class (at least, in data/cub/novel/meta.json); allowed: shots + queries <= 16"]


def test_plan_of_the_default_run():
    plan = Plan(validated())
    runs = list(plan.runs())
    assert len(runs) == 10 and runs[0] == {"dataset": "omniglot", "arch": "conv4", "margin": "-0.5", "seed": 0}
    wildcards = run(dataset="omniglot", arch="conv4", margin="-0.25", seed="0", ckpt="best", ways="5", shot="5")
    flags = plan.train_args(wildcards)
    assert flags.startswith("--arch conv4 --model conv4 --metric cosine")
    assert "--epochs 3 " in flags and "--lr-steps 2 " in flags and "--val-shots 1 " in flags
    assert flags.endswith("--device cpu") and "--amp none" in flags
    assert plan.metatest_args(wildcards).startswith("--queries 15 --episodes 2000 --episodes-seed 0")
    assert plan.novel_features_for(wildcards).endswith("m-0.25/s0/best/features/1shot_novel.npz")
    assert plan.prepare_args(run(dataset="omniglot")) == (
        "omniglot --source resources/omniglot/omniglot_105.npz --image-size 28 --base-holdout 4 --rotations 0 "
        "--seed 0")
    assert plan.table_args(run(dataset="omniglot")) == "--margin=-0.25"
    outputs = plan.final_outputs()
    assert "results/plots/omniglot/conv4/margin_sweep.csv" in outputs and "results/train_logs.csv" in outputs
    assert len(outputs) == 10 * 6 + 3 + 1 + 5  # runs x (train, 2 selections, 2 meta-tests, analysis), reports


@pytest.mark.parametrize("mode", ["shared", "per-shot"])
def test_shots_in_any_order_select_their_checkpoint(mode):
    """metatest.shots [5, 1]: under `shared` the first shot (5) is validated and serves both."""
    plan = Plan(validated({"metatest": {"shots": [5, 1]}, "selection_mode": mode}))
    one = run(dataset="omniglot", arch="conv4", margin="0.0", seed="0", ckpt="best", ways="5", shot="1")
    flags = plan.train_args(one)
    if mode == "shared":
        assert "--val-shots 5 " in flags and plan.selection_shot(1) == 5
        assert plan.novel_features_for(one).endswith("best/features/5shot_novel.npz")
    else:
        assert "--val-shots 5 1 " in flags and plan.selection_shot(1) == 1
        assert plan.novel_features_for(one).endswith("best/features/1shot_novel.npz")


def test_resources_grow_with_the_attempt_up_to_the_cap():
    config = validated({"compute": {"max_runtime": 100}})
    runtime = Plan(config).resources("train")["runtime"]
    assert [runtime(None, attempt) for attempt in (1, 2, 3)] == [60, 100, 100]
    gpu = Plan(validated({"compute": {"gpu": True, "gpu_model": "a100", "gpu_request": "gres"}})).gpu_resources()
    wildcards = run(dataset="omniglot")
    assert (gpu["gpu"](wildcards), gpu["gres"](wildcards)) == (None, "gpu:a100:1")


def test_margin_labels():
    assert [margin_label(m) for m in (-0.01, 0, -0.0, 0.2, 1)] == ["-0.01", "0.0", "0.0", "0.2", "1.0"]
    with pytest.raises(ValueError, match="more than 6 decimals"):
        margin_label(0.1234567)


def test_paper_profile_plan():
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    plan = Plan(validated(paper))
    assert len(list(plan.runs())) == 6
    assert plan.prepare_args(run(dataset="cub")).startswith("cub --no-skip-bad-images")  # registry's source
    assert plan.table_args(run(dataset="tiered_imagenet")).startswith("--margin=conv4=-0.02 --margin=resnet12=-0.01")
    assert copy.deepcopy(plan.config) == plan.config


def test_a_named_config_keeps_its_own_folders():
    study = yaml.safe_load((REPO / "config" / "study.yaml").read_text())
    plan = Plan(validated(study))
    runs = list(plan.runs())
    assert len(runs) == 7 * 3 + 3 * 3
    assert plan.paths.prepared == "data/study/{dataset}/prepared.json"
    assert all(path.startswith("results/study/") for path in plan.final_outputs())
    wildcards = run(dataset="omniglot", arch="conv4-softmax", margin="-6.0", seed="1")
    flags = plan.train_args(wildcards)
    assert "--arch conv4 --model conv4-softmax --metric softmax --temperature 1.0 " in flags
    assert "--epochs 12 " in flags and "--lr-steps 7 10 " in flags
    assert plan.tasks() == [(5, 1), (5, 5), (20, 1), (20, 5)] and plan.checkpoints() == ["best", "final"]

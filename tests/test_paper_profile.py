"""The paper profile end to end on fixtures: config/paper.yaml with its real rules, the three benchmarks
built as tiny archives in their true formats (CUB served over HTTP on 127.0.0.1, Ravi's mini-ImageNet zip
and the tiered-ImageNet pickle tar as local paths), and a tiny budget laid over it. It must render the
three results tables with mmfewshot's published numbers beside ours.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from archives import make_cub_tgz, make_ravi_zip, make_tiered_tar, ravi_rows, tiered_classes
from http_server import FileServer
from workflow_helpers import copy_workflow, read_markdown_tables, snakemake

pytestmark = pytest.mark.slow  # a system test: the real workflow (tests in tiers, pyproject.toml)

PER_CLASS = 8  # 5-shot episodes with 2 queries need 7 images per class


def _ravi_names(split: str, classes: int) -> list[str]:
    by_class: dict[str, list[str]] = {}
    for name, label in ravi_rows(split):
        by_class.setdefault(label, []).append(name)
    return [name for label in list(by_class)[:classes] for name in by_class[label][:PER_CLASS]]


def _budget(sources: dict[str, dict]) -> dict:
    train = {"image_size": 32, "epochs": 1, "lr_steps": [1], "warmup_iters": 1, "val_every": 1,
             "val_episodes": 2, "checkpoint_every": 0}
    datasets = {}
    for name, prepare in sources.items():
        datasets[name] = {
            "prepare": {**prepare, "options": {"fixture": True, "image_size": 36, "base_holdout": 2}},
            "train": {"conv4": dict(train), "resnet12": dict(train)},
        }
    return {
        "metatest": {"episodes": 4, "queries": 2},
        "tsne": {"classes": 3, "per_class": 2},
        "compute": {"device": "cpu", "gpu": False, "num_workers": 0},
        "resources": {family: {"threads": 1, "mem_mb": 1000, "runtime": 10}
                      for family in ("prepare", "train", "select", "features", "metatest", "analyze", "report")},
        "datasets": datasets,
    }


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    raw = root / "archives"
    raw.mkdir()
    cub = raw / "CUB_200_2011.tgz"
    # sorted-index rule: odd ids are base, ids 2, 6, ... val, ids 4, 8, ... novel
    make_cub_tgz(cub, [1, 3, 5, 7, 9, 2, 6, 10, 14, 18, 4, 8, 12, 16, 20], images_per_class=PER_CLASS)
    ravi = raw / "images.zip"
    make_ravi_zip(ravi, [n for split in ("train", "val", "test") for n in _ravi_names(split, 5)], size=84)
    tiered = raw / "tiered-imagenet.tar"
    make_tiered_tar(tiered, {s: [c[0] for c in tiered_classes(s)[:5]] for s in ("train", "val", "test")},
                    images_per_class=PER_CLASS)
    repo = copy_workflow(root / "repo")
    with FileServer() as server:
        body = cub.read_bytes()
        url = server.add("/records/CUB_200_2011.tgz", body)
        sources = {
            "cub": {"source": url, "md5": hashlib.md5(body).hexdigest(), "size": len(body), "mirrors": []},
            "mini_imagenet": {"source": str(ravi), "md5": None, "size": None, "mirrors": []},
            "tiered_imagenet": {"source": str(tiered), "md5": hashlib.md5(tiered.read_bytes()).hexdigest(),
                                "size": None, "mirrors": []},
        }
        (repo / "tiny.yaml").write_text(yaml.safe_dump(_budget(sources)))
        snakemake("--cores", "2", "--configfile", "config/paper.yaml", "tiny.yaml", cwd=repo, timeout=1500)
        cub_requests = server.requests_for("/records/CUB_200_2011.tgz")
    return repo, cub_requests


def test_paper_profile_renders_three_tables(paper_run):
    repo, cub_requests = paper_run
    assert cub_requests, "CUB must come over HTTP"
    metrics = json.loads((repo / "results" / "metrics.json").read_text())
    references = yaml.safe_load((repo / "config" / "paper.yaml").read_text())["datasets"]
    for dataset in ("cub", "mini_imagenet", "tiered_imagenet"):
        table = repo / "results" / "tables" / f"{dataset}.md"
        assert table.exists(), dataset
        rows = read_markdown_tables(table)[0]
        assert {(row["Arch"], row["shot"]) for row in rows} == {(a, s) for a in ("conv4", "resnet12") for s in ("1", "5")}
        published = references[dataset]["references"]["accuracy"]
        for row in rows:
            run = next(r for r in metrics["runs"] if r["dataset"] == dataset and r["arch"] == row["Arch"])
            ours = run["checkpoints"]["best"]["tasks"][f"5way-{row['shot']}shot"]["accuracy_mean"]
            reference = float(published[row["Arch"]][int(row["shot"])])
            assert row["mean Acc"] == f"{ours:.2f}"
            assert float(row["reference"]) == pytest.approx(reference)
            assert float(row["Δ"]) == pytest.approx(ours - reference, abs=0.011)
    # mmfewshot's margins per cell reached the trainings, per backbone on tiered-ImageNet
    margins = {(r["dataset"], r["arch"]): r["margin"] for r in metrics["runs"]}
    assert margins[("cub", "conv4")] == -0.01 and margins[("mini_imagenet", "resnet12")] == -0.005
    assert margins[("tiered_imagenet", "conv4")] == -0.02 and margins[("tiered_imagenet", "resnet12")] == -0.01
    prepared = json.loads((repo / "data" / "cub" / "prepared.json").read_text())
    assert prepared["splits"]["base"]["classes"] == 5

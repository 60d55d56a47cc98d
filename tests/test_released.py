"""mmfewshot's released models checked with our pipeline: `negmargin import-mmfewshot`, the sha256-prefix
download, the head-row order, the released table and curves, and the `released` workflow target.

Checkpoints are built in mmfewshot's layout by tests/mmfewshot_layout.py (written independently of our
backbones), saved as mmcv saves them (``{'meta': ..., 'state_dict': ...}``) and served over HTTP on 127.0.0.1
under released file names whose 8 hex digits are the start of their sha256.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from archives import cub_class_names, make_cub_tgz
from cli_helpers import one_line_error
from http_server import FileServer
from mmfewshot_layout import MMNegMargin, randomize, save_mmcv_checkpoint
from workflow_helpers import copy_workflow, job_counts, read_markdown_tables, snakemake

from negmargin.cli import main
from negmargin.errors import UserError
from negmargin.io import read_json, sha256_file
from negmargin.models.mmfewshot import import_mmfewshot, mmfewshot_base_classes, provenance_path
from negmargin.pipeline import config as pipeline_config
from negmargin.pipeline.plan import Plan
from negmargin.reporting.released import (
    combined_ci95,
    plot_released_log,
    published_curve,
    render_released_table,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
CUB_CONV4 = "neg-margin_cosine_conv4_1xb64_cub_5way-1shot"
CUB_RESNET12 = "neg-margin_cosine_resnet12_1xb64_cub_5way-1shot"
URL_DIR = "/mmfewshot/classification/neg_margin/cub"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def conv4_model() -> MMNegMargin:
    return randomize(MMNegMargin("conv4", 100), seed=21)


def released_name(stem: str, path: Path) -> str:
    """The released file name of ``path``: config name, a time stamp, the first 8 hex digits of its sha256."""
    return f"{stem}_20211120_100620-{sha256_file(path)[:8]}.pth"


def mmcv_log(val_points: list[tuple[int, float, float]]) -> str:
    """An mmcv TextLoggerHook log.json: an environment line, train lines, and `mode: val` lines with
    mmfewshot's accuracy_mean / accuracy_std."""
    lines = [{"env_info": "sys.platform: linux\nGPU 0: Tesla V100-SXM2-32GB", "seed": 0,
              "exp_name": f"{CUB_CONV4}.py"}]
    for epoch, accuracy, std in val_points:
        lines.append({"mode": "train", "epoch": epoch, "iter": 100, "lr": 0.05, "memory": 1200,
                      "data_time": 0.01, "loss": 2.3, "time": 0.08})
        lines.append({"mode": "val", "epoch": epoch, "iter": 146, "lr": 0.05, "accuracy_mean": accuracy,
                      "accuracy_std": std})
    return "".join(json.dumps(line) + "\n" for line in lines)


def run(**values) -> SimpleNamespace:
    namespace = SimpleNamespace(**values)
    namespace.items = lambda: values.items()
    return namespace


# -------------------------------------------------------------------------------------- the command line


def test_cli_import_writes_a_checkpoint_and_its_provenance(conv4_model, tmp_path, capsys):
    built = save_mmcv_checkpoint(tmp_path / "built.pth", conv4_model, {"mmcv_version": "1.3.16"})
    src = tmp_path / released_name(CUB_CONV4, built)
    built.rename(src)
    dst = tmp_path / "out" / "conv4.pt"
    assert main(["import-mmfewshot", str(src), "--arch", "conv4", "--out", str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"{src}: conv4 of cub, head 100x1600, margin -0.01" in out and str(dst) in out
    record = read_json(provenance_path(dst))
    assert record["sha256_prefix_checked"] is True and record["source_file"] == src.name
    assert record["head_class_order"].startswith("mmfewshot's cub train classes")


def _wrong_prefix(model: MMNegMargin, tmp_path: Path) -> Path:
    built = save_mmcv_checkpoint(tmp_path / "built.pth", model)
    good = sha256_file(built)[:8]
    path = tmp_path / f"{CUB_CONV4}_20211120_100620-{'0' * 8 if good != '0' * 8 else '1' * 8}.pth"
    built.rename(path)
    return path


def _text(model: MMNegMargin, tmp_path: Path) -> Path:
    path = tmp_path / "text.pth"
    path.write_text("not a checkpoint\n" * 100)
    return path


def _truncated(model: MMNegMargin, tmp_path: Path) -> Path:
    built = save_mmcv_checkpoint(tmp_path / "built.pth", model)
    path = tmp_path / "truncated.pth"
    path.write_bytes(built.read_bytes()[: built.stat().st_size // 2])
    return path


def _edited(edit):
    def make(model: MMNegMargin, tmp_path: Path) -> Path:
        state = model.state_dict()
        edit(state)
        path = tmp_path / "edited.pth"
        torch.save({"meta": {"mmcv_version": "1.3.16"}, "state_dict": state}, path)
        return path
    return make


def _resnet12(model: MMNegMargin, tmp_path: Path) -> Path:
    return save_mmcv_checkpoint(tmp_path / "resnet12.pth", randomize(MMNegMargin("resnet12", 100), seed=3))


@pytest.mark.parametrize(
    ("make", "arch", "message"),
    [
        (_text, "conv4", "not a readable checkpoint, truncated or not a torch file"),
        (_truncated, "conv4", "not a readable checkpoint, truncated or not a torch file"),
        (_wrong_prefix, "conv4", "does not start with"),
        (_edited(lambda state: state.pop("backbone.layers.3.layers.1.running_mean")), "conv4",
         "missing 1 key(s) of mmfewshot's conv4 NegMargin model: backbone.layers.3.layers.1.running_mean"),
        (_edited(lambda state: state.update({"neck.weight": torch.zeros(3)})), "conv4",
         "1 unexpected key(s), not part of mmfewshot's conv4 NegMargin model: neck.weight"),
        (_edited(lambda state: state.update({"backbone.layers.1.layers.0.bias": torch.zeros(32)})), "conv4",
         "backbone.layers.1.layers.0.bias has shape [32], expected [64]"),
        (_resnet12, "conv4", "holds a resnet12 backbone"),
        (lambda model, tmp: save_mmcv_checkpoint(tmp / "conv4.pth", model), "resnet12", "holds a conv4 backbone"),
    ],
    ids=["not-torch", "truncated", "wrong-sha-prefix", "missing-key", "unexpected-key", "shape", "resnet12-as-conv4",
         "conv4-as-resnet12"],
)
def test_cli_import_bad_input_is_one_line_and_writes_nothing(conv4_model, tmp_path, capsys, make, arch, message):
    src = make(conv4_model, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "model.pt"
    err = one_line_error(capsys, ["import-mmfewshot", str(src), "--arch", arch, "--out", str(dst)])
    assert err.startswith(f"negmargin import-mmfewshot: error: {src}: ") and message in err
    assert list(out_dir.iterdir()) == []  # no checkpoint, no provenance, no temporary file


@pytest.mark.parametrize(("flag", "value", "message"), [("--arch", "vgg", "unknown arch 'vgg'"),
                                                         ("--dataset", "imagenet", "unknown dataset 'imagenet'")])
def test_cli_import_bad_option_values_are_one_line(conv4_model, tmp_path, capsys, flag, value, message):
    src = save_mmcv_checkpoint(tmp_path / "conv4.pth", conv4_model)
    args = {"--arch": "conv4", "--dataset": "cub", flag: value}
    err = one_line_error(capsys, ["import-mmfewshot", str(src), "--arch", args["--arch"], "--dataset",
                                  args["--dataset"], "--out", str(tmp_path / "model.pt")])
    assert message in err and not (tmp_path / "model.pt").exists()


# ---------------------------------------------------------------------------------------- verified download


def test_download_checks_the_sha256_prefix(tmp_path, capsys):
    body = b"released weights " * 4000
    digest = hashlib.sha256(body).hexdigest()
    with FileServer() as server:
        good = server.add("/good.pth", body, mode="drop")  # the first request breaks off: resumed with Range
        truncated = server.add("/truncated.pth", body[: len(body) // 3])
        out = tmp_path / "dl" / "good.pth"
        assert main(["download", "--url", good, "--sha256-prefix", digest[:8], "--out", str(out)]) == 0
        assert out.read_bytes() == body and server.requests_for("/good.pth")[1] is not None
        for url, prefix in ((good, "00000000" if not digest.startswith("0" * 8) else "11111111"),
                            (truncated, digest[:8])):
            target = tmp_path / "dl" / f"bad-{prefix}.pth"
            capsys.readouterr()
            assert main(["download", "--url", url, "--sha256-prefix", prefix, "--out", str(target)]) == 2
            # progress lines may come first; the error is the last line, and one line
            last = capsys.readouterr().err.strip().splitlines()[-1]
            assert last.startswith("negmargin download: error: download of ") and url in last
            assert f"expected it to start with {prefix}" in last
            assert not target.exists() and not target.with_name(target.name + ".part").exists()


# ----------------------------------------------------------------------------------------- head-row order


def test_mmfewshot_label_order_is_recorded_per_dataset():
    """mmfewshot's base-class label order (its dataset modules) against our split files: CUB agrees,
    mini-ImageNet and tiered-ImageNet do not, which is why analyze maps rows by name."""
    splits = REPO / "src" / "negmargin" / "data" / "splits"
    cub = [ours for ours, _ in mmfewshot_base_classes("cub")]
    assert cub == (splits / "CUB" / "base.txt").read_text().split()
    mini = [ours for ours, _ in mmfewshot_base_classes("mini_imagenet")]
    ravi = list(dict.fromkeys(row.split(",")[1] for row in (splits / "miniImageNet" / "ravi" / "train.csv")
                              .read_text().split()[1:]))
    assert sorted(mini) == sorted(ravi) and mini[0] == "n02074367" and ravi[0] == "n01532829"
    tiered = mmfewshot_base_classes("tiered_imagenet")
    assert len(tiered) == 351 and tiered[0] == ("n02094433", "Yorkshire terrier")


def _mini_base_features(model: MMNegMargin, tmp_path: Path) -> Path:
    """Base features of mini-ImageNet's 64 classes in our (Ravi) label order, each image its class's head row
    in mmfewshot's order: the right row mapping scores 100%, the identity mapping about chance."""
    order = [ours for ours, _ in mmfewshot_base_classes("mini_imagenet")]
    splits = REPO / "src" / "negmargin" / "data" / "splits"
    ravi = list(dict.fromkeys(row.split(",")[1] for row in (splits / "miniImageNet" / "ravi" / "train.csv")
                              .read_text().split()[1:]))
    rows = np.array([order.index(name) for name in ravi])
    head = model.head.weight.detach().numpy()
    labels = np.repeat(np.arange(64), 2)
    features = head[rows[labels]] + 0.01 * np.random.default_rng(0).normal(size=(128, head.shape[1]))
    path = tmp_path / "base_holdout.npz"
    np.savez(path, features=features.astype(np.float32), labels=labels, class_names=np.array(ravi))
    return path


def test_analyze_maps_mmfewshot_head_rows_to_our_classes_by_name(conv4_model, tmp_path, capsys):
    built = save_mmcv_checkpoint(tmp_path / "built.pth", conv4_model)
    src = tmp_path / f"neg-margin_cosine_conv4_1xb64_mini-imagenet_5way-1shot_20211120_104933-" \
                     f"{sha256_file(built)[:8]}.pth"
    built.rename(src)
    dst = tmp_path / "mini.pt"
    import_mmfewshot(src, "conv4", dst)
    base = _mini_base_features(conv4_model, tmp_path)
    novel = tmp_path / "novel.npz"
    np.savez(novel, features=np.random.default_rng(1).normal(size=(20, 1600)).astype(np.float32),
             labels=np.repeat(np.arange(2), 10), class_names=np.array(["n0", "n1"]))
    assert main(["analyze", "--checkpoint", str(dst), "--base-features", str(base), "--novel-features", str(novel),
                 "--out", str(tmp_path / "analysis.json")]) == 0
    assert "training margin -0.005" in capsys.readouterr().out
    result = read_json(tmp_path / "analysis.json")
    assert result["base_accuracy"] == 100.0 and result["n_base_classes"] == 64 and result["margin"] == -0.005


def test_analyze_refuses_an_unknown_head_order_and_shows_an_unknown_margin(conv4_model, tmp_path, capsys):
    src = save_mmcv_checkpoint(tmp_path / "plain.pth", conv4_model)  # no meta, no released name
    import_mmfewshot(src, "conv4", tmp_path / "unknown.pt")
    base = _mini_base_features(conv4_model, tmp_path)
    argv = ["analyze", "--checkpoint", str(tmp_path / "unknown.pt"), "--base-features", str(base),
            "--novel-features", str(base), "--out", str(tmp_path / "a.json")]
    err = one_line_error(capsys, argv)
    assert "the order of its head rows is unknown" in err and "--dataset" in err
    assert not (tmp_path / "a.json").exists()
    # with --dataset the order is mmfewshot's; the margin stays unknown (the file does not say)
    import_mmfewshot(src, "conv4", tmp_path / "known.pt", dataset="mini-imagenet")
    assert main([*argv[:2], str(tmp_path / "known.pt"), *argv[3:]]) == 0
    assert "training margin unknown" in capsys.readouterr().out
    assert read_json(tmp_path / "a.json")["margin"] is None


# ---------------------------------------------------------------------------------------- table and curves


def _model_folder(folder: Path, arch: str, results: dict[int, tuple[float, float]], margin=-0.01) -> Path:
    folder.mkdir(parents=True)
    (folder / "checkpoint.provenance.json").write_text(json.dumps({
        "source_file": f"neg-margin_cosine_{arch}_1xb64_cub_5way-1shot_20211120_100620-5415a152.pth",
        "source_sha256": "5415a152" + "0" * 56, "sha256_prefix_checked": True, "image_size": 84,
        "head_shape": [100, 1600], "margin": margin, "margin_from": "the released config of the file name"}))
    for shot, (mean, ci) in results.items():
        (folder / f"metatest_{shot}shot.json").write_text(json.dumps({
            "accuracy_mean": mean, "accuracy_ci95": ci, "ways": 5, "shots": shot, "episodes": 2000,
            "seed": 0, "queries": 15}))
    return folder


def test_released_table_sets_ours_beside_the_published_numbers(tmp_path):
    conv4 = _model_folder(tmp_path / "conv4", "conv4", {1: (63.5, 0.47), 5: (79.0, 0.35)})
    models = {"conv4": {"provenance": read_json(conv4 / "checkpoint.provenance.json"),
                        "results": {s: read_json(conv4 / f"metatest_{s}shot.json") for s in (1, 5)}}}
    table = tmp_path / "released_cub.md"
    render_released_table("cub", models, {("conv4", 1): 64.08, ("conv4", 5): 80.69},
                          {("conv4", 1): 0.48, ("conv4", 5): 0.34}, table, reference_source="mmfewshot README",
                          urls={"conv4": {"checkpoint": "https://x/c.pth", "log": "https://x/c.log.json"}})
    rows = read_markdown_tables(table)[0]
    one, five = rows
    assert (one["Arch"], one["Input Size"], one["Batch Size"], one["shot"]) == ("conv4", "84x84", "64", "1")
    assert (one["mean Acc"], one["std"], one["published mean Acc"], one["published std"]) == (
        "63.50", "0.47", "64.08", "0.48")
    assert one["Δ"] == "-0.58" and one["within CIs"] == f"yes (±{combined_ci95(0.47, 0.48):.2f})"
    assert five["Δ"] == "-1.69" and five["within CIs"].startswith("no (±0.49")
    assert one["ckpt"] == "[ckpt](https://x/c.pth)" and "mmfewshot README" in table.read_text()
    with pytest.raises(UserError, match="reference resnet12:1 matches no released cub model"):
        render_released_table("cub", models, {("resnet12", 1): 78.54}, {}, table)


def test_published_log_and_our_train_json_are_plotted(tiny_omniglot, tmp_path):
    from negmargin.options import TrainConfig
    from negmargin.training import train

    log = tmp_path / "conv4.log.json"
    log.write_text(mmcv_log([(5, 40.5, 1.9), (10, 48.25, 2.0)]))
    assert [(p["epoch"], p["accuracy"], p["ci95"]) for p in published_curve(log)] == [(5, 40.5, 1.9),
                                                                                      (10, 48.25, 2.0)]
    summary = train(tiny_omniglot, tmp_path / "train", TrainConfig(epochs=2, batch_size=64, val_every=1,
                                                                     val_episodes=3, warmup_iters=1, device="cpu"))
    paths = plot_released_log(log, tmp_path / "plots", ours=tmp_path / "train" / "train.json", title="t")
    assert {p.name for p in paths} == {"released_validation.png", "released_validation.svg",
                                       "released_validation.csv"}
    with open(tmp_path / "plots" / "released_validation.csv") as handle:
        points = list(csv.DictReader(handle))
    ours = [row["val"]["1"]["accuracy"] for row in summary["history"]]
    assert [float(p["accuracy"]) for p in points if p["source"] == "ours"] == ours
    assert [float(p["accuracy"]) for p in points if p["source"] == "published"] == [40.5, 48.25]
    log.write_text(mmcv_log([(5, 40.5, 1.9)]) + "{broken\n")
    with pytest.raises(UserError, match="line 4 is not JSON"):
        published_curve(log)


# ----------------------------------------------------------------------------------------------- the plan


def _validated(*overlays: dict) -> dict:
    """config/config.yaml with the overlays laid over it, as Snakemake merges --configfile files."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for overlay in overlays:
        config = _merge(config, copy.deepcopy(overlay))
    pipeline_config.validate(config, SCHEMA, REPO)
    return config


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_plan_of_the_released_target():
    plan = Plan(_validated(PAPER))
    assert [(p["dataset"], p["arch"]) for p in plan.released_pairs()] == [
        (d, a) for d in ("cub", "mini_imagenet", "tiered_imagenet") for a in ("conv4", "resnet12")]
    name = f"{CUB_CONV4}_20211120_100620-5415a152.pth"
    wildcards = run(dataset="cub", arch="conv4", filename=name)
    assert plan.released_checkpoint_file(wildcards) == f"data/raw/mmfewshot/cub/{name}"
    assert plan.released_download_args(wildcards) == (
        f"--url https://download.openmmlab.com{URL_DIR}/{name} --sha256-prefix 5415a152")
    log = run(dataset="cub", filename=f"{CUB_CONV4}.log.json")
    assert "--sha256-prefix" not in plan.released_download_args(log)
    args = plan.released_table_args(run(dataset="cub"))
    assert args.startswith("--shots 1 5 --model conv4=results/released/cub/conv4 ")
    assert "--reference conv4:1=64.08" in args and "--reference-std resnet12:5=0.24" in args
    outputs = plan.released_outputs()
    assert "results/tables/released_tiered_imagenet.md" in outputs and len(outputs) == 3 + 6 * 3
    assert plan.our_run("tiered_imagenet", "resnet12") == {"dataset": "tiered_imagenet", "arch": "resnet12",
                                                          "margin": "-0.01", "seed": 0}
    # only the archs this run covers; the default (Omniglot) has no released models
    plan.config["datasets"]["cub"]["archs"] = ["conv4"]
    assert [p["arch"] for p in plan.released_pairs() if p["dataset"] == "cub"] == ["conv4"]
    assert Plan(_validated()).released_outputs() == []


@pytest.mark.parametrize(
    ("models", "message"),
    [({"conv4": {"checkpoint": "https://x/neg-margin_cub.pth", "log": "https://x/a.log.json"}},
      "datasets.omniglot.released.models.conv4.checkpoint: 'https://x/neg-margin_cub.pth': expected URL of the .pth file"),
     ({"conv4": {"checkpoint": "https://x/m-5415a152.pth"}},
      "datasets.omniglot.released.models.conv4: 'log' is a required property"),
     ({"vgg": {"checkpoint": "https://x/m-5415a152.pth", "log": "https://x/a.json"}},
      "datasets.omniglot.released.models: 'vgg' is not one of ['conv4', 'resnet12']"),
     ({"conv4": {"checkpoint": "https://x/m-5415a152.pth", "log": "https://x/a.json"},
       "resnet12": {"checkpoint": "https://y/m-5415a152.pth", "log": "https://y/b.json"}},
      "datasets.omniglot.released.models: two files share a name")],
)
def test_released_config_errors_name_the_key(models, message):
    with pytest.raises(pipeline_config.ConfigError) as error:
        _validated({"datasets": {"omniglot": {"released": {"models": models}}}})
    assert any(message in problem for problem in error.value.problems), error.value.problems


def test_dry_run_shows_the_chain_for_every_dataset_and_arch(tmp_path):
    repo = copy_workflow(tmp_path / "repo")
    result = snakemake("-n", "--cores", "1", "--configfile=config/paper.yaml", "released", cwd=repo)
    assert job_counts(result.stdout) == {"prepare": 3, "released_download": 12, "released_import": 6,
                                         "released_features": 6, "released_metatest": 12, "released_table": 3,
                                         "released_plot": 6, "released": 1}
    # the README's CPU command: features on the CPU, no GPU requested
    result = snakemake("released", "-n", "-p", "--cores", "1", "--configfile", "config/paper.yaml",
                       "config/cpu.yaml", cwd=repo)
    features = [line for line in result.stdout.splitlines() if "negmargin features" in line]
    assert len(features) == 6 and all("--device cpu" in line for line in features)
    assert "gpu=" not in result.stdout


# ------------------------------------------------------------------------------ the workflow target, for real

NOVEL_IDS = [4, 8, 12, 16, 20]
PER_CLASS = 8  # 5-shot episodes with 2 queries need 7 images per class


def _overlay(cub: Path, models: dict[str, dict[str, str]]) -> dict:
    return {
        "run_datasets": ["cub"],
        "metatest": {"episodes": 20, "queries": 2},
        "compute": {"device": "cpu", "gpu": False, "num_workers": 0},
        "resources": {family: {"threads": 1, "mem_mb": 1000, "runtime": 10}
                      for family in ("prepare", "train", "select", "features", "metatest", "analyze", "report")},
        "datasets": {"cub": {
            "prepare": {"source": str(cub), "md5": None, "size": None, "mirrors": [],
                        "options": {"fixture": True, "base_holdout": 2}},
            "released": {"models": models},
        }},
    }


@pytest.fixture(scope="module")
def released_run(tmp_path_factory):
    """`snakemake released` on a tiny CUB: conv4 served over HTTP (its first transfer breaks off), the
    resnet12 checkpoint placed by hand in the download folder, both logs served."""
    root = tmp_path_factory.mktemp("released")
    cub = root / "CUB_200_2011.tgz"
    make_cub_tgz(cub, [1, 3, 5, 7, 9, 2, 6, 10, 14, 18, *NOVEL_IDS], images_per_class=PER_CLASS)
    repo = copy_workflow(root / "repo")
    references = {"conv4": randomize(MMNegMargin("conv4", 100), seed=31),
                  "resnet12": randomize(MMNegMargin("resnet12", 100), seed=32)}
    meta = {"mmcv_version": "1.3.16", "mmcls_version": "0.17.0", "epoch": 200, "seed": 0,
            "CLASSES": [c for i, c in enumerate(cub_class_names()) if i % 2 == 0]}  # mmfewshot's 100 train classes
    files = {}
    for arch, stem in (("conv4", CUB_CONV4), ("resnet12", CUB_RESNET12)):
        built = save_mmcv_checkpoint(root / f"{arch}.pth", references[arch], meta if arch == "conv4" else None)
        files[arch] = built.rename(root / released_name(stem, built))
    hand_placed = repo / "data" / "raw" / "mmfewshot" / "cub" / files["resnet12"].name
    hand_placed.parent.mkdir(parents=True)
    shutil.copy2(files["resnet12"], hand_placed)
    with FileServer() as server:
        models = {}
        for arch, stem in (("conv4", CUB_CONV4), ("resnet12", CUB_RESNET12)):
            log = server.add(f"{URL_DIR}/{stem}.log.json", mmcv_log([(5, 40.0 + len(arch), 2.0), (10, 50.0, 1.8)])
                             .encode())
            path = f"{URL_DIR}/{files[arch].name}"
            if arch == "conv4":
                server.add(path, files[arch].read_bytes(), mode="drop")
            models[arch] = {"checkpoint": server.url(path), "log": log}
        (repo / "tiny.yaml").write_text(yaml.safe_dump(_overlay(cub, models)))
        snakemake("released", "--cores", "2", "--configfile", "config/paper.yaml", "tiny.yaml", cwd=repo,
                  timeout=1500)
        requests = {arch: server.requests_for(f"{URL_DIR}/{files[arch].name}") for arch in files}
    return repo, references, requests


@pytest.mark.slow
def test_released_target_gives_the_independent_modules_features(released_run):
    from negmargin.data.loader import eval_batches
    from negmargin.data.store import load_split

    repo, references, requests = released_run
    assert len(requests["conv4"]) >= 2 and requests["conv4"][-1] is not None  # resumed with Range
    assert requests["resnet12"] == []  # placed by hand: verified by the import and used
    split = load_split(repo / "data" / "cub" / "novel")
    # the test transform of the prepared split, in mmfewshot's NCHW memory format (an imported model's too)
    images = torch.cat([batch for batch, _ in eval_batches(split, 16, 84)]).contiguous()
    for arch, model in references.items():
        with np.load(repo / "results" / "released" / "cub" / arch / "features_novel.npz") as bank:
            ours = bank["features"]
            assert bank["labels"].tolist() == split.labels.tolist()
        with torch.no_grad():
            expected = model.backbone(images).numpy()
        difference = float(np.abs(ours - expected).max())
        print(f"{arch}: features {ours.shape}, max |ours - mmfewshot module| = {difference:.3g}")
        assert ours.shape == expected.shape and difference <= 1e-4, arch
        provenance = read_json(repo / "results" / "released" / "cub" / arch / "checkpoint.provenance.json")
        assert provenance["sha256_prefix_checked"] is True and provenance["dataset"] == "cub"
        assert provenance["head_class_order"] == ("meta CLASSES" if arch == "conv4"
                                                  else "mmfewshot's cub train classes (mmfewshot/cub_train.csv)")


@pytest.mark.slow
def test_released_table_shows_the_published_numbers_from_config(released_run):
    repo = released_run[0]
    table = repo / "results" / "tables" / "released_cub.md"
    rows = read_markdown_tables(table)[0]
    published = PAPER["datasets"]["cub"]["references"]
    assert [(row["Arch"], row["shot"]) for row in rows] == [("conv4", "1"), ("conv4", "5"), ("resnet12", "1"),
                                                            ("resnet12", "5")]
    for row in rows:
        arch, shot = row["Arch"], int(row["shot"])
        result = read_json(repo / "results" / "released" / "cub" / arch / f"metatest_{shot}shot.json")
        assert result["episodes"] == 20 and result["seed"] == 0 and result["shots"] == shot
        assert row["mean Acc"] == f"{result['accuracy_mean']:.2f}" and row["std"] == f"{result['accuracy_ci95']:.2f}"
        assert float(row["published mean Acc"]) == published["accuracy"][arch][shot]
        assert float(row["published std"]) == published["std"][arch][shot]
        delta = result["accuracy_mean"] - published["accuracy"][arch][shot]
        assert row["Δ"] == f"{delta:+.2f}"
        within = abs(delta) <= combined_ci95(result["accuracy_ci95"], published["std"][arch][shot])
        assert row["within CIs"].startswith("yes" if within else "no")
    text = table.read_text()
    assert published["source"] in text and "training margin -0.01" in text
    assert "20 episodes (episode seed 0, 2 queries per class" in text
    for arch in ("conv4", "resnet12"):
        plots = repo / "results" / "plots" / "cub" / arch
        with open(plots / "released_validation.csv") as handle:
            points = [(row["source"], row["epoch"], row["accuracy"]) for row in csv.DictReader(handle)]
        assert points == [("published", "5", str(40.0 + len(arch))), ("published", "10", "50.0")]
        assert (plots / "released_validation.png").stat().st_size > 0


@pytest.mark.slow
def test_released_target_refuses_bad_files_and_leaves_nothing(tmp_path):
    """A download whose sha256 does not start with its name's prefix, and a truncated file placed by hand:
    the job fails with one line naming the file, and nothing is left where the file or checkpoint would be."""
    repo = copy_workflow(tmp_path / "repo")
    model = randomize(MMNegMargin("conv4", 100), seed=41)
    built = save_mmcv_checkpoint(tmp_path / "conv4.pth", model)
    digest = sha256_file(built)
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    truncated = f"{CUB_RESNET12}_20211120_100620-{digest[:8]}.pth"
    with FileServer() as server:
        models = {
            "conv4": {"checkpoint": server.add(f"{URL_DIR}/{CUB_CONV4}_20211120_100620-{wrong}.pth",
                                               built.read_bytes()),
                      "log": server.add(f"{URL_DIR}/{CUB_CONV4}.log.json", mmcv_log([(5, 40.0, 2.0)]).encode())},
            "resnet12": {"checkpoint": server.url(f"{URL_DIR}/{truncated}"),
                         "log": server.add(f"{URL_DIR}/{CUB_RESNET12}.log.json", mmcv_log([(5, 40.0, 2.0)]).encode())},
        }
        (repo / "tiny.yaml").write_text(yaml.safe_dump(_overlay(tmp_path / "unused.tgz", models)))
        downloads = repo / "data" / "raw" / "mmfewshot" / "cub"
        downloads.mkdir(parents=True)
        (downloads / truncated).write_bytes(built.read_bytes()[:20000])
        wrong_file = downloads / f"{CUB_CONV4}_20211120_100620-{wrong}.pth"
        result = snakemake(str(wrong_file.relative_to(repo)), "--cores", "1", "--configfile", "config/paper.yaml",
                           "tiny.yaml", cwd=repo, check=False)
        assert result.returncode != 0
        log = (repo / "logs" / "released" / "download" / "cub" / f"{wrong_file.name}.log").read_text()
        last = log.strip().splitlines()[-1]
        assert last.startswith("negmargin download: error: ") and f"expected it to start with {wrong}" in last
        assert not wrong_file.exists() and not wrong_file.with_name(wrong_file.name + ".part").exists()
        checkpoint = repo / "results" / "released" / "cub" / "resnet12" / "checkpoint.pt"
        result = snakemake(str(checkpoint.relative_to(repo)), "--cores", "1", "--configfile", "config/paper.yaml",
                           "tiny.yaml", cwd=repo, check=False)
        assert result.returncode != 0 and server.requests_for(f"{URL_DIR}/{truncated}") == []
    last = (repo / "logs" / "released" / "import" / "cub" / "resnet12.log").read_text().strip().splitlines()[-1]
    assert last.startswith(f"negmargin import-mmfewshot: error: data/raw/mmfewshot/cub/{truncated}: sha256 ")
    assert "does not start with" in last
    assert not checkpoint.exists() and not provenance_path(checkpoint).exists()

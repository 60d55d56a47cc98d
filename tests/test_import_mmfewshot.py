"""Importing mmfewshot's Neg-Margin checkpoints (negmargin.models.mmfewshot).

Source files are built in mmfewshot's layout by tests/mmfewshot_layout.py, a module written independently
of negmargin's backbones (mmfewshot's names, layer order and forward pass), with random weights and BN
statistics, and saved as mmcv saves them. The converted checkpoint is read back with the package's own
``load_model``, ``features_of_checkpoint`` and ``analyze``.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mmfewshot_layout import MMNegMargin, randomize, save_mmcv_checkpoint

from negmargin.errors import UserError
from negmargin.io import read_json, sha256_file
from negmargin.models import CHECKPOINT_FORMAT, Classifier, ModelSpec, load_model
from negmargin.models.mmfewshot import (
    check_release_sha256,
    import_mmfewshot,
    provenance_path,
    release_sha_prefix,
)

CUB_CONFIG = """model = dict(
    type='NegMargin',
    backbone=dict(type='Conv4'),
    head=dict(
        type='NegMarginHead',
        num_classes=100,
        in_channels=1600,
        metric_type='cosine',
        margin=-0.01,
        temperature=10.0),
    meta_test_head=dict(
        type='NegMarginHead',
        num_classes=5,
        in_channels=1600,
        metric_type='cosine',
        margin=0.0,
        temperature=5.0))
data = dict(train=dict(type='CUBDataset', subset='train'))
"""
SPLITS = Path(__file__).resolve().parents[1] / "src" / "negmargin" / "data" / "splits"
RELEASED_MINI_CONV4 = "neg-margin_cosine_conv4_1xb64_mini-imagenet_5way-1shot_20211120_104933"
CLASSES = ["001.Black_footed_Albatross", "003.Sooty_Albatross", "005.Crested_Auklet"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def conv4_model() -> MMNegMargin:
    return randomize(MMNegMargin("conv4", 100), seed=1)


@pytest.fixture(scope="module")
def resnet12_source(tmp_path_factory) -> tuple[MMNegMargin, Path]:
    model = randomize(MMNegMargin("resnet12", 351), seed=2)
    path = tmp_path_factory.mktemp("mmfewshot") / "resnet12.pth"
    return model, save_mmcv_checkpoint(path, model)


def _cub_meta() -> dict:
    return {"mmcv_version": "1.3.12", "mmcls_version": "0.16.0", "time": "Sat Nov 20 10:06:20 2021",
            "epoch": 180, "iter": 26280, "seed": 0, "config": CUB_CONFIG, "CLASSES": CLASSES,
            "env_info": "sys.platform: linux\nGPU 0: Tesla V100", "hook_msgs": {
                "best_score": np.float64(64.125), "ckpt_time": "epoch_180", "best_ckpt": "/work_dirs/x.pth"}}


def _as_numpy1_pickle(path: Path) -> None:
    """Rename numpy 2's scalar global to numpy 1's (numpy.core...), as files saved in 2021 spell it."""
    with zipfile.ZipFile(path) as archive:
        entries = [(name, archive.read(name)) for name in archive.namelist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            archive.writestr(name, data)
    path.write_bytes(buffer.getvalue())


def _max_feature_difference(reference: MMNegMargin, converted: torch.nn.Module, batch: int,
                            seed: int) -> float:
    images = torch.randn(batch, 3, 84, 84, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((reference.backbone(images) - converted.backbone(images)).abs().max())


def test_layout_parameter_counts_are_ours():
    for arch, count in (("conv4", 113_088), ("resnet12", 12_424_320)):
        theirs = sum(p.numel() for p in MMNegMargin(arch, 100).backbone.parameters())
        ours = sum(p.numel() for p in Classifier(ModelSpec(arch, 3, 84, 100)).backbone.parameters())
        assert theirs == ours == count


def test_conv4_import_gives_the_same_features_and_records_provenance(conv4_model, tmp_path):
    src = save_mmcv_checkpoint(tmp_path / "neg-margin_conv4_cub.pth", conv4_model, _cub_meta())
    _as_numpy1_pickle(src)
    dst = tmp_path / "out" / "conv4.pt"
    summary = import_mmfewshot(src, "conv4", dst)

    model, ckpt = load_model(dst, arch="conv4")
    assert _max_feature_difference(conv4_model, model, batch=4, seed=0) <= 1e-4
    assert torch.equal(model.head.weight, conv4_model.head.weight)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["model_spec"] == {"arch": "conv4", "in_channels": 3, "image_size": 84, "num_classes": 100,
                                  "metric": "cosine", "temperature": 10.0, "margin": -0.01}
    config = ckpt["config"]
    assert (config["dataset"], config["margin"], config["temperature"], config["channels_last"]) == (
        "cub", -0.01, 10.0, False)
    assert ckpt["base_class_names"] == CLASSES
    # the provenance: beside the checkpoint and inside it, the same
    assert read_json(provenance_path(dst)) == ckpt["provenance"] == summary
    assert summary["source_file"] == src.name and summary["source_sha256"] == sha256_file(src)
    assert summary["head_shape"] == [100, 1600] and summary["tensors_mapped"] == 29
    assert summary["margin_from"] == "the meta config" and summary["dataset_from"] == "the meta config"
    assert summary["ignored_keys"] == ["device_indicator"] and summary["sha256_prefix_checked"] is False
    kept = summary["mmfewshot_meta"]
    assert kept["hook_msgs.best_score"] == 64.125 and kept["epoch"] == 180 and kept["config"] == CUB_CONFIG
    assert "env_info" not in kept and "hook_msgs.best_ckpt" not in kept


def test_resnet12_import_gives_the_same_features(resnet12_source, tmp_path):
    reference, src = resnet12_source
    dst = tmp_path / "resnet12.pt"
    summary = import_mmfewshot(src, "resnet12", dst, dataset="tiered-imagenet")
    model, ckpt = load_model(dst, arch="resnet12")
    assert _max_feature_difference(reference, model, batch=2, seed=1) <= 1e-4
    assert torch.equal(model.head.weight, reference.head.weight)
    # no meta and no released name: dataset from --dataset, margin unknown, head rows in mmfewshot's
    # tiered-ImageNet label order, in our class names (synsets)
    assert ckpt["config"]["dataset"] == "tiered_imagenet" and ckpt["config"]["margin"] is None
    assert summary["margin_from"] == "unknown" and summary["dataset_from"] == "--dataset"
    assert summary["head_shape"] == [351, 640] and summary["tensors_mapped"] == 97
    assert summary["head_class_order"].startswith("mmfewshot's tiered_imagenet train classes")
    ours = [line.split(",")[0] for line in (SPLITS / "tieredImageNet" / "train.csv").read_text().split()]
    assert sorted(ckpt["base_class_names"]) == sorted(ours) and ckpt["base_class_names"] != ours
    assert ckpt["base_class_names"][0] == "n02094433"  # mmfewshot's first: 'Yorkshire terrier'


def test_released_name_gives_dataset_and_margin_and_is_checked(conv4_model, tmp_path):
    built = save_mmcv_checkpoint(tmp_path / "built.pth", conv4_model, {"mmcv_version": "1.3.12"})
    digest = sha256_file(built)
    src = tmp_path / f"{RELEASED_MINI_CONV4}-{digest[:8]}.pth"
    built.rename(src)
    summary = import_mmfewshot(src, "conv4", tmp_path / "mini.pt")
    assert summary["sha256_prefix_checked"] is True
    assert (summary["dataset"], summary["margin"]) == ("mini_imagenet", -0.005)
    assert summary["margin_from"] == "the released config of the file name"
    assert load_model(tmp_path / "mini.pt")[1]["model_spec"]["margin"] == -0.005


def test_sha_prefix_check(tmp_path):
    released = "neg-margin_cosine_conv4_1xb64_cub_5way-1shot_20211120_100620-5415a152.pth"
    assert release_sha_prefix(released) == "5415a152"
    assert release_sha_prefix("conv4.pth") is None and release_sha_prefix("x-5415a152.pt") is None
    data = tmp_path / "payload.bin"
    data.write_bytes(b"negmargin")
    digest = sha256_file(data)
    good = tmp_path / f"model-{digest[:8]}.pth"
    good.write_bytes(data.read_bytes())
    assert check_release_sha256(good) is True
    assert check_release_sha256(data) is False  # no prefix in the name: nothing to check
    wrong_prefix = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    bad = tmp_path / f"model-{wrong_prefix}.pth"
    bad.write_bytes(data.read_bytes())
    expected = rf"{bad.name}: sha256 {digest[:8]}\.\.\. does not start with {wrong_prefix}"
    with pytest.raises(UserError, match=expected):
        check_release_sha256(bad)


def test_imported_checkpoint_works_with_features_and_analyze(conv4_model, tmp_path):
    from negmargin.analysis import analyze
    from negmargin.data.loader import eval_batches
    from negmargin.data.store import SplitWriter, load_split
    from negmargin.features import features_of_checkpoint

    src = save_mmcv_checkpoint(tmp_path / "cub.pth", conv4_model, _cub_meta())
    dst = tmp_path / "cub.pt"
    import_mmfewshot(src, "conv4", dst, dataset="cub")
    rng = np.random.default_rng(0)
    novel_names = ["002.Laysan_Albatross", "004.Groove_billed_Ani"]
    for split, names in (("base_holdout", CLASSES), ("novel", novel_names)):
        labels = np.repeat(np.arange(len(names)), 2)
        with SplitWriter(tmp_path / split, len(labels), (84, 84, 3), names,
                         meta={"dataset": "cub", "split": split, "pipeline": "imagenet84"}) as writer:
            for index, label in enumerate(labels):
                writer.add(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8), int(label), f"{split}_{index}")
    for split in ("base_holdout", "novel"):
        features_of_checkpoint(dst, tmp_path / split, tmp_path / f"{split}.npz", device="cpu")
    # the features command (the test transform, mmfewshot's NCHW memory format for an imported model) agrees
    # with mmfewshot's module on the same input
    batches = eval_batches(load_split(tmp_path / "novel"), 8, 84)
    images = torch.cat([batch for batch, _ in batches]).contiguous()
    with torch.no_grad():
        expected = conv4_model.backbone(images).numpy()
    assert np.abs(np.load(tmp_path / "novel.npz")["features"] - expected).max() <= 1e-4
    result = analyze(dst, tmp_path / "base_holdout.npz", tmp_path / "novel.npz")
    assert result["arch"] == "conv4" and result["margin"] == -0.01 and result["n_base_classes"] == 3


# ------------------------------------------------------------------------------------------------ bad input


def _drop(key: str):
    def edit(state: dict) -> None:
        del state[key]
    return edit


def _add(key: str, value: torch.Tensor):
    def edit(state: dict) -> None:
        state[key] = value
    return edit


def _reshape(key: str, shape: tuple[int, ...]):
    def edit(state: dict) -> None:
        state[key] = torch.zeros(shape)
    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("backbone.layers.2.layers.1.running_var"),
         "missing 1 key(s) of mmfewshot's conv4 NegMargin model: backbone.layers.2.layers.1.running_var"),
        (_drop("backbone.layers.0.layers.1.num_batches_tracked"),
         "missing 1 key(s) of mmfewshot's conv4 NegMargin model: "
         "backbone.layers.0.layers.1.num_batches_tracked"),
        (_drop("head.weight"), "missing key head.weight"),
        (_add("backbone.layers.4.layers.0.weight", torch.zeros(64, 64, 3, 3)),
         "1 unexpected key(s), not part of mmfewshot's conv4 NegMargin model: "
         "backbone.layers.4.layers.0.weight"),
        (_add("meta_test_head.weight", torch.zeros(5, 1600)), "unexpected key(s)"),
        (_reshape("backbone.layers.0.layers.0.weight", (64, 1, 3, 3)),
         "backbone.layers.0.layers.0.weight has shape [64, 1, 3, 3], expected [64, 3, 3, 3] for conv4 "
         "(our backbone.layers.0.weight)"),
        (_reshape("head.weight", (100, 640)), "head.weight has shape [100, 640], expected [100, 1600]"),
    ],
    ids=["missing-bn-buffer", "missing-num-batches", "missing-head", "unexpected-layer", "unexpected-head",
         "shape", "head-width"],
)
def test_bad_state_dict_is_refused_and_nothing_written(conv4_model, tmp_path, edit, message):
    state = conv4_model.state_dict()
    edit(state)
    src = tmp_path / "bad.pth"
    torch.save({"meta": {"mmcv_version": "1.3.12"}, "state_dict": state}, src)
    dst = tmp_path / "out.pt"
    with pytest.raises(UserError) as caught:
        import_mmfewshot(src, "conv4", dst)
    text = str(caught.value)
    assert text.startswith(f"{src}: ") and message in text and "\n" not in text
    assert not dst.exists() and not provenance_path(dst).exists()


def _not_torch(path: Path, good: Path) -> None:
    path.write_bytes(b"this is not a checkpoint\n" * 10)


def _truncated(path: Path, good: Path) -> None:
    path.write_bytes(good.read_bytes()[:5000])


def _a_list(path: Path, good: Path) -> None:
    torch.save([torch.zeros(1)], path)


def _no_state_dict(path: Path, good: Path) -> None:
    torch.save({"meta": {}, "model": torch.load(good, weights_only=True)["state_dict"]}, path)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_not_torch, "not a readable checkpoint, truncated or not a torch file"),
        (_truncated, "not a readable checkpoint, truncated or not a torch file"),
        (_a_list, "not an mmcv checkpoint (it holds a list; expected a dict with 'state_dict')"),
        (_no_state_dict, "not an mmcv checkpoint (it holds a dict without 'state_dict'"),
    ],
    ids=["not-torch", "truncated", "list", "no-state-dict"],
)
def test_unreadable_file_is_refused(conv4_model, tmp_path, write, message):
    good = save_mmcv_checkpoint(tmp_path / "good.pth", conv4_model, {})
    src = tmp_path / "bad.pth"
    write(src, good)
    dst = tmp_path / "out.pt"
    with pytest.raises(UserError) as caught:
        import_mmfewshot(src, "conv4", dst)
    assert str(caught.value).startswith(f"{src}: ") and message in str(caught.value)
    assert not dst.exists() and not provenance_path(dst).exists()


def test_other_backbone_is_refused(conv4_model, resnet12_source, tmp_path):
    _, resnet12 = resnet12_source
    conv4 = save_mmcv_checkpoint(tmp_path / "conv4.pth", conv4_model, {})
    dst = tmp_path / "out.pt"
    with pytest.raises(UserError, match="holds a resnet12 backbone .*, but arch 'conv4' was asked for"):
        import_mmfewshot(resnet12, "conv4", dst)
    with pytest.raises(UserError, match="holds a conv4 backbone .*, but arch 'resnet12' was asked for"):
        import_mmfewshot(conv4, "resnet12", dst)
    assert not dst.exists() and not provenance_path(dst).exists()


def test_conflicting_dataset_and_wrong_head_rows_are_refused(conv4_model, tmp_path):
    src = save_mmcv_checkpoint(tmp_path / "cub.pth", conv4_model, _cub_meta())
    dst = tmp_path / "out.pt"
    conflict = "conflicting dataset: --dataset says 'mini_imagenet', the meta config says 'cub'"
    with pytest.raises(UserError, match=conflict):
        import_mmfewshot(src, "conv4", dst, dataset="mini-imagenet")
    rows = "head.weight has 100 rows, but mmfewshot's tiered_imagenet head has 351"
    with pytest.raises(UserError, match=rows):
        import_mmfewshot(save_mmcv_checkpoint(tmp_path / "plain.pth", conv4_model), "conv4", dst,
                         dataset="tiered-imagenet")
    assert not dst.exists()


class Payload:
    """Anything but tensors, plain containers and numpy scalars: it must not be unpickled."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_object_is_refused_without_running(conv4_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "evil.pth"
    torch.save({"meta": {"hook_msgs": Payload()}, "state_dict": conv4_model.state_dict()}, src)
    dst = tmp_path / "out.pt"
    with pytest.raises(UserError) as caught:
        import_mmfewshot(src, "conv4", dst)
    text = str(caught.value)
    assert text.startswith(f"{src}: refused: it holds a pickled Python object")
    assert "weights_only=True" in text
    assert not (tmp_path / "pwned").exists() and not dst.exists() and not provenance_path(dst).exists()

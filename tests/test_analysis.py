"""Tests of negmargin.analysis: discriminability, base accuracy, seed aggregation, and `negmargin analyze`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error

from negmargin.analysis import analyze, base_accuracy, discriminability
from negmargin.cli import main
from negmargin.errors import UserError
from negmargin.models import CHECKPOINT_FORMAT, Classifier, ModelSpec
from negmargin.models.heads import CosineMarginHead
from negmargin.reporting.metrics import aggregate_runs
from negmargin.stats import aggregate_seeds, t_quantile_975


def _on_circle(angles_deg, scales=None):
    radians = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    points = np.stack([np.cos(radians), np.sin(radians)], axis=1)
    if scales is not None:  # discriminability normalises first, so lengths must not matter
        points = points * np.asarray(scales, dtype=np.float64)[:, None]
    return points.astype(np.float32)


# ------------------------------------------------------------------------------------------ discriminability


def test_discriminability_three_classes_on_circle():
    # Classes at 0, 120 and 240 degrees, two samples each at ±30 degrees, with arbitrary lengths.
    # Class mean = cos30 * u_i; each sample lies sin^2(30) = 1/4 from its mean (squared distance);
    # ||mu_i - mu_j||^2 = cos^2(30) * (2 - 2 cos 120) = 3/4 * 3 = 9/4, the same for all three pairs.
    angles, labels = [], []
    for label, centre in enumerate((0.0, 120.0, 240.0)):
        angles += [centre - 30.0, centre + 30.0]
        labels += [label, label]
    features = _on_circle(angles, scales=[1.0, 2.0, 0.5, 3.0, 7.0, 1.5])
    result = discriminability(features, np.array(labels))
    assert result["inter"] == pytest.approx(9 / 4, abs=1e-6)
    assert result["intra"] == pytest.approx(1 / 4, abs=1e-6)
    assert result["ratio"] == pytest.approx(9.0, abs=1e-5)


def test_discriminability_intra_is_a_mean_over_classes_not_over_samples():
    # Class 0: two samples at ±60 degrees around 0 -> spread sin^2(60) = 3/4, mean (cos60, 0) = (1/2, 0).
    # Class 1: four samples, twice ±0 around 180 -> spread 0, mean (-1, 0).
    # intra = (3/4 + 0) / 2 = 3/8 (a pooled mean over samples would give 1/4);
    # inter (one pair) = (1/2 - (-1))^2 = 9/4; ratio = 6.
    features = _on_circle([60.0, -60.0, 180.0, 180.0, 180.0, 180.0])
    labels = np.array([0, 0, 1, 1, 1, 1])
    result = discriminability(features, labels)
    assert result["intra"] == pytest.approx(3 / 8, abs=1e-6)
    assert result["inter"] == pytest.approx(9 / 4, abs=1e-6)
    assert result["ratio"] == pytest.approx(6.0, abs=1e-5)


def test_discriminability_matches_a_direct_loop_on_many_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 300, size=3000)
    labels[:300] = np.arange(300)  # every class present
    features = rng.normal(size=(3000, 32)).astype(np.float32) + labels[:, None] % 7
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(axis=0) for c in range(300)])
    pairs = [((means[i] - means[j]) ** 2).sum() for i in range(300) for j in range(i + 1, 300)]
    spreads = [((unit[labels == c] - means[c]) ** 2).sum(axis=1).mean() for c in range(300)]
    result = discriminability(features, labels)
    assert result["inter"] == pytest.approx(np.mean(pairs), rel=1e-5)
    assert result["intra"] == pytest.approx(np.mean(spreads), rel=1e-5)


def test_discriminability_needs_two_classes():
    with pytest.raises(UserError, match="at least 2 classes"):
        discriminability(np.ones((4, 3), dtype=np.float32), np.zeros(4, dtype=np.int64))


def test_discriminability_ratio_is_none_without_spread():
    result = discriminability(_on_circle([0.0, 0.0, 90.0]), np.array([0, 0, 1]))
    assert result["intra"] == pytest.approx(0.0, abs=1e-12)
    assert result["ratio"] is None


# --------------------------------------------------------------------------------------------- base accuracy


def _known_head(margin: float = 0.5) -> CosineMarginHead:
    head = CosineMarginHead(2, 3, temperature=10.0, margin=margin)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    return head


def test_base_accuracy_on_a_known_head():
    # argmax of cos(x, W_j): (2, .1) -> 0, (.1, 3) -> 1, (-1, .2) -> 2, (1, 1.2) -> 1 but labelled 0.
    features = np.array([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.2], [1.0, 1.2]], dtype=np.float32)
    labels = np.array([0, 1, 2, 0])
    result = base_accuracy(_known_head(), features, labels)
    assert result["accuracy"] == pytest.approx(75.0)
    assert result["ci95"] == pytest.approx(100 * 1.959963984540054 * math.sqrt(0.75 * 0.25 / 4))
    assert result["n"] == 4


def test_base_accuracy_applies_no_margin():
    # A large positive margin would flip these if it were applied; at inference it must not be.
    features = np.array([[1.0, 0.9], [0.9, 1.0]], dtype=np.float32)
    labels = np.array([0, 1])
    assert base_accuracy(_known_head(margin=5.0), features, labels)["accuracy"] == pytest.approx(100.0)


def test_base_accuracy_rejects_foreign_labels():
    with pytest.raises(UserError, match="labels outside"):
        base_accuracy(_known_head(), np.ones((2, 2), dtype=np.float32), np.array([0, 3]))
    with pytest.raises(UserError, match="do not fit"):
        base_accuracy(_known_head(), np.ones((2, 5), dtype=np.float32), np.array([0, 1]))


# -------------------------------------------------------------------------------------------- aggregation


def test_aggregate_seeds_student_t_interval():
    # mean 72, s = 2 (ddof=1), n = 3, t_{0.975, 2} = 4.302652729911275 -> 4.302652729911275 * 2 / sqrt(3).
    result = aggregate_seeds([70.0, 72.0, 74.0])
    assert result["mean"] == pytest.approx(72.0)
    assert result["std"] == pytest.approx(2.0)
    assert result["ci95"] == pytest.approx(4.302652729911275 * 2 / math.sqrt(3), rel=1e-8)
    assert result["n"] == 3


def test_aggregate_seeds_one_seed_has_no_interval():
    assert aggregate_seeds([71.5]) == {"mean": 71.5, "ci95": None, "std": None, "n": 1, "values": [71.5]}
    assert aggregate_seeds([None, 71.5]) == {"mean": 71.5, "ci95": None, "std": None, "n": 1, "values": [71.5]}
    assert aggregate_seeds([]) == {"mean": None, "ci95": None, "std": None, "n": 0, "values": []}


def test_t_quantile_fallback_matches_scipy(monkeypatch):
    scipy_stats = pytest.importorskip("scipy.stats")
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    for df in (1, 2, 5, 29, 30, 31, 60, 500):
        assert t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-5)


def _run(margin, seed, accuracy, temperature=10.0):
    return {"dataset": "omniglot", "arch": "conv4", "backbone": "conv4", "margin": margin, "seed": seed,
            "metric": "cosine", "temperature": temperature, "image_size": 28, "batch_size": 64, "epochs": 3,
            "checkpoints": {"best": {"tasks": {"5way-1shot": {"accuracy_mean": accuracy, "epoch": 3}},
                                     "base_accuracy": None, "base_discriminability": None,
                                     "novel_discriminability": {"ratio": accuracy / 10}}}}


def test_aggregate_runs_groups_by_margin():
    groups = aggregate_runs([_run(-0.1, 0, 90.0), _run(-0.1, 1, 92.0), _run(0.0, 0, 88.0)])
    assert [(g["margin"], g["n_seeds"], g["seeds"]) for g in groups] == [(-0.1, 2, [0, 1]), (0.0, 1, [0])]
    first = groups[0]["checkpoints"]["best"]
    assert first["tasks"]["5way-1shot"]["mean"] == pytest.approx(91.0)
    # s = sqrt(2), n = 2, t_{0.975, 1} = 12.706204736174698 -> 12.7062 * sqrt(2) / sqrt(2)
    assert first["tasks"]["5way-1shot"]["ci95"] == pytest.approx(12.706204736174698, rel=1e-8)
    assert first["base_accuracy"]["n"] == 0
    # the novel discriminability is paired seed by seed with m = 0 (seed 0 only has both)
    assert first["paired_vs_zero"]["novel_discriminability"]["mean"] == pytest.approx(0.2)
    assert groups[1]["checkpoints"]["best"]["tasks"]["5way-1shot"]["ci95"] is None


def test_aggregate_runs_refuses_mixed_configurations():
    with pytest.raises(UserError, match="differ in temperature"):
        aggregate_runs([_run(-0.1, 0, 90.0), _run(-0.1, 1, 92.0, temperature=30.0)])


# ---------------------------------------------------------------------------------------- analyze + CLI


@pytest.fixture()
def trained(tmp_path):
    """A real conv4 checkpoint whose head weights are four known directions, and matching features."""
    torch.manual_seed(0)
    spec = ModelSpec(arch="conv4", in_channels=1, image_size=28, num_classes=4, margin=-0.1)
    model = Classifier(spec)
    directions = torch.zeros(4, model.feature_dim)
    for k in range(4):
        directions[k, 2 * k] = 1.0
    with torch.no_grad():
        model.head.weight.copy_(directions)
    checkpoint = tmp_path / "best.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_spec": spec.to_dict(), "model": model.state_dict(),
                "base_class_names": [f"b{k}" for k in range(4)]}, checkpoint)

    rng = np.random.default_rng(1)
    base_labels = np.repeat(np.arange(4), 5)
    base = directions.numpy()[base_labels] + 0.05 * rng.random((20, model.feature_dim), dtype=np.float32)
    base_labels_wrong = base_labels.copy()
    base_labels_wrong[:2] = 1  # two of the five class-0 images are labelled 1: 18/20 correct
    base_file = tmp_path / "base_holdout.npz"
    np.savez(base_file, features=base.astype(np.float32), labels=base_labels_wrong,
             class_names=np.array([f"b{k}" for k in range(4)]))
    novel_labels = np.repeat(np.arange(3), 6)
    novel = rng.normal(size=(18, model.feature_dim)).astype(np.float32)
    novel_file = tmp_path / "novel.npz"
    np.savez(novel_file, features=novel, labels=novel_labels, class_names=np.array(["n0", "n1", "n2"]))
    return {"checkpoint": checkpoint, "base": base_file, "novel": novel_file, "base_features": base,
            "base_labels": base_labels_wrong, "novel_features": novel, "novel_labels": novel_labels}


def test_analyze_on_a_real_checkpoint(trained):
    result = analyze(trained["checkpoint"], trained["base"], trained["novel"])
    assert result["base_accuracy"] == pytest.approx(90.0)
    assert result["base_accuracy_ci95"] == pytest.approx(100 * 1.959963984540054 * math.sqrt(0.9 * 0.1 / 20))
    assert result["n_base"] == 20 and result["n_novel"] == 18
    assert result["margin"] == pytest.approx(-0.1) and result["arch"] == "conv4"
    expected = discriminability(trained["novel_features"], trained["novel_labels"])
    assert result["novel_discriminability"] == pytest.approx(expected)
    assert set(result["base_discriminability"]) == {"inter", "intra", "ratio"}


def test_analyze_cli_writes_json(trained, tmp_path, capsys):
    out = tmp_path / "run" / "analysis.json"
    rc = main(["analyze", "--checkpoint", str(trained["checkpoint"]), "--base-features", str(trained["base"]),
               "--novel-features", str(trained["novel"]), "--out", str(out)])
    assert rc == 0
    written = json.loads(out.read_text())
    for key in ("base_accuracy", "base_accuracy_ci95", "base_discriminability", "novel_discriminability",
                "checkpoint", "n_base", "n_novel"):
        assert key in written
    assert "base accuracy 90.00" in capsys.readouterr().out


def test_analyze_accepts_a_selection_file(trained, tmp_path):
    selection = tmp_path / "selected_1shot.json"
    selection.write_text(json.dumps({"checkpoint": str(trained["checkpoint"]), "shot": 1}))
    assert analyze(selection, trained["base"], trained["novel"])["base_accuracy"] == pytest.approx(90.0)


def test_analyze_cli_bad_input(trained, tmp_path, capsys):
    out = str(tmp_path / "a.json")
    err = one_line_error(capsys, ["analyze", "--checkpoint", str(tmp_path / "missing.pt"), "--base-features",
                                   str(trained["base"]), "--novel-features", str(trained["novel"]), "--out", out])
    assert "checkpoint not found" in err
    err = one_line_error(capsys, ["analyze", "--checkpoint", str(trained["checkpoint"]), "--base-features",
                                   str(tmp_path / "nope.npz"), "--novel-features", str(trained["novel"]), "--out", out])
    assert "feature file not found" in err
    # novel features (3 classes) where base_holdout features (4 classes, the head's) belong
    err = one_line_error(capsys, ["analyze", "--checkpoint", str(trained["checkpoint"]), "--base-features",
                                   str(trained["novel"]), "--novel-features", str(trained["novel"]), "--out", out])
    assert "base_holdout" in err
    wrong_keys = tmp_path / "wrong.npz"
    np.savez(wrong_keys, x=np.zeros((2, 2)))
    err = one_line_error(capsys, ["analyze", "--checkpoint", str(trained["checkpoint"]), "--base-features",
                                   str(wrong_keys), "--novel-features", str(trained["novel"]), "--out", out])
    assert "missing arrays" in err
    assert not (tmp_path / "a.json").exists()


def test_analyze_head_wider_than_the_base_classes(trained, tmp_path):
    """mmfewshot's mini-ImageNet head has 100 outputs for 64 base classes: base accuracy is still defined
    (unused rows compete in the argmax); features with more classes than the head are refused."""
    with np.load(trained["base"]) as bank:
        keep = bank["labels"] < 3
        np.savez(tmp_path / "three.npz", features=bank["features"][keep], labels=bank["labels"][keep],
                 class_names=bank["class_names"][:3])
    ckpt = torch.load(trained["checkpoint"], weights_only=True)
    torch.save({**ckpt, "base_class_names": ["b0", "b1", "b2"]}, tmp_path / "wide.pt")  # 3 classes, 4 outputs
    result = analyze(tmp_path / "wide.pt", tmp_path / "three.npz", trained["novel"])
    assert result["n_base"] == int(keep.sum()) and result["base_accuracy"] == pytest.approx(100 * 13 / 15)
    with np.load(trained["base"]) as bank:
        np.savez(tmp_path / "five.npz", features=bank["features"], labels=bank["labels"],
                 class_names=np.array([f"b{k}" for k in range(5)]))
    ckpt.pop("base_class_names")
    torch.save(ckpt, tmp_path / "unnamed.pt")  # without class names only the count can be checked
    with pytest.raises(UserError, match="5 classes, but the checkpoint's head has only 4"):
        analyze(tmp_path / "unnamed.pt", tmp_path / "five.npz", trained["novel"])


def test_the_analyze_verb_refuses_non_finite_features(trained, tmp_path, capsys):
    bank = dict(np.load(trained["novel"]))
    bank["features"][7, 0] = np.nan
    np.savez(tmp_path / "novel_nan.npz", **bank)
    out = tmp_path / "analysis.json"
    err = one_line_error(capsys, ["analyze", "--checkpoint", str(trained["checkpoint"]), "--base-features",
                                  str(trained["base"]), "--novel-features", str(tmp_path / "novel_nan.npz"),
                                  "--out", str(out)])
    assert "novel_nan.npz: 1 of 18 feature rows hold NaN or Inf (first: row 7, class 1 (n1))" in err
    assert not out.exists()

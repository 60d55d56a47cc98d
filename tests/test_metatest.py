import math

import numpy as np
import pytest
import torch
from reference_metatest import recompute_accuracies, recompute_coefficients, reference_accuracies

from negmargin import metatest
from negmargin.episodes import batch_schedule, initial_head_weights, sample_episodes
from negmargin.metatest import basis_products, finetune_and_predict, finetune_coefficients, run_metatest
from negmargin.options import FinetuneConfig
from negmargin.stats import ci95


def _bank(classes=12, per_class=25, dim=32, seed=0, spread=1.2):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 1, dim))
    features = np.maximum(centres + spread * rng.normal(size=(classes, per_class, dim)), 0).reshape(-1, dim)
    labels = np.repeat(np.arange(classes), per_class)
    perm = rng.permutation(len(labels))  # labels need not be sorted
    return features[perm].astype(np.float32), labels[perm]


def test_ci_formula_is_population_std():
    accuracies = np.array([60.0, 80.0, 100.0, 80.0])
    std = math.sqrt(((-20) ** 2 + 0 + 20**2 + 0) / 4)  # ddof=0
    assert ci95(accuracies) == pytest.approx(1.96 * std / 2)


def test_sampler_distinct_classes_disjoint_and_deterministic():
    features, labels = _bank(classes=9, per_class=21)
    episodes = sample_episodes(labels, 5, 5, 15, 200, seed=7)
    again = sample_episodes(labels, 5, 5, 15, 200, seed=7)
    other = sample_episodes(labels, 5, 5, 15, 200, seed=8)
    assert episodes.digest() == again.digest() != other.digest()
    for e in range(200):
        assert len(set(episodes.classes[e])) == 5
        support, query = episodes.support[e], episodes.query[e]
        assert not set(support) & set(query) and len(set(support)) == 25 and len(set(query)) == 75
        np.testing.assert_array_equal(labels[support], np.repeat(episodes.classes[e], 5))
        np.testing.assert_array_equal(labels[query], np.repeat(episodes.classes[e], 15))


def test_sampler_pinned_episode():
    """Episodes are a function of the seed alone: pin one so a change of sampling shows up here."""
    labels = np.repeat(np.arange(6), 20)
    episodes = sample_episodes(labels, 5, 1, 15, 3, seed=0)
    assert episodes.digest() == sample_episodes(labels.copy(), 5, 1, 15, 3, seed=0).digest()
    assert episodes.classes.shape == (3, 5) and episodes.support.shape == (3, 5) and episodes.query.shape == (3, 75)
    assert episodes.digest() == PINNED_DIGEST


PINNED_DIGEST = "953681c4497e882e730b5d6602248f866f95e26de81ee93aa332831defb7cc94"


def test_sampler_rejects_small_classes():
    from negmargin.errors import UserError

    labels = np.repeat(np.arange(6), 10)
    with pytest.raises(UserError, match="at least 16 images"):
        sample_episodes(labels, 5, 1, 15, 10, seed=0)


def test_batch_schedule_ragged_last_batch():
    labels = np.repeat(np.arange(6), 20)
    episodes = sample_episodes(labels, 5, 1, 15, 4, seed=0)
    positions, mask = batch_schedule(episodes, steps=5, batch_size=4)
    assert mask[0].sum(1).tolist() == [4, 1, 4, 1, 4]  # 5 supports: batches of 4, then 1, per pass
    for e in range(4):
        first_pass = np.concatenate([positions[e, 0][mask[e, 0]], positions[e, 1][mask[e, 1]]])
        assert sorted(first_pass.tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("shots", [1, 5])
def test_batched_equals_reference(shots):
    features, labels = _bank()
    episodes = sample_episodes(labels, 5, shots, 15, 24, seed=3)
    config = FinetuneConfig(steps=60 if shots == 1 else 90)
    init = initial_head_weights(episodes, features.shape[1])
    positions, mask = batch_schedule(episodes, config.steps, config.batch_size)
    bank = torch.from_numpy(features).double()
    batched = finetune_and_predict(bank, episodes, config, init)
    reference = reference_accuracies(bank, episodes, config, init, positions, mask)
    np.testing.assert_allclose(batched, reference, atol=1e-9)
    assert 20 < batched.mean() < 100  # a real task, neither trivial nor broken


@pytest.mark.parametrize("ways,shots", [(5, 1), (5, 5), (20, 1), (20, 5)])
def test_incremental_equals_recompute(ways, shots, monkeypatch):
    """The incremental program against the one that recomputes C·G at every step, over several passes."""
    features, labels = _bank(classes=24, dim=48, seed=2, spread=1.5)
    episodes = sample_episodes(labels, ways, shots, 15, 6, seed=4)
    config = FinetuneConfig(steps=150)
    init = initial_head_weights(episodes, features.shape[1])
    bank = torch.from_numpy(features).double()
    grams, _ = basis_products(
        bank, torch.from_numpy(episodes.support), torch.from_numpy(episodes.query), torch.from_numpy(init)
    )
    positions, mask = (torch.from_numpy(a) for a in batch_schedule(episodes, config.steps, config.batch_size))
    incremental = finetune_coefficients(grams, positions, mask, ways, shots, config)
    recomputed = recompute_coefficients(grams, positions, mask, ways, shots, config)
    assert recomputed[:, :, ways:].abs().max() > 0.1  # the heads took up support features
    torch.testing.assert_close(incremental, recomputed, rtol=0, atol=1e-9 * recomputed.abs().max().item())
    monkeypatch.setattr(metatest, "MIN_FINETUNE_BLOCK", 3)
    monkeypatch.setattr(metatest, "FINETUNE_STATE_BYTES", 0)
    threads = torch.get_num_threads()
    accuracies = finetune_and_predict(bank, episodes, config, init, chunk=4)  # products by 4, blocks of 3
    assert torch.get_num_threads() == threads  # the single-threaded fine-tuning restores the count
    np.testing.assert_allclose(accuracies, recompute_accuracies(bank, episodes, config, init), atol=1e-9)
    assert 100 / ways + 10 < accuracies.mean() < 100  # a real task, neither trivial nor broken


def test_float32_batched_matches_reference_mean():
    features, labels = _bank(seed=1)
    episodes = sample_episodes(labels, 5, 5, 15, 16, seed=1)
    config = FinetuneConfig(steps=70)
    init = initial_head_weights(episodes, features.shape[1])
    positions, mask = batch_schedule(episodes, config.steps, config.batch_size)
    bank = torch.from_numpy(features)
    batched = finetune_and_predict(bank, episodes, config, init)
    reference = reference_accuracies(bank, episodes, config, init, positions, mask)
    assert abs(batched.mean() - reference.mean()) < 0.5


def test_run_metatest_record():
    features, labels = _bank()
    record = run_metatest(features, labels, ways=5, shots=1, queries=15, episodes=30, seed=0)
    assert record["finetune"] == {"steps": 150, "lr": 0.01, "momentum": 0.9, "dampening": 0.9,
                                  "weight_decay": 0.001, "batch_size": 4, "temperature": 5.0}
    assert len(record["episode_accuracies"]) == 30
    assert record["accuracy_mean"] == pytest.approx(np.mean(record["episode_accuracies"]), abs=1e-3)
    assert record["accuracy_ci95"] == pytest.approx(ci95(np.array(record["episode_accuracies"])), abs=1e-3)
    assert record == {**run_metatest(features, labels, episodes=30, seed=0), "elapsed_s": record["elapsed_s"]}
    assert FinetuneConfig().for_shots(5).steps == 600


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_metatest_verb_refuses_non_finite_features(tmp_path, capsys, bad):
    """NaN or Inf features used to give an accuracy (argmax of NaN cosines picks class 0) and exit 0."""
    from cli_helpers import one_line_error

    from negmargin.io import write_npz

    features, labels = _bank(classes=6, per_class=20)
    order = np.argsort(labels, kind="stable")
    features, labels = features[order], labels[order]
    features[45, 3] = bad  # row 45: the third class
    write_npz(tmp_path / "novel.npz", features=features, labels=labels,
              class_names=np.array([f"c{k}" for k in range(6)]))
    err = one_line_error(capsys, ["metatest", "--features", str(tmp_path / "novel.npz"), "--episodes", "10",
                                  "--out", str(tmp_path / "r.json")])
    assert "novel.npz: 1 of 120 feature rows hold NaN or Inf (first: row 45, class 2 (c2))" in err
    assert not (tmp_path / "r.json").exists()


def test_the_metatest_verb_names_the_classes_it_leaves_out_and_why(tmp_path, capsys):
    """Classes with fewer than shots + queries images cannot be drawn: the result JSON lists them (label, name,
    images, why) and a warning says so; they used to disappear without a word."""
    import json

    from negmargin.cli import main
    from negmargin.io import write_npz

    features, labels = _bank(classes=7, per_class=20)
    keep = (labels != 6) | (np.cumsum(labels == 6) <= 10)  # class 6 keeps 10 of its 20 images
    names = np.array([f"c{k}" for k in range(8)])  # class 7 has a name but no image at all
    write_npz(tmp_path / "novel.npz", features=features[keep], labels=labels[keep], class_names=names)
    out = tmp_path / "r.json"
    assert main(["metatest", "--features", str(tmp_path / "novel.npz"), "--shots", "1", "--queries", "15",
                 "--episodes", "20", "--out", str(out)]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == ["negmargin metatest: warning: 2 of 8 classes have fewer than 1 shots + 15 queries = 16 "
                       "images and are left out of every episode (images in brackets): c6 (10), c7 (0); the result "
                       "JSON lists them under excluded_classes"]
    record = json.loads(out.read_text())
    assert record["classes_total"] == 8 and record["classes_used"] == 6
    assert record["excluded_classes"] == [
        {"label": 6, "name": "c6", "images": 10, "reason": "10 images, fewer than 1 shots + 15 queries = 16"},
        {"label": 7, "name": "c7", "images": 0, "reason": "0 images, fewer than 1 shots + 15 queries = 16"},
    ]
    # Nothing left out (every named class has 1 + 9 images or more): no warning, an empty list.
    write_npz(tmp_path / "seven.npz", features=features[keep], labels=labels[keep], class_names=names[:7])
    assert main(["metatest", "--features", str(tmp_path / "seven.npz"), "--shots", "1", "--queries", "9",
                 "--episodes", "5", "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads(out.read_text())["excluded_classes"] == []

"""The CLI as a user runs it: a fresh subprocess, real files, one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest


def negmargin(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "negmargin", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def test_help_lists_the_verbs():
    out = negmargin("--help").stdout
    for verb in ("prepare", "train", "select", "features", "metatest"):
        assert verb in out
    assert "--val-every" in negmargin("train", "--help").stdout


def test_select_follows_the_first_validation_shot_in_any_order(tiny_omniglot, tmp_path):
    """metatest.shots [5, 1]: the workflow validates on 5 first; `shared` must serve 1-shot from the 5-shot
    choice (it used to look for a 1-shot validation), `per-shot` from the 1-shot one."""
    train = tmp_path / "train"
    negmargin("train", "--data", tiny_omniglot, "--out", train, "--epochs", 1, "--batch-size", 32, "--val-every", 1,
              "--val-episodes", 3, "--val-shots", 5, 1, "--warmup-iters", 2, "--device", "cpu")
    for mode, expected in (("shared", 5), ("per-shot", 1)):
        out = tmp_path / f"{mode}.json"
        negmargin("select", "--train-dir", train, "--shot", 1, "--mode", mode, "--out", out)
        chosen = json.loads(out.read_text())
        assert chosen["val_shot"] == expected and chosen["checkpoint"].endswith(f"best_{expected}shot.pt"), mode


def test_prepare_train_features_metatest(tiny_omniglot, tmp_path):
    run = tmp_path / "run"
    negmargin("train", "--data", tiny_omniglot, "--out", run / "train", "--epochs", 1, "--batch-size", 32,
              "--val-every", 1, "--val-episodes", 5, "--warmup-iters", 2, "--margin", -0.05, "--device", "cpu")
    negmargin("select", "--train-dir", run / "train", "--shot", 5, "--out", run / "selected_5shot.json")
    selection = json.loads((run / "selected_5shot.json").read_text())
    assert selection["val_shot"] == 1 and selection["checkpoint"].endswith("best_1shot.pt")
    negmargin("features", "--checkpoint", run / "selected_5shot.json", "--split", tiny_omniglot / "novel",
              "--out", run / "novel.npz")
    with np.load(run / "novel.npz") as bank:
        assert bank["features"].shape == (240, 64) and bank["features"].dtype == np.float32
        assert bank["labels"].tolist() == sorted(bank["labels"].tolist()) and len(bank["class_names"]) == 12
    for shots in (1, 5):
        negmargin("metatest", "--features", run / "novel.npz", "--ways", 5, "--shots", shots, "--queries", 15,
                  "--episodes", 20, "--episodes-seed", 0, "--out", run / f"m{shots}.json")
        record = json.loads((run / f"m{shots}.json").read_text())
        assert record["shots"] == shots and len(record["episode_accuracies"]) == 20
        assert record["finetune"]["steps"] == (150 if shots == 1 else 600)
        assert 20.0 < record["accuracy_mean"] <= 100.0 and record["features_sha256"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "no/such/dir", "--out", "x"], "no/such/dir/base: not a prepared split"),
        (["metatest", "--features", "missing.npz", "--out", "r.json"], "missing.npz: feature file not found"),
        (["features", "--checkpoint", "missing.pt", "--split", "s", "--out", "f.npz"], "missing.pt: checkpoint not found"),
        (["select", "--train-dir", "nowhere", "--shot", "1", "--out", "s.json"], "nowhere/train.json: file not found"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path):
    result = negmargin(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_features_file_and_wrong_arch(tiny_omniglot, tmp_path):
    np.savez(tmp_path / "f.npz", feats=np.zeros((3, 2)))
    result = negmargin("metatest", "--features", tmp_path / "f.npz", "--out", tmp_path / "r.json", check=False)
    assert result.returncode == 2 and "missing arrays features, labels" in result.stderr
    assert not (tmp_path / "r.json").exists()
    # a checkpoint of another architecture's shape: one clear line
    import torch

    from negmargin.models import Classifier, ModelSpec

    spec = ModelSpec("conv4", 1, 28, 12)
    state = Classifier(spec).state_dict()
    torch.save({"format": "negmargin-ckpt/1", "model_spec": {**spec.to_dict(), "arch": "resnet12"}, "model": state},
               tmp_path / "wrong.pt")
    result = negmargin("features", "--checkpoint", tmp_path / "wrong.pt", "--split", tiny_omniglot / "novel",
                       "--out", tmp_path / "f2.npz", check=False)
    assert result.returncode == 2 and "weights do not fit a resnet12 model" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "f2.npz").exists()


def test_no_help_text_shows_an_escaped_percent_sign(capsys):
    """argparse %-formats option help, so a help text must say "95%" through "95%%": every verb's --help (and
    every `prepare` sub-command's) must print a plain "%", never "%%"."""
    from negmargin.cli import build_parser
    from negmargin.datasets import DATASETS

    verbs = [action for action in build_parser()._subparsers._group_actions[0].choices]
    commands = [[verb] for verb in verbs if verb != "prepare"] + [["prepare", s.command] for s in DATASETS.values()]
    for command in commands:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--help"])
        text = capsys.readouterr().out
        assert "usage:" in text and "%%" not in text, command

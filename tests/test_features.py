"""negmargin.features: backbone features of a split, in split order, from a checkpoint or a selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from negmargin.data.store import load_split
from negmargin.errors import UserError
from negmargin.features import extract_features, features_of_checkpoint
from negmargin.io import load_features, torch_save, write_json
from negmargin.models import CHECKPOINT_FORMAT, Classifier, ModelSpec


def _checkpoint(path, dataset="omniglot"):
    torch.manual_seed(0)
    spec = ModelSpec("conv4", 1, 28, 12)
    model = Classifier(spec)
    torch_save(path, {"format": CHECKPOINT_FORMAT, "model_spec": spec.to_dict(), "model": model.state_dict(),
                      "config": {"dataset": dataset, "channels_last": True}})
    return model


def test_features_match_the_backbone_in_eval_mode(tiny_omniglot, tmp_path):
    model = _checkpoint(tmp_path / "m.pt")
    write_json(tmp_path / "selected.json", {"checkpoint": "m.pt"})
    from negmargin.models import resolve_checkpoint

    info = features_of_checkpoint(resolve_checkpoint(tmp_path / "selected.json"), tiny_omniglot / "novel",
                                  tmp_path / "f.npz", device="cpu", batch_size=50)
    bank = load_features(tmp_path / "f.npz")
    split = load_split(tiny_omniglot / "novel")
    assert info["features"] == (240, 64) and bank["labels"].tolist() == split.labels.tolist()
    model.eval()
    with torch.no_grad():
        first = model.backbone((torch.from_numpy(split.images[:3].copy()).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)
    np.testing.assert_allclose(bank["features"][:3], first.numpy(), atol=1e-4)
    assert model.backbone.training is False  # extract_features restores the mode it found
    model.backbone.train()
    extract_features(model.backbone, split, 28, batch_size=100)
    assert model.backbone.training


def test_a_checkpoint_of_another_dataset_is_refused(tiny_omniglot, tmp_path):
    _checkpoint(tmp_path / "cub.pt", dataset="cub")
    with pytest.raises(UserError, match="trained on cub, but .* is a split of omniglot"):
        features_of_checkpoint(tmp_path / "cub.pt", tiny_omniglot / "novel", tmp_path / "f.npz", device="cpu")
    assert not (tmp_path / "f.npz").exists()


def test_the_features_verb_refuses_non_finite_outputs_and_keeps_the_earlier_file(tiny_omniglot, tmp_path, capsys):
    """A diverged checkpoint (a NaN weight) gives NaN features: one line naming the checkpoint, the first image
    and the weight; the features written before from a good checkpoint stay as they were."""
    from cli_helpers import one_line_error

    from negmargin.cli import main

    _checkpoint(tmp_path / "good.pt")
    out = tmp_path / "novel.npz"
    argv = ["features", "--split", str(tiny_omniglot / "novel"), "--out", str(out), "--device", "cpu"]
    assert main(["features", "--checkpoint", str(tmp_path / "good.pt"), *argv[1:]]) == 0
    earlier = out.read_bytes()
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    weight = next(name for name in state["model"] if name.startswith("backbone") and name.endswith("weight"))
    state["model"][weight].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "diverged.pt")
    capsys.readouterr()
    err = one_line_error(capsys, ["features", "--checkpoint", str(tmp_path / "diverged.pt"), *argv[1:]])
    assert "diverged.pt: NaN or Inf features for 240 of 240 images" in err
    assert f"its weight {weight} holds NaN or Inf" in err
    assert out.read_bytes() == earlier

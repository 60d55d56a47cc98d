import math

import pytest
import torch

from negmargin.models import Classifier, ModelSpec, load_model
from negmargin.models.backbones import Conv4, ResNet12
from negmargin.models.heads import CosineMarginHead, SoftmaxMarginHead


@pytest.mark.parametrize(
    ("backbone", "channels", "size", "dim"),
    [(Conv4, 3, 84, 1600), (Conv4, 1, 28, 64), (ResNet12, 3, 84, 640), (ResNet12, 1, 28, 640), (Conv4, 5, 40, 64 * 2 * 2)],
)
def test_backbone_output_dims(backbone, channels, size, dim):
    model = backbone(in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, dim) and model.feature_dim(size) == dim


def test_resnet12_widths_and_activation():
    model = ResNet12()
    widths = [block.conv1.out_channels for block in model.blocks]
    assert widths == [64, 160, 320, 640]
    assert all(block.act.negative_slope == 0.1 for block in model.blocks)


def _head(cls, margin):
    head = cls(in_features=2, num_classes=3, temperature=10.0, margin=margin)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    return head


@pytest.mark.parametrize("margin", [-0.2, 0.0, 0.3])
def test_cosine_head_logits_by_hand(margin):
    head = _head(CosineMarginHead, margin)
    x = torch.tensor([[3.0, 4.0]])  # |x| = 5
    cos = [3 / 5, 4 / 5, -7 / (5 * math.sqrt(2))]
    expected = [10 * c for c in cos]
    expected[1] = 10 * (cos[1] - margin)  # target class 1
    torch.testing.assert_close(head(x, torch.tensor([1]))[0], torch.tensor(expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(head(x)[0], torch.tensor([10 * c for c in cos]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("margin", [-0.5, 0.0, 0.5])
def test_softmax_head_logits_by_hand(margin):
    head = _head(SoftmaxMarginHead, margin)
    x = torch.tensor([[3.0, 4.0]])
    raw = [3.0, 8.0, -7.0]  # W x
    shifted = [r - min(raw) for r in raw]  # [10, 15, 0]
    expected = [10 * s for s in shifted]
    expected[0] = 10 * (shifted[0] - margin)  # target class 0
    torch.testing.assert_close(head(x, torch.tensor([0]))[0], torch.tensor(expected), rtol=0, atol=1e-4)


def test_head_init_is_kaiming_uniform_a_sqrt5():
    torch.manual_seed(0)
    head = CosineMarginHead(400, 50, 10.0, 0.0)
    bound = 1 / math.sqrt(400)
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.95 * bound


def test_load_model_rejects_wrong_arch(tmp_path):
    from negmargin.errors import UserError

    spec = ModelSpec("conv4", 1, 28, 5)
    torch.save({"format": "negmargin-ckpt/1", "model_spec": spec.to_dict(), "model": Classifier(spec).state_dict()},
               tmp_path / "c.pt")
    model, _ = load_model(tmp_path / "c.pt")
    assert not model.training
    with pytest.raises(UserError, match="holds a conv4 model, but arch 'resnet12'"):
        load_model(tmp_path / "c.pt", arch="resnet12")
    bad = {"format": "negmargin-ckpt/1", "model_spec": {**spec.to_dict(), "arch": "resnet12"},
           "model": Classifier(spec).state_dict()}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="weights do not fit a resnet12 model"):
        load_model(tmp_path / "bad.pt")

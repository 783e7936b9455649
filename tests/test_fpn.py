"""FPN shapes/strides, TimmBackbone, and the plug-in into torchvision's detectors."""
import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign

import backbones as B

ALL = ("c2", "c3", "c4", "c5")


def _body(**kw):
    return B.resnet18(out_features=ALL, **kw)


@pytest.mark.parametrize(
    "top_block, names, strides",
    [
        ("maxpool", ["p2", "p3", "p4", "p5", "p6"], [4, 8, 16, 32, 64]),
        ("p6p7", ["p3", "p4", "p5", "p6", "p7"], [8, 16, 32, 64, 128]),
        (None, ["p2", "p3", "p4", "p5"], [4, 8, 16, 32]),
    ],
)
@pytest.mark.parametrize("norm", [None, "GN", "BN"])
def test_fpn_levels_shapes_and_strides(top_block, names, strides, norm):
    fpn = B.FPN(_body(), out_channels=64, top_block=top_block, norm=norm).eval()
    shapes = fpn.output_shape()
    assert list(shapes) == names and [s.stride for s in shapes.values()] == strides
    assert fpn.out_channels == 64 and fpn.size_divisibility == 32
    h, w = 96, 160
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, h, w))
    assert list(out) == names
    for name, spec in shapes.items():
        assert out[name].shape == (1, 64, -(-h // spec.stride), -(-w // spec.stride)), name


def test_fpn_reads_widths_from_the_backbone():
    fpn = B.FPN(B.resnet50(out_features=("c3", "c4", "c5"), base_channels=16), in_features=("c3", "c4", "c5"), out_channels=32)
    assert [b[0].in_channels for b in fpn.fpn.inner_blocks] == [128, 256, 512]
    assert list(fpn.output_shape()) == ["p3", "p4", "p5", "p6"]


def test_fpn_fuse_avg_halves_the_top_down_sum():
    torch.manual_seed(0)
    s = B.FPN(_body(), out_channels=32, top_block=None, fuse="sum").eval()
    a = B.FPN(_body(), out_channels=32, top_block=None, fuse="avg").eval()
    a.load_state_dict(s.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # The coarsest level has no top-down input, so both agree there and differ below.
        torch.testing.assert_close(s(x)["p5"], a(x)["p5"])
        assert not torch.allclose(s(x)["p2"], a(x)["p2"])


def test_fpn_keys_match_torchvision_backbone_with_fpn():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    tv = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
    ours = B.FPN(B.resnet50(out_features=ALL, norm="FrozenBN"))  # torchvision's default norm there
    assert set(tv.state_dict()) == set(ours.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_block": "p6"}, "top_block must be one of"),
        ({"norm": "LN"}, "norm must be one of"),
        ({"fuse": "max"}, "fuse must be one of"),
        ({"in_features": ("c2", "c9")}, "subset of the backbone"),
        ({"in_features": ("c4", "c3")}, "fine to coarse"),
        ({"norm": "GN", "out_channels": 40}, "divisible by 32"),
    ],
)
def test_fpn_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        B.FPN(_body(), **kwargs)
    with pytest.raises(ValueError, match="output_shape"):
        B.FPN(nn.Conv2d(3, 3, 1))


def test_fpn_as_torchvision_faster_rcnn_backbone():
    fpn = B.FPN(_body(), out_channels=64)
    levels = [n for n, s in fpn.output_shape().items() if s.stride <= 32]
    model = FasterRCNN(
        fpn, num_classes=3, box_roi_pool=MultiScaleRoIAlign(levels, 7, 2), min_size=128, max_size=192
    )
    images = [torch.rand(3, 120, 150), torch.rand(3, 100, 90)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert fpn.body.layer4[0].conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_timm_backbone_non_resnet_into_fpn():
    backbone = B.TimmBackbone("convnext_atto", out_features=("c3", "c4", "c5"))
    shapes = backbone.output_shape()
    assert [s.stride for s in shapes.values()] == [8, 16, 32]
    x = torch.randn(1, 3, 64, 96)
    out = backbone.eval()(x)
    assert [t.shape[1] for t in out.values()] == [s.channels for s in shapes.values()]
    fpn = B.FPN(backbone, in_features=("c3", "c4", "c5"), out_channels=32).eval()
    assert list(fpn(x)) == ["p3", "p4", "p5", "p6"]


def test_timm_backbone_checkpoint_and_errors(tmp_path):
    import timm

    ref = timm.create_model("resnet18").eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    backbone = B.TimmBackbone("resnet18", checkpoint=path).eval()
    ours = B.resnet18(out_features=ALL).eval()
    B.load_weights(ours, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)["c5"], ours(x)["c5"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown timm model"):
        B.TimmBackbone("not_a_model")
    with pytest.raises(ValueError, match="provides features"):
        B.TimmBackbone("resnet18", out_features=("c6",))
    with pytest.raises(ValueError, match="never downloads"):
        B.TimmBackbone("resnet18", pretrained=True)

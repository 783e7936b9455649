"""FPN shapes/strides, TimmBackbone, and the plug-in into torchvision's detectors."""
import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign

import backbones as B
from tools.reference_models import randomize_norm_stats

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


@pytest.mark.parametrize(
    "norm, cls",
    [("GN", nn.GroupNorm), ("FrozenBN", B.FrozenBatchNorm2d), (lambda c: nn.GroupNorm(8, c), nn.GroupNorm)],
)
def test_fpn_norm_is_built_as_for_resnet(norm, cls):
    fpn = B.FPN(_body(), out_channels=64, norm=norm).eval()
    blocks = [*fpn.fpn.inner_blocks, *fpn.fpn.layer_blocks]
    assert all(isinstance(b[1], cls) and b[0].bias is None for b in blocks)
    if cls is nn.GroupNorm:
        assert {b[1].num_groups for b in blocks} == {32 if norm == "GN" else 8}
    assert {k for k in fpn.state_dict() if k.startswith("fpn.inner_blocks.0.")} >= {
        "fpn.inner_blocks.0.0.weight", "fpn.inner_blocks.0.1.weight", "fpn.inner_blocks.0.1.bias"
    }
    with torch.no_grad():
        assert list(fpn(torch.randn(1, 3, 64, 64))) == ["p2", "p3", "p4", "p5", "p6"]


def test_fpn_norm_name_and_its_layer_give_the_same_model():
    from backbones.norm import NORM_LAYERS

    by_name = B.FPN(_body(), out_channels=64, norm="BN").eval()
    by_layer = B.FPN(_body(), out_channels=64, norm=NORM_LAYERS["BN"]).eval()
    randomize_norm_stats(by_name)
    by_layer.load_state_dict(by_name.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(by_name(x).values(), by_layer(x).values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _top_keys(fpn):
    return sorted(k for k in fpn.state_dict() if not k.startswith(("body.", "fpn.")))


@pytest.mark.parametrize(
    "name, block, keys",
    [
        ("maxpool", lambda: B.LastLevelMaxPool(), []),
        ("p6p7", lambda: B.LastLevelP6P7(64), ["top_block.p6.bias", "top_block.p6.weight", "top_block.p7.bias",
                                              "top_block.p7.weight"]),
    ],
)
def test_fpn_top_block_shortcut_builds_the_module(name, block, keys):
    by_name = B.FPN(_body(), out_channels=64, top_block=name).eval()
    by_module = B.FPN(_body(), out_channels=64, top_block=block()).eval()
    assert type(by_name.top_block) is type(by_module.top_block)
    # The keys of checkpoints written before top blocks were modules.
    assert _top_keys(by_name) == _top_keys(by_module) == keys
    assert by_name.output_shape() == by_module.output_shape()
    by_module.load_state_dict(by_name.state_dict())
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        a, b = by_name(x), by_module(x)
    assert list(a) == list(b) == list(by_name.output_shape())
    for level in a:
        torch.testing.assert_close(a[level], b[level], rtol=0, atol=0)


def test_fpn_top_blocks_compute_the_extra_levels_from_the_coarsest():
    x = torch.randn(1, 3, 96, 160)
    plain = B.FPN(_body(), out_channels=64, top_block=None).eval()
    maxpool = B.FPN(_body(), out_channels=64, top_block="maxpool").eval()
    maxpool.load_state_dict(plain.state_dict())
    retina = B.FPN(_body(), out_channels=64, top_block="p6p7").eval()
    retina_plain = B.FPN(_body(), ALL[1:], out_channels=64, top_block=None).eval()
    retina_plain.load_state_dict({k: v for k, v in retina.state_dict().items() if not k.startswith("top_block.")})
    with torch.no_grad():
        ref, out = plain(x), maxpool(x)
        for level in ref:
            torch.testing.assert_close(out[level], ref[level], rtol=0, atol=0)
        torch.testing.assert_close(out["p6"], ref["p5"][..., ::2, ::2], rtol=0, atol=0)
        ref, out = retina_plain(x), retina(x)
        for level in ref:
            torch.testing.assert_close(out[level], ref[level], rtol=0, atol=0)
        p6, p7 = retina.top_block.p6, retina.top_block.p7
        torch.testing.assert_close(out["p6"], p6(ref["p5"]))
        torch.testing.assert_close(out["p7"], p7(torch.relu(p6(ref["p5"]))))


class _AvgPoolTwice(B.TopBlock):
    """Two extra levels by 2x2 average pooling (a user-defined block)."""

    def output_shape(self, coarsest):
        return [B.ShapeSpec(coarsest.channels, coarsest.stride * k) for k in (2, 4)]

    def forward(self, coarsest):
        p6 = nn.functional.avg_pool2d(coarsest, 2, ceil_mode=True)
        return [p6, nn.functional.avg_pool2d(p6, 2, ceil_mode=True)]


def test_fpn_takes_a_user_top_block():
    fpn = B.FPN(_body(), ALL[2:], out_channels=32, top_block=_AvgPoolTwice()).eval()
    shapes = fpn.output_shape()
    assert list(shapes) == ["p4", "p5", "p6", "p7"] and [s.stride for s in shapes.values()] == [16, 32, 64, 128]
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 128, 128))
    assert [t.shape[-1] for t in out.values()] == [8, 4, 2, 1]


class _WrongWidth(B.TopBlock):
    def output_shape(self, coarsest):
        return [B.ShapeSpec(coarsest.channels * 2, coarsest.stride * 2)]


@pytest.mark.parametrize(
    "top_block, match",
    [
        (nn.MaxPool2d(1, 2), "top_block must be one of .* or a TopBlock module"),
        (B.LastLevelP6P7(32), r"LastLevelP6P7\(32\) takes 32 channels, got 64"),
        (_WrongWidth(), "out_channels=64"),
    ],
)
def test_fpn_bad_top_blocks(top_block, match):
    with pytest.raises(ValueError, match=match):
        B.FPN(_body(), out_channels=64, top_block=top_block)
    with pytest.raises(ValueError, match="stride >= 8"):
        B.FPN(B.resnet18(out_features=("c2",)), ("c2",), top_block="p6p7")


class _NoPadding(nn.Module):
    """Declares its features but not ``size_divisibility``."""

    def output_shape(self):
        return {"c2": B.ShapeSpec(64, 4)}


def test_backbone_protocol():
    body = _body()
    fpn = B.FPN(body)
    assert isinstance(body, B.Backbone) and isinstance(fpn, B.Backbone)
    assert body.size_divisibility == 0 and fpn.size_divisibility == 32
    assert not isinstance(_NoPadding(), B.Backbone) and not isinstance(nn.Conv2d(3, 3, 1), B.Backbone)
    with pytest.raises(ValueError, match="bottom_up must satisfy backbones.Backbone.*_NoPadding lacks size_divis"):
        B.FPN(_NoPadding(), ("c2",))
    with pytest.raises(ValueError, match="Conv2d lacks output_shape\\(\\) and size_divisibility"):
        B.FPN(nn.Conv2d(3, 3, 1))
    # The FPN pads for its coarsest input and for what the bottom-up model needs.
    body.size_divisibility = 48
    assert B.FPN(body).size_divisibility == 96


def test_detector_checks_the_backbone_protocol():
    import heads

    with pytest.raises(ValueError, match="backbone must satisfy backbones.Backbone.*lacks size_divisibility"):
        heads.FasterRCNN(_NoPadding(), num_classes=3)
    with pytest.raises(ValueError, match="out_channels"):
        heads.FasterRCNN(_body(), num_classes=3)


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

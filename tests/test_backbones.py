"""ResNet: declared shapes, options, freezing, checkpointing and argument errors."""
import copy

import pytest
import torch
from torch import nn
from torchvision.ops import DeformConv2d, FrozenBatchNorm2d

import backbones as B
from backbones.resnet import STAGE_NAMES
from tools.reference_models import max_rel_diff, randomize_norm_stats

ALL = ("c2", "c3", "c4", "c5")
FACTORY_NAMES = sorted(B.FACTORIES)


def _tiny(depth, **kw):
    """A narrow model: every option is exercised at a fraction of the cost."""
    kw.setdefault("base_channels", 8)
    return B.ResNet(depth, **kw)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"output_stride": 16},
        {"output_stride": 8},
        {"deep_stem": True, "avg_down": True},
        {"stride_in_1x1": True, "norm": "FrozenBN"},
        {"deform_stages": ("c3", "c5"), "zero_init_residual": True},
        {"drop_path_rate": 0.2},
    ],
    ids=["plain", "os16", "os8", "resnet_d", "msra_frozenbn", "deform", "droppath"],
)
def test_declared_shapes_match_outputs(depth, options):
    model = _tiny(depth, out_features=ALL, **options).eval()
    x = torch.randn(1, 3, 67, 45)
    with torch.no_grad():
        out = model(x)
    assert list(out) == list(ALL)
    for name, spec in model.output_shape().items():
        t = out[name]
        assert t.shape[1] == spec.channels
        expected = -(-67 // spec.stride), -(-45 // spec.stride)  # conv arithmetic with padding: ceil(H / stride)
        assert tuple(t.shape[-2:]) == expected, (name, t.shape, spec)


def test_paper_widths_and_strides():
    r18 = B.resnet18(out_features=ALL).output_shape()
    r50 = B.resnet50(out_features=ALL).output_shape()
    assert r18 == {n: B.ShapeSpec(c, s) for n, c, s in zip(ALL, (64, 128, 256, 512), (4, 8, 16, 32))}
    assert r50 == {n: B.ShapeSpec(c, s) for n, c, s in zip(ALL, (256, 512, 1024, 2048), (4, 8, 16, 32))}


def test_depth_counts_the_weighted_layers():
    """The paper's depth is the number of convolutions and fully connected layers on the main path (projection
    shortcuts excluded): ResNet-50 = stem + 16 blocks x 3 + fc."""
    for depth in (18, 34, 50, 101, 152):
        model = _tiny(depth, num_classes=10)
        main_path = [name for name, m in model.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name]
        assert len(main_path) == depth, depth


@pytest.mark.parametrize("name", FACTORY_NAMES)
def test_factories_build_classifiers_with_options(name):
    model = B.FACTORIES[name](num_classes=7, norm="GN")
    assert model.fc.out_features == 7
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_classifier_forward_and_subset_features():
    model = _tiny(50, num_classes=5).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    feats = _tiny(50, out_features=("c3", "c4")).eval()
    out = feats(torch.randn(1, 3, 64, 64))
    assert list(out) == ["c3", "c4"]
    # Stages after the last requested one and the classifier are not built.
    assert not hasattr(feats, "layer4") and not hasattr(feats, "fc")


def test_output_stride_dilations_match_torchvision():
    import torchvision

    for os_, dil in [(16, [False, False, True]), (8, [False, True, True])]:
        tv = torchvision.models.resnet50(replace_stride_with_dilation=dil)
        ours = B.resnet50(output_stride=os_)
        ours_modules = dict(ours.named_modules())
        for name, m in tv.named_modules():
            if isinstance(m, nn.Conv2d):
                mine = ours_modules[name]
                assert (mine.dilation, mine.stride, mine.padding) == (m.dilation, m.stride, m.padding), name
        out = B.resnet50(output_stride=os_, out_features=ALL, base_channels=8).output_shape()
        assert out["c5"].stride == os_


def test_frozen_stages_exact_trainable_set_and_no_gradient():
    for k in range(6):
        model = _tiny(18, out_features=ALL, frozen_stages=k)
        frozen_prefixes = (["conv1.", "bn1."] if k >= 1 else []) + [f"layer{i}." for i in range(1, k)]
        for name, p in model.named_parameters():
            assert p.requires_grad == (not name.startswith(tuple(frozen_prefixes))), (k, name)
    model = _tiny(18, out_features=ALL, frozen_stages=2).train()
    assert not model.bn1.training and not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    before = copy.deepcopy(model.layer1.state_dict())
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is None for p in model.layer1.parameters())
    assert model.layer2[0].conv1.weight.grad is not None
    # Frozen norms stay in eval mode: their running statistics do not move.
    assert all(torch.equal(before[k], v) for k, v in model.layer1.state_dict().items())


def test_norm_eval_keeps_statistics_fixed():
    model = _tiny(18, out_features=ALL, norm_eval=True).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(stats[k], model.state_dict()[k]) for k in stats)
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("norm, cls", [("FrozenBN", FrozenBatchNorm2d), ("SyncBN", nn.SyncBatchNorm), ("GN", nn.GroupNorm)])
def test_norm_choices(norm, cls):
    model = B.resnet18(out_features=ALL, norm=norm)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, cls) for m in norms)
    if norm == "GN":
        assert norms[0].num_groups == 32
    # A callable is accepted too (modules passed in, not looked up by string).
    custom = B.resnet18(norm=lambda c: nn.BatchNorm2d(c, momentum=0.01))
    assert custom.bn1.momentum == 0.01


def test_folded_norm_equals_two_step_forward():
    """FrozenBN and eval-mode BN are folded into the convolutions; the result equals conv then norm."""
    from backbones.norm import conv_norm

    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    for norm in (randomize_norm_stats(nn.BatchNorm2d(16)).eval(), randomize_norm_stats(FrozenBatchNorm2d(16))):
        x = torch.randn(2, 8, 9, 9)
        torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)), rtol=1e-5, atol=1e-5)
    bn = nn.BatchNorm2d(16).train()
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(conv_norm(conv, bn, x), nn.BatchNorm2d(16).train()(conv(x)))


def _saved_by_backward(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("size, folds", [(9, True), (2, False)])
def test_fold_only_where_output_outnumbers_weight(size, folds):
    """FrozenBN training: large outputs fold the norm into the convolution; where the output is smaller than the
    weight (deep stages, small images) the norm runs on the activations. Neither keeps a rescaled copy of the weight
    for the backward. Both equal conv then norm."""
    from backbones.norm import conv_norm

    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)  # 1152 weights; outputs: 2592 (9x9) or 64 (2x2)
    norm = randomize_norm_stats(FrozenBatchNorm2d(16))
    # channels_last, as every convolution after the stem sees it. (For an NCHW input conv_norm passes a channels_last
    # copy of the weight, so that the output is channels_last; for the stem's 3-channel weight that copy is 37 KB.)
    x = torch.randn(2 if folds else 1, 8, size, size).contiguous(memory_format=torch.channels_last)
    out = None

    def forward():
        nonlocal out
        out = conv_norm(conv, norm, x)

    saved = _saved_by_backward(forward)
    assert ("ScaledWeightConv" in type(out.grad_fn).__name__) == folds
    assert not [t for t in saved if t.shape == conv.weight.shape and t.data_ptr() != conv.weight.data_ptr()]
    torch.testing.assert_close(out, norm(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups, stride, dilation", [(1, 1, 1), (4, 2, 1), (2, 1, 2)])
def test_folded_conv_gradients_equal_two_step(groups, stride, dilation):
    """Gradients through the fold (input, conv weight, and an eval-mode BatchNorm's affine parameters) equal those
    of conv then norm, in float64."""
    from backbones.norm import conv_norm

    conv = nn.Conv2d(8, 16, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=True).double()
    bn = randomize_norm_stats(nn.BatchNorm2d(16)).double().eval()
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 16, 12 // stride, 12 // stride, dtype=torch.float64)
    params = [x, conv.weight, conv.bias, bn.weight, bn.bias]

    folded = conv_norm(conv, bn, x)
    assert "ScaledWeightConv" in type(folded.grad_fn).__name__
    ours = torch.autograd.grad(folded, params, grad)
    reference = torch.autograd.grad(bn(conv(x)), params, grad)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def test_folded_conv_trains_under_bfloat16_autocast():
    """Under autocast the folded convolution runs in bfloat16 forward and backward, and each gradient comes back
    in its parameter's dtype, close to the float32 gradients."""
    from backbones.norm import conv_norm

    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    norm = randomize_norm_stats(FrozenBatchNorm2d(16))
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 16, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_norm(conv, norm, x)
    assert "ScaledWeightConv" in type(out.grad_fn).__name__ and out.dtype == torch.bfloat16
    ours = torch.autograd.grad(out, [x, conv.weight], grad)
    reference = torch.autograd.grad(norm(conv(x)), [x, conv.weight], grad)
    for a, b in zip(ours, reference):
        assert a.dtype == torch.float32
        assert max_rel_diff(b, a) < 0.05


def test_training_keeps_no_copy_of_the_batch_and_no_pooling_indices():
    """In training the stem keeps the caller's NCHW batch for its weight gradient (not a channels_last copy) and
    the max-pool keeps no int64 indices; the features are channels_last all the same."""
    model = _tiny(18, out_features=ALL).train()
    x = torch.randn(2, 3, 32, 32)
    features = {}

    def forward():
        features.update(model(x))

    saved = _saved_by_backward(forward)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    assert not [t for t in saved if t.shape == x.shape and t.data_ptr() != x.data_ptr()]
    assert not [t for t in saved if t.dtype == torch.int64 and t.dim() == 4]
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features.values())


@pytest.mark.parametrize("channels_last", [False, True])
def test_stem_max_pool_gradient_equals_max_pool2d(channels_last):
    """The max-pool that finds its argmax again in the backward gives max_pool2d's gradient, ties included."""
    x = torch.randn(2, 4, 15, 17, dtype=torch.float64)
    x[:, :, 4:8, 4:9] = 1.0  # a plateau: every window over it has tied maxima
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 4, 8, 9, dtype=torch.float64)
    out = B.resnet.StemMaxPool(3, 2, 1)(ours)
    assert "MaxPoolRecompute" in type(out.grad_fn).__name__
    out.backward(grad)
    expected = nn.functional.max_pool2d(reference, 3, 2, 1)
    expected.backward(grad)
    assert torch.equal(out, expected)
    assert torch.equal(ours.grad, reference.grad)


def test_channels_last_inputs_give_same_output():
    model = randomize_norm_stats(_tiny(50, out_features=ALL)).eval()
    x = torch.randn(2, 3, 75, 61)
    with torch.no_grad():
        a = model(x)
        b = model(x.contiguous(memory_format=torch.channels_last))
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_gradient_checkpointing_same_gradients_and_statistics():
    torch.manual_seed(0)
    ref = _tiny(50, out_features=ALL, drop_path_rate=0.1)
    ckpt = copy.deepcopy(ref)
    ckpt.grad_checkpointing = True
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for model in (ref, ckpt):
        model.train()
        torch.manual_seed(1)
        out = model(x)
        sum((v**2).mean() for v in out.values()).backward()
        outs.append(out)
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k])
    for (n, p1), p2 in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n)
    # The recomputation must not update BatchNorm statistics a second time.
    for (n, b1), b2 in zip(ref.named_buffers(), ckpt.buffers()):
        assert torch.equal(b1, b2), n


def test_drop_path_is_active_only_in_training():
    model = _tiny(18, num_classes=3, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)


def test_deformable_stages_start_as_plain_convolutions():
    plain = randomize_norm_stats(_tiny(50, out_features=ALL)).eval()
    deform = _tiny(50, out_features=ALL, deform_stages=("c4", "c5")).eval()
    B.load_weights(deform, plain.state_dict())  # offset predictors are absent from the checkpoint: allowed
    assert isinstance(deform.layer4[0].conv2, DeformConv2d) and not isinstance(deform.layer2[0].conv2, DeformConv2d)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), deform(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    # The offsets are trainable: a backward pass reaches them.
    deform.train()
    sum(v.sum() for v in deform(x).values()).backward()
    assert deform.layer4[0].conv2_offset.weight.grad is not None


def test_zero_init_residual():
    model = B.resnet50(zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in model.layer1)
    assert torch.count_nonzero(B.resnet50().layer1[0].bn3.weight) > 0


def test_resnext_and_wide_widths():
    x = B.resnext50_32x4d()
    assert x.layer1[0].conv2.groups == 32 and x.layer1[0].conv2.out_channels == 128
    w = B.wide_resnet50_2()
    assert w.layer1[0].conv2.out_channels == 128 and w.layer1[0].conv3.out_channels == 256


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 20}, r"depth must be one of \[18, 34, 50, 101, 152\]"),
        ({"depth": 18, "out_features": ("c6",)}, "out_features"),
        ({"depth": 18, "out_features": ("c4", "c3")}, "ordered subset"),
        ({"depth": 18, "out_features": ()}, "non-empty"),
        ({"depth": 18, "frozen_stages": 6}, r"frozen_stages must be in 0..5, got 6"),
        ({"depth": 18, "frozen_stages": -1}, "frozen_stages"),
        ({"depth": 18, "norm": "LN"}, r"norm must be one of \['BN', 'FrozenBN', 'GN', 'SyncBN'\]"),
        ({"depth": 18, "output_stride": 4}, r"output_stride must be one of \(8, 16, 32\)"),
        ({"depth": 18, "groups": 32}, "BasicBlock"),
        ({"depth": 50, "deform_stages": ("c1",)}, "deform_stages"),
        ({"depth": 50, "drop_path_rate": 1.5}, "drop_path_rate"),
        ({"depth": 50, "groups": 0}, "positive"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        B.ResNet(**kwargs)


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(1, 1, 32, 32),
        torch.randn(3, 32, 32),
        torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(1, 3, 0, 32),
        torch.zeros(0, 3, 32, 32),
        torch.zeros(1, 3, 32, 32, dtype=torch.float64),
    ],
    ids=["channels", "3d", "uint8", "zero_height", "empty_batch", "float64"],
)
def test_bad_inputs_raise_value_error(x):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        _tiny(18)(x)
    with pytest.raises(ValueError, match=r"TimmBackbone expects"):
        B.TimmBackbone("resnet18", out_features=("c3",))(x)


def test_float64_model_takes_float64_input():
    model = _tiny(18, num_classes=2).double().eval()
    assert model(torch.zeros(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64

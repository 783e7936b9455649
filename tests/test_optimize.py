"""optimize_for_inference: folded norms, untouched original, channels_last, bf16 tolerance, compile, detectors."""
import copy

import pytest
import torch
import torchvision
from timm.layers import BatchNormAct2d
from torch import nn

import backbones
from backbones import FPN, FrozenBatchNorm2d, ResNet, TimmBackbone
from backbones.optimize import BF16_TOLERANCE, bf16_supported, fold_norms_, optimize_for_inference
from tools.reference_models import max_rel_diff, randomize_norm_stats, torchvision_detector

FEATURES = ("c2", "c3", "c4", "c5")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny inputs: see conftest


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _NORM_TYPES)]


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if type(m) is nn.Conv2d]


def _assert_close(expected, actual, tol: float = 1e-4) -> None:
    if isinstance(expected, dict):
        assert list(expected) == list(actual)
        for key in expected:
            _assert_close(expected[key], actual[key], tol)
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert max_rel_diff(expected, actual) <= tol


def _run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(norm="FrozenBN"),
        dict(deep_stem=True, avg_down=True),
        dict(out_features=FEATURES, output_stride=16),
    ],
    ids=["bn", "frozen_bn", "deep_stem_avg_down", "features_dilated"],
)
def test_resnet_folded_equals_original(options: dict) -> None:
    model = randomize_norm_stats(ResNet(18, **options)).eval()
    x = torch.randn(2, 3, 64, 64)
    fast = optimize_for_inference(model)

    assert _norms(fast) == []  # every norm folded, the deep stem's inner ones included
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in _convs(fast) if c.weight.dim() == 4)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    _assert_close(_run(model, x), _run(fast, x))


def test_original_is_untouched() -> None:
    model = randomize_norm_stats(ResNet(18, norm="BN")).train()
    before = copy.deepcopy(model.state_dict())
    optimize_for_inference(model, bf16=True)

    assert model.training
    assert len(_norms(model)) == 20  # 1 stem + 8 blocks x 2 + 3 downsample norms, still in place
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert all(p.requires_grad for p in model.parameters())


def test_train_mode_model_is_folded_with_running_statistics() -> None:
    """The copy is put in eval mode first, so batch-dependent BN becomes foldable."""
    model = randomize_norm_stats(ResNet(18)).train()
    fast = optimize_for_inference(model)
    x = torch.randn(2, 3, 64, 64)
    assert _norms(fast) == []
    _assert_close(_run(model.eval(), x), _run(fast, x))


def test_group_norm_model_has_nothing_to_fold() -> None:
    model = ResNet(18, norm="GN", out_features=FEATURES).eval()
    fast = optimize_for_inference(model)
    assert fold_norms_(copy.deepcopy(model)) == 0
    assert sum(isinstance(m, nn.GroupNorm) for m in fast.modules()) == 20
    x = torch.randn(1, 3, 64, 64)
    _assert_close(_run(model, x), _run(fast, x))


@pytest.mark.parametrize("norm", [None, "BN", "GN"])
def test_fpn_folded_equals_original(norm) -> None:
    fpn = randomize_norm_stats(FPN(ResNet(18, out_features=FEATURES, norm="FrozenBN"), out_channels=64, norm=norm))
    fpn.eval()
    fast = optimize_for_inference(fpn)
    assert _norms(fast) == []
    if norm == "GN":
        assert sum(isinstance(m, nn.GroupNorm) for m in fast.modules()) == 8
    x = torch.randn(1, 3, 96, 128)
    _assert_close(_run(fpn, x), _run(fast, x))


def test_fold_counts_every_pair() -> None:
    # ResNet-50: stem + 16 blocks x 3 + 4 downsample projections.
    assert fold_norms_(ResNet(50, base_channels=8).eval()) == 1 + 16 * 3 + 4
    # Deep stem: two extra conv+norm pairs inside the stem's Sequential.
    assert fold_norms_(ResNet(18, deep_stem=True, base_channels=8).eval()) == 1 + 8 * 2 + 3 + 2
    # Train-mode BatchNorm depends on the batch: nothing may be folded.
    assert fold_norms_(ResNet(18, base_channels=8).train()) == 0


def test_timm_backbone_folded_equals_original() -> None:
    model = randomize_norm_stats(TimmBackbone("resnet18", out_features=("c3", "c5"))).eval()
    fast = optimize_for_inference(model)
    assert _norms(fast) == []
    x = torch.randn(1, 3, 64, 64)
    _assert_close(_run(model, x), _run(fast, x))


def test_fused_norm_activation_keeps_its_activation() -> None:
    """timm's BatchNormAct2d applies an activation after the norm: folding must keep it."""
    model = randomize_norm_stats(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU))).eval()
    fast = optimize_for_inference(model)
    assert isinstance(fast[1], nn.ReLU) and _norms(fast) == []
    x = torch.randn(2, 3, 16, 16)
    out = _run(fast, x)
    assert out.min() == 0  # the ReLU is still applied
    _assert_close(_run(model, x), out)


def test_preactivation_naming_is_not_folded() -> None:
    """A module outside the known ResNets may apply ``bn1`` before ``conv1``: no pair is assumed from names."""

    class PreAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1 = nn.BatchNorm2d(8)
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv1(self.bn1(x))

    model = randomize_norm_stats(PreAct()).eval()
    fast = optimize_for_inference(model)
    assert isinstance(fast.bn1, nn.BatchNorm2d)
    x = torch.randn(1, 8, 8, 8)
    _assert_close(_run(model, x), _run(fast, x))


@pytest.fixture
def force_bf16(monkeypatch):
    """bf16=True takes the bfloat16 path on any CPU (emulated where bf16 is not native: slower, same numerics)."""
    monkeypatch.setattr(backbones.optimize, "bf16_supported", lambda device: True)


@pytest.mark.usefixtures("force_bf16")
def test_bf16_within_documented_tolerance() -> None:
    model = randomize_norm_stats(ResNet(18, num_classes=10)).eval()
    fast = optimize_for_inference(model, bf16=True)
    assert next(fast.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, 3, 64, 64)
    expected, actual = _run(model, x), _run(fast, x)
    assert actual.dtype == torch.float32  # callers are unchanged
    error = max_rel_diff(expected, actual)
    assert 0 < error <= BF16_TOLERANCE  # really bf16 (not exact), yet within the documented tolerance

    features = randomize_norm_stats(FPN(ResNet(18, out_features=FEATURES), out_channels=32)).eval()
    fast = optimize_for_inference(features, bf16=True)
    expected, actual = _run(features, x), _run(fast, x)
    for key in expected:
        assert actual[key].dtype == torch.float32
        assert max_rel_diff(expected[key], actual[key]) <= BF16_TOLERANCE


def test_bf16_unsupported_warns_once_and_keeps_float32(monkeypatch) -> None:
    import backbones.optimize as optimize

    monkeypatch.setattr(optimize, "bf16_supported", lambda device: False)
    monkeypatch.setattr(optimize, "_warned_no_bf16", False)  # as in a fresh process
    model = randomize_norm_stats(ResNet(18, base_channels=8, num_classes=4)).eval()
    with pytest.warns(UserWarning, match="bf16=True ignored") as record:
        fast = optimize_for_inference(model, bf16=True)
        again = optimize_for_inference(model, bf16=True)
    assert len([w for w in record if "bf16=True ignored" in str(w.message)]) == 1  # once per process, not per call
    for copy_ in (fast, again):
        assert all(p.dtype == torch.float32 for p in copy_.parameters())
        assert "forward" not in vars(copy_)  # no bfloat16 boundary either
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_run(fast, x), _run(optimize_for_inference(model), x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "capabilities, mkldnn, expected",
    [
        (dict(avx512_bf16=False, amx_bf16=False, avx512_f=True), True, False),  # oneDNN emulates bf16 on AVX-512
        (dict(avx512_bf16=True, amx_bf16=False), True, True),
        (dict(avx512_bf16=False, amx_bf16=True), True, True),
        (dict(avx512_bf16=False, amx_bf16=False), False, False),  # AVX2 only
        (dict(architecture="aarch64"), True, True),  # no x86 flags: oneDNN's answer
        (dict(architecture="aarch64"), False, False),
    ],
    ids=["avx512-emulated", "avx512-bf16", "amx", "avx2", "arm-bf16", "arm"],
)
def test_bf16_supported_means_native_instructions(monkeypatch, capabilities, mkldnn, expected) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn)
    assert bf16_supported(torch.device("cpu")) is expected
    assert bf16_supported(torch.device("meta")) is False


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_bf16_supported_on_torch_without_get_capabilities(monkeypatch, avx512_bf16, amx, expected) -> None:
    import platform

    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert bf16_supported(torch.device("cpu")) is expected


def test_rejects_non_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        optimize_for_inference(lambda x: x)


def test_backbone_and_fpn_compile_as_one_graph() -> None:
    """What ``compile=True`` relies on: the folded ResNet + FPN (with the bf16 boundary) is one graph, no break."""
    torch._dynamo.reset()
    fpn = FPN(ResNet(18, base_channels=8, out_features=FEATURES), out_channels=16)
    fast = optimize_for_inference(fpn, bf16=bf16_supported(torch.device("cpu")))
    graphs = []

    def count_graphs(graph_module, example_inputs):  # a backend that records what dynamo hands over
        graphs.append(graph_module)
        return graph_module.forward

    fast.compile(fullgraph=True, backend=count_graphs)
    with torch.no_grad():
        out = fast(torch.randn(1, 3, 64, 64))
    assert len(graphs) == 1
    assert all(v.dtype == torch.float32 for v in out.values())


def test_compiled_resnet_equals_original() -> None:
    # Stem + first stage only: the compiled path is the same, and inductor's compile time grows with graph size.
    torch._dynamo.reset()
    model = randomize_norm_stats(ResNet(18, base_channels=8, out_features=("c2",))).eval()
    fast = optimize_for_inference(model, compile=True)
    x = torch.randn(2, 3, 32, 32)
    _assert_close(_run(model, x), _run(fast, x))


def test_compile_freezes_the_weights() -> None:
    """``compile=True`` traces with inductor's freezing (weights become prepacked constants). Observable: changing a
    weight in place after the first call no longer changes the output; without freezing the weights would stay graph
    inputs and the change would show."""
    torch._dynamo.reset()
    model = randomize_norm_stats(ResNet(18, base_channels=8, out_features=("c2",))).eval()
    fast = optimize_for_inference(model, compile=True)
    x = torch.randn(1, 3, 32, 32)
    before = fast(x)["c2"]
    assert before.grad_fn is None  # runs without autograd, as freezing requires
    with torch.no_grad():
        fast.conv1.weight.mul_(-1.0)
    after = fast(x)["c2"]
    torch.testing.assert_close(after, before)


heads = pytest.importorskip("heads")


def _detector(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = heads.build_detector(
        kind,
        "resnet18",
        num_classes=3,
        fpn_options=dict(out_channels=32),
        min_size=128,
        max_size=160,
        rpn_post_nms_top_n_test=200,
        box_score_thresh=0.0,
        box_detections_per_img=20,
    )
    randomize_norm_stats(model)
    with torch.no_grad():  # spread the class logits so float rounding cannot reorder near-tied detections
        model.roi_heads.box_predictor.cls_score.weight *= 5.0
    return model.eval()


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_detector_folded_equals_original(kind: str) -> None:
    model = _detector(kind)
    fast = optimize_for_inference(model)
    assert _norms(fast) == [] and len(_norms(model)) > 0
    images = [torch.rand(3, 120, 150), torch.rand(3, 100, 130)]
    with torch.no_grad():
        expected, actual = model(images), fast(images)
    for exp, act in zip(expected, actual):
        assert len(exp["boxes"]) > 0
        assert torch.equal(exp["labels"], act["labels"])
        torch.testing.assert_close(act["boxes"], exp["boxes"], atol=1e-2, rtol=0)
        torch.testing.assert_close(act["scores"], exp["scores"], atol=1e-4, rtol=0)
        if kind == "mask_rcnn":
            torch.testing.assert_close(act["masks"], exp["masks"], atol=1e-3, rtol=0)


def _dtypes_seen(modules: dict[str, nn.Module]) -> tuple[dict[str, list], list]:
    """Forward hooks recording the dtypes of each module's inputs and outputs; returns (record, handles)."""
    seen: dict[str, list] = {name: [] for name in modules}

    def dtypes(value) -> set:
        if isinstance(value, torch.Tensor):
            return {value.dtype} if value.is_floating_point() else set()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            return set().union(*(dtypes(v) for v in value)) if value else set()
        return set()

    def hook(name):
        return lambda module, args, out: seen[name].append((dtypes(args), dtypes(out)))

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    return seen, handles


@pytest.mark.usefixtures("force_bf16")
@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_detector_bf16_networks_and_float32_geometry(kind: str) -> None:
    """bf16=True: backbone, RPN head and RoI heads compute in bfloat16; anchors, proposals, box decoding, NMS and
    mask pasting see float32; the detections are float32."""
    model = _detector(kind)
    fast = optimize_for_inference(model, bf16=True)
    bf16_parts = {"backbone": fast.backbone, "rpn.head": fast.rpn.head, "box_head": fast.roi_heads.box_head,
                  "box_predictor": fast.roi_heads.box_predictor}
    if kind == "mask_rcnn":
        bf16_parts.update(mask_head=fast.roi_heads.mask_head, mask_predictor=fast.roi_heads.mask_predictor)
    for name, part in bf16_parts.items():
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}, name
    bf16 = {torch.bfloat16}
    seen, handles = _dtypes_seen({"rpn": fast.rpn, "anchors": fast.rpn.anchor_generator,
                                  "box_pool": fast.roi_heads.box_roi_pool, "roi_heads": fast.roi_heads})
    with torch.no_grad():
        detections = fast([torch.rand(3, 120, 150), torch.rand(3, 100, 130)])
    for handle in handles:
        handle.remove()
    assert seen["anchors"][0][1] == {torch.float32}  # anchors from bfloat16 maps are float32
    assert seen["rpn"][0] == (bf16, {torch.float32})  # bf16 maps in, float32 proposals out
    assert seen["box_pool"][0] == (bf16 | {torch.float32}, bf16)  # pools the bf16 maps directly, no float32 copy
    assert seen["roi_heads"][0][1] == {torch.float32}
    for image in detections:
        assert len(image["boxes"]) > 0
        assert image["boxes"].dtype == image["scores"].dtype == torch.float32
        if kind == "mask_rcnn":
            assert image["masks"].dtype == torch.float32
    # The original and the default path are untouched.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in optimize_for_inference(model).parameters())


@pytest.mark.usefixtures("force_bf16")
def test_detector_bf16_gives_other_poolers_float32_maps() -> None:
    """A pooler other than heads.ops' (torchvision's CPU kernel rejects bfloat16 maps) is given float32 maps."""
    model = _detector("faster_rcnn")
    model.roi_heads.box_roi_pool = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    fast = optimize_for_inference(model, bf16=True)
    with torch.no_grad():
        actual = fast([torch.rand(3, 120, 150)])
    assert actual[0]["boxes"].dtype == torch.float32 and len(actual[0]["boxes"]) > 0


@pytest.mark.usefixtures("force_bf16")
def test_detector_bf16_detections_agree_with_float32() -> None:
    """On a tiny calibrated torchvision reference: >= 90% of float32's confident detections are reproduced in
    bfloat16 (same label, IoU >= 0.9). Random-weight detectors amplify bfloat16's ~1-2% feature error (BENCHMARKS.md,
    bf16 without native support), so the comparison is over detections the reference is confident about."""
    options = dict(min_size=128, max_size=128, box_score_thresh=0.4)
    reference = torchvision_detector("faster_rcnn", backbone="resnet18", **options)
    model = heads.build_detector("faster_rcnn", "resnet18", num_classes=91, backbone_options=dict(
        norm="FrozenBN", frozen_stages=0), **options)
    heads.load_weights(model, reference.state_dict())
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 128, 128, generator=g), torch.rand(3, 96, 128, generator=g)]
    with torch.no_grad():
        expected = optimize_for_inference(model.eval())(images)
        actual = optimize_for_inference(model, bf16=True)(images)
    matched = total = 0
    for exp, act in zip(expected, actual):
        iou = torchvision.ops.box_iou(exp["boxes"], act["boxes"])
        same = exp["labels"][:, None] == act["labels"][None, :]
        matched += int(((iou >= 0.9) & same).any(1).sum())
        total += len(exp["boxes"])
        assert act["boxes"].dtype == act["scores"].dtype == torch.float32
    assert total >= 20 and matched >= 0.9 * total, f"{matched}/{total}"


def test_eager_fold_follows_weight_changes() -> None:
    """Eval-mode ``conv_norm`` folds on the fly: a change to a weight or statistic is seen at the next call."""
    model = randomize_norm_stats(ResNet(18, base_channels=8, num_classes=4)).eval()
    x = torch.randn(1, 3, 32, 32)
    before = _run(model, x)
    with torch.no_grad():
        model.bn1.running_var.mul_(3.0)  # in place: same tensor, new version
    changed = _run(model, x)
    model.layer1[0].conv1.weight = nn.Parameter(torch.randn_like(model.layer1[0].conv1.weight))  # new tensor
    replaced = _run(model, x)
    reference = model(x).detach()  # autograd on: folds afresh, no cache
    assert not torch.allclose(before, changed) and not torch.allclose(changed, replaced)
    _assert_close(reference, replaced, 1e-6)

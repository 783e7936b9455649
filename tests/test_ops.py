"""heads.ops: RoIAlign and MultiScaleRoIAlign against torchvision's reference ops."""
from collections import OrderedDict

import pytest
import torch
import torchvision

from heads import ops
from heads.ops import MultiScaleRoIAlign, roi_align


def _random_rois(n_images: int, per_image: int, height: int, width: int, scale: float, seed: int) -> torch.Tensor:
    """[K, 5] boxes in image coordinates: ordinary, tiny, degenerate and partly off-map ones."""
    g = torch.Generator().manual_seed(seed)
    k = n_images * per_image
    img_h, img_w = height / scale, width / scale
    centre = torch.rand(k, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.3 - 0.15 * torch.tensor([img_w, img_h])
    size = torch.rand(k, 2, generator=g) * torch.tensor([img_w, img_h]) * 0.7
    size[: k // 4] = torch.rand(k // 4, 2, generator=g) * 0.5 / scale  # sub-pixel boxes
    size[k // 4] = 0.0  # zero-size box
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    batch = torch.arange(n_images).repeat_interleave(per_image).float()[:, None]
    return torch.cat([batch, boxes], dim=1)


def _random_grad(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck_float64(sampling_ratio, aligned):
    feats = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.7, 4.1, 5.2], [1, 2.2, 1.1, 6.3, 3.9], [1, -1.4, -0.6, 2.6, 2.3], [0, 3.1, 3.2, 3.4, 3.35]],
        dtype=torch.float64,
    )
    out = roi_align(feats, rois, (3, 2), 1.0, sampling_ratio, aligned)
    assert type(out.grad_fn).__name__ == "_SparseRoIAlignBackward"
    # The backward keeps only the part of the sampling table it needs (no corner indices).
    assert out.grad_fn.table.index is None
    assert torch.autograd.gradcheck(
        lambda t: roi_align(t, rois, (3, 2), 1.0, sampling_ratio, aligned), (feats,), fast_mode=True
    )


@pytest.mark.parametrize(
    "sampling_ratio, aligned, spatial_scale",
    [(2, False, 1.0), (2, True, 0.25), (-1, False, 0.25), (-1, True, 1.0), (0, False, 1.0), (3, True, 0.5)],
)
def test_matches_torchvision_float32(sampling_ratio, aligned, spatial_scale):
    feats = torch.randn(3, 8, 24, 30)
    rois = _random_rois(3, 20, 24, 30, spatial_scale, seed=int(spatial_scale * 8) + sampling_ratio + 4)
    ours_in = feats.clone().requires_grad_()
    ref_in = feats.clone().requires_grad_()
    ours = roi_align(ours_in, rois, (7, 5), spatial_scale, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(ref_in, rois, (7, 5), spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad = _random_grad(ref)
    ours.backward(grad)
    ref.backward(grad)
    assert ref_in.grad.abs().sum() > 0
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
def test_samples_exactly_on_the_border(aligned):
    # One sample per bin at exactly -1 and exactly H / W: still inside torchvision's
    # valid range [-1, size], so they read the edge pixels with full weight.
    shift = 0.5 if aligned else 0.0
    rois = torch.tensor([[0, -2.0, -2.0, 0.0, 0.0], [0, 7.0, 5.0, 9.0, 7.0], [0, -2.0, 5.0, 0.0, 7.0]]) + shift
    rois[:, 0] = 0
    feats = torch.randn(1, 3, 6, 8)
    ours_in, ref_in = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ours = roi_align(ours_in, rois, 1, 1.0, 1, aligned)
    ref = torchvision.ops.roi_align(ref_in, rois, 1, 1.0, 1, aligned)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad)


def test_list_boxes_no_grad_and_channels_last():
    feats = torch.randn(2, 8, 16, 16)
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 14.0], [0.0, 0.0, 16.0, 16.0]]), torch.tensor([[3.0, 3.0, 5.0, 11.0]])]
    ref = torchvision.ops.roi_align(feats, boxes, 4, 1.0, 2)
    torch.testing.assert_close(roi_align(feats, boxes, 4, 1.0, 2), ref)

    cl = feats.clone().to(memory_format=torch.channels_last).requires_grad_()
    ref_in = feats.clone().requires_grad_()
    out = roi_align(cl, boxes, 4, 1.0, 2)
    torch.testing.assert_close(out, ref)
    grad = _random_grad(out)
    out.backward(grad)
    torchvision.ops.roi_align(ref_in, boxes, 4, 1.0, 2).backward(grad)
    torch.testing.assert_close(cl.grad, ref_in.grad, rtol=1e-5, atol=1e-5)
    assert cl.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32(dtype):
    # torchvision's CPU kernel rejects bfloat16; compare with its float32 result instead.
    feats = torch.randn(2, 8, 20, 20)
    rois = _random_rois(2, 10, 20, 20, 1.0, seed=3)
    low = feats.to(dtype).requires_grad_()
    ref_in = feats.clone().requires_grad_()
    out = roi_align(low, rois, 5, 1.0, 2, True)
    ref = torchvision.ops.roi_align(ref_in, rois, 5, 1.0, 2, True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=3e-2)
    grad = _random_grad(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    assert low.grad.dtype == dtype
    torch.testing.assert_close(low.grad.float(), ref_in.grad, rtol=2e-2, atol=3e-2)


def test_no_boxes():
    feats = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = roi_align(feats, torch.zeros(0, 5), 3, 1.0, 2)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_large_adaptive_table_falls_back_to_torchvision(monkeypatch):
    monkeypatch.setattr(ops, "_MAX_TABLE_ENTRIES", 1000)
    feats = torch.randn(1, 4, 40, 40, requires_grad=True)
    rois = torch.tensor([[0, 0.0, 0.0, 39.0, 37.0]])
    out = roi_align(feats, rois, 3, 1.0, -1)
    assert "SparseRoIAlign" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, torchvision.ops.roi_align(feats, rois, 3, 1.0, -1))


@pytest.mark.parametrize(
    "boxes, message",
    [(torch.zeros(3, 4), r"\[K, 5\]"), ([torch.zeros(2, 5)], r"boxes\[0\] must be \[L, 4\]"), ("boxes", "Tensor")],
)
def test_bad_boxes_raise_value_error(boxes, message):
    with pytest.raises(ValueError, match=message):
        roi_align(torch.randn(1, 2, 8, 8), boxes, 2)


def test_bad_input_rank_raises_value_error():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        roi_align(torch.randn(2, 8, 8), torch.zeros(1, 5), 2)


@pytest.mark.parametrize(
    "names, fallback, chunked",
    [
        (["p2", "p3", "p4", "p5"], False, False),
        (["p3"], False, False),
        (["p2", "p3", "p4", "p5"], True, False),
        (["p2", "p3", "p4", "p5"], False, True),
    ],
)
def test_multiscale_matches_torchvision(names, fallback, chunked, monkeypatch):
    if fallback:  # table over the size limit: torchvision's per-level pooling
        monkeypatch.setattr(ops, "_MAX_TABLE_ENTRIES", 1000)
    if chunked:  # both passes work 7 RoIs at a time, level by level (the last chunk of a level is partial)
        monkeypatch.setattr(ops, "_POOL_CHUNK_BYTES", 7 * 8 * 7 * 7 * 4)
        monkeypatch.setattr(ops, "_UNPOOL_CHUNK_BYTES", 7 * 8 * 7 * 7 * 4)
    g = torch.Generator().manual_seed(0)
    image_shapes = [(256, 256), (256, 224)]
    pyramid = OrderedDict(
        (f"p{level}", torch.randn(2, 8, 256 >> level, 256 >> level, generator=g)) for level in (2, 3, 4, 5)
    )
    if chunked:  # and channels-last maps, as an FPN gives them: pooled from views of the maps, not copies
        pyramid = OrderedDict((k, v.contiguous(memory_format=torch.channels_last)) for k, v in pyramid.items())
    boxes = []
    for _ in image_shapes:
        xy = torch.rand(40, 2, generator=g) * 200
        wh = torch.exp(torch.rand(40, 2, generator=g) * 5.3) + 1  # 2 .. 200 px
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=255)], dim=1))

    ours_feats = OrderedDict((k, v.clone().requires_grad_()) for k, v in pyramid.items())
    ref_feats = OrderedDict((k, v.clone().requires_grad_()) for k, v in pyramid.items())
    # canonical_scale 64 maps 2..200 px boxes onto all of p2..p5 of a 256 px image.
    ours = MultiScaleRoIAlign(names, 7, 2, canonical_scale=64)(ours_feats, boxes, image_shapes)
    ref = torchvision.ops.MultiScaleRoIAlign(names, 7, 2, canonical_scale=64)(ref_feats, boxes, image_shapes)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ("SparseRoIAlign" in type(ours.grad_fn).__name__) != fallback
    grad = _random_grad(ref)
    ours.backward(grad)
    ref.backward(grad)
    for name in names:
        assert ref_feats[name].grad.abs().sum() > 0, f"no box reached {name}"
        torch.testing.assert_close(ours_feats[name].grad, ref_feats[name].grad, rtol=1e-5, atol=1e-5)


def test_channels_last_output_same_values_and_gradients():
    """``channels_last=True`` (the mask pool) writes the same values with channels-last strides, and gives the
    same gradients, also when the gradient arriving from the head is channels-last."""
    g = torch.Generator().manual_seed(3)
    pyramid = {f"p{level}": torch.randn(2, 8, 128 >> level, 128 >> level, generator=g) for level in (2, 3, 4, 5)}
    xy = torch.rand(30, 2, generator=g) * 90
    boxes = [torch.cat([xy, xy + torch.rand(30, 2, generator=g) * 60 + 2], dim=1)[i::2] for i in range(2)]
    names = list(pyramid)
    outs, grads = [], []
    for channels_last in (False, True):
        feats = {k: v.clone().requires_grad_() for k, v in pyramid.items()}
        out = MultiScaleRoIAlign(names, 14, 2, canonical_scale=64, channels_last=channels_last)(
            feats, boxes, [(128, 128)] * 2)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        grad = _random_grad(out)
        out.backward(grad.contiguous(memory_format=torch.channels_last) if channels_last else grad)
        outs.append(out)
        grads.append([feats[k].grad for k in names])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)

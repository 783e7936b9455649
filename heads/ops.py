"""RoIAlign with a parallel CPU backward, and a MultiScaleRoIAlign that uses it.

torchvision's CPU RoIAlign kernels are serial loops over RoIs, and their backward is a large
part of a CPU detector training step. Here RoIAlign is written as a sparse linear map instead:

    out[bin, c] = sum_pixel M[bin, pixel] * features[pixel, c]

where a bin is one (RoI, ph, pw) output cell and the pixels are those of the RoI's
pyramid level, flattened channels-last: for the channels-last maps an FPN produces that
is a view, not a copy. A row of ``M`` holds the bilinear weights of one bin (4 corners
for each of its grid_h * grid_w samples), computed from the box alone with torchvision's
exact sampling rules (same positions, clamping and out-of-map zeros), so the results
agree with ``torchvision.ops.roi_align`` to float rounding. The RoIs are grouped by level
and each level is pooled from its own map.

* forward: ``F.embedding_bag`` with per-sample weights gathers the rows (a parallel,
  vectorised kernel; faster than the same product as a CSR matmul);
* backward: ``M^T @ grad`` as a CSR sparse-dense matmul (MKL, parallel; faster than
  letting ``embedding_bag``'s own backward do it). Building the CSR needs the
  entries grouped by pixel, i.e. a sort. A sample's four corners sit at fixed offsets
  (0, 1, W, W+1) from its top-left corner (the "anchor"), so only the anchors are sorted
  (4x fewer keys than corners) and the corners' places follow by counting. At a map's far
  edges the corners past it have weight 0; in the backward they land in a few rows of
  padding after the level's gradient, in the forward on the edge pixel itself, as in
  torchvision's kernel.

Both passes work on chunks of RoIs, which keeps the intermediate buffers small and in
cache, and pool from the maps themselves instead of a padded copy of all levels, which
lowers the training peak. The timings behind these choices are in BENCHMARKS.md
(design measurements).

On CUDA (already parallel), for quantized inputs, and when the sampling table would be
too large (adaptive sampling on huge boxes), the functions call torchvision's ops.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair
from torchvision.ops._utils import convert_boxes_to_roi_format
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales, initLevelMapper

__all__ = ["roi_align", "MultiScaleRoIAlign"]

# Largest sampling table (bins x corners x samples) built in one go: about 300 MB of
# tables. Adaptive sampling (sampling_ratio <= 0) on large boxes needs
# 4 * ceil(h / PH) * ceil(w / PW) entries per bin; beyond this torchvision's kernel is
# used instead, which is slower but needs no table.
_MAX_TABLE_ENTRIES = 1 << 25

# RoIAlign's forward gathers this many bytes of channels-last bins at a time before writing them into the
# [K, C, PH, PW] output (about 160 RoIs of 256 x 7 x 7 in float32).
_POOL_CHUNK_BYTES = 8 << 20
# The backward works a chunk of RoIs at a time too: the channels-last copy of the output gradient and the sparse
# matrix exist for one chunk only. Each chunk is accumulated in place (``addmm_``) into its level's gradient.
_UNPOOL_CHUNK_BYTES = 16 << 20

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class _SampleTable(NamedTuple):
    """Sparse RoIAlign matrix, RoIs grouped by level, pixels numbered channels-last within each level's map.

    E bins (RoIs x PH x PW, in ``order``), S samples per bin (the largest grid_h * grid_w).
    """

    index: Optional[Tensor]  # [E, 4 * S] pixel of every corner of every sample, on the map (forward only)
    anchor: Tensor  # [E, S] pixel of every sample's top-left corner (backward: corners at 0, 1, W, W + 1 from it)
    weight: Tensor  # [E, S, 4] corner weights, divided by the bin's sample count
    order: Tensor  # [K] the RoIs' positions in the output, level by level
    level_rois: tuple[int, ...]  # RoIs on each level
    level_shapes: tuple[torch.Size, ...]  # [N, C, H, W] of each level
    adaptive: bool  # sampling_ratio <= 0: unused samples padded with zero weights


def _axis_samples(
    start: Tensor, bin_size: Tensor, grid: Tensor, max_grid: int, pooled: int, size: Tensor
) -> tuple[Tensor, Tensor]:
    """Lower corner and (lower, upper) bilinear weights of every sample along one axis.

    Args:
        start, bin_size: [K] box start and bin size in feature-map pixels.
        grid: [K] samples per bin; samples past it get weight 0.
        max_grid: the largest value in ``grid``.
        pooled: number of output bins along this axis.
        size: [K] feature-map size along this axis.

    Returns:
        low and high [K, pooled, max_grid] (int64), and weight [K, pooled, max_grid, 2]. At
        the map's far edge the upper weight is 0 and high == low, as in torchvision's kernel
        (low + 1 would lie past the map).
    """
    dtype = start.dtype
    bins = torch.arange(pooled, dtype=dtype, device=start.device)[None, :, None]
    step = torch.arange(max_grid, dtype=dtype, device=start.device)[None, None, :]
    grid_f = grid.to(dtype)[:, None, None]
    bin_size = bin_size[:, None, None]
    size = size[:, None, None]
    # Same expression order as torchvision's kernel, so coordinates round identically.
    # grid can be 0 for an empty box with aligned=True: no samples, but no 0/0 either.
    pos = start[:, None, None] + bins * bin_size + (step + 0.5) * bin_size / grid_f.clamp(min=1)
    # A sample more than one pixel outside the map contributes nothing.
    valid = ((pos >= -1.0) & (pos <= size) & (step < grid_f)).to(dtype)
    pos = pos.clamp(min=0)
    low = pos.long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    pos = torch.where(at_edge, low.to(dtype), pos)
    frac = pos - low
    high = torch.where(at_edge, low, low + 1)
    return low, high, torch.stack([(1.0 - frac) * valid, frac * valid], dim=-1)


def _grid_sizes(
    roi_h: Tensor, roi_w: Tensor, output_size: tuple[int, int], sampling_ratio: int
) -> tuple[Tensor, Tensor, int, int]:
    """Samples per bin along y and x for every RoI ([K] each), and their maxima."""
    if sampling_ratio > 0:
        grid = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
        return grid, grid, sampling_ratio, sampling_ratio
    # torchvision's adaptive rule: ceil(roi_size / output_size) samples per bin.
    grid_h = torch.ceil(roi_h / output_size[0]).long()
    grid_w = torch.ceil(roi_w / output_size[1]).long()
    max_h = max(int(grid_h.max()), 1) if grid_h.numel() else 1
    max_w = max(int(grid_w.max()), 1) if grid_w.numel() else 1
    return grid_h, grid_w, max_h, max_w


def _per_roi_outer(y: Tensor, x: Tensor, op) -> Tensor:
    """``op`` of every pair: [K, PH, gh, 2] and [K, PW, gw, 2] -> [K, PH, PW, gh, gw, 2, 2] (a view).

    Computed as one 3-d broadcast per RoI and then permuted: faster than broadcasting the 7-d shapes directly.
    """
    rois, pooled_h, grid_h, _ = y.shape
    pooled_w, grid_w = x.shape[1:3]
    pairs = op(y.reshape(rois, pooled_h * grid_h * 2, 1), x.reshape(rois, 1, pooled_w * grid_w * 2))
    return pairs.view(rois, pooled_h, grid_h, 2, pooled_w, grid_w, 2).permute(0, 1, 4, 2, 5, 3, 6)


def _sample_table(
    rois: Tensor,
    levels: Optional[Tensor],
    scales: Sequence[float],
    level_shapes: Sequence[torch.Size],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    compute_dtype: torch.dtype,
) -> Optional[_SampleTable]:
    """Bilinear sampling table of every RoI on its level; None if it would be too large.

    Args:
        rois: [K, 5] (batch_index, x1, y1, x2, y2) in image coordinates.
        levels: [K] level of each RoI, or None for a single level.
        scales, level_shapes: spatial scale and [N, C, H, W] of each level.
    """
    device = rois.device
    num_rois = rois.shape[0]
    if levels is None:
        order = torch.arange(num_rois, device=device)
        levels = torch.zeros(num_rois, dtype=torch.long, device=device)
    else:
        order = torch.argsort(levels, stable=True)
        levels = levels[order].long()
        rois = rois[order]
    level_rois = tuple(torch.bincount(levels, minlength=len(level_shapes)).tolist())
    heights = torch.tensor([s[2] for s in level_shapes], device=device)[levels]
    widths = torch.tensor([s[3] for s in level_shapes], device=device)[levels]
    scale = torch.tensor(list(scales), dtype=compute_dtype, device=device)[levels]

    rois = rois.to(compute_dtype)
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - x1
    roi_h = rois[:, 4] * scale - offset - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    pooled_h, pooled_w = output_size
    grid_h, grid_w, max_h, max_w = _grid_sizes(roi_h, roi_w, output_size, sampling_ratio)
    samples = max_h * max_w
    if num_rois * pooled_h * pooled_w * 4 * samples > _MAX_TABLE_ENTRIES:
        return None

    low_y, high_y, weight_y = _axis_samples(y1, roi_h / pooled_h, grid_h, max_h, pooled_h, heights)
    low_x, high_x, weight_x = _axis_samples(x1, roi_w / pooled_w, grid_w, max_w, pooled_w, widths)
    # Pixel of each sample's lower and upper row and column: [K, PH, grid_h, 2] and [K, PW, grid_w, 2].
    image_start = (rois[:, 0].long() * heights * widths)[:, None, None, None]
    rows = image_start + torch.stack([low_y, high_y], dim=-1) * widths[:, None, None, None]
    columns = torch.stack([low_x, high_x], dim=-1)
    count = (grid_h * grid_w).clamp(min=1).to(compute_dtype)
    weight_x = weight_x / count[:, None, None, None]
    # int32 keys halve the table and speed up the backward sort (the backward pads each level by W + 1 rows).
    index_dtype = torch.int32 if max(s[0] * s[2] * s[3] + s[3] + 1 for s in level_shapes) < 2**31 else torch.int64
    # [K, PH, PW, grid_h, grid_w, 2, 2]: corners (y0 x0, y0 x1, y1 x0, y1 x1) of every sample of every bin.
    index = _per_roi_outer(rows.to(index_dtype), columns.to(index_dtype), torch.add)
    weight = _per_roi_outer(weight_y, weight_x, torch.mul)

    bins = num_rois * pooled_h * pooled_w
    return _SampleTable(
        index=index.reshape(bins, 4 * samples),
        anchor=index[..., 0, 0].reshape(bins, samples),
        weight=weight.reshape(bins, samples, 4),
        order=order,
        level_rois=level_rois,
        level_shapes=tuple(level_shapes),
        adaptive=sampling_ratio <= 0,
    )


def _level_chunks(table: _SampleTable, bins_per_roi: int, chunk_rois: int):
    """``(level, rois, rows)`` per chunk: ``rois`` a slice of ``table.order`` on one level, ``rows`` its bins."""
    start = 0
    for level, count in enumerate(table.level_rois):
        for first in range(start, start + count, chunk_rois):
            last = min(first + chunk_rois, start + count)
            yield level, slice(first, last), slice(first * bins_per_roi, last * bins_per_roi)
        start += count


def _channels_last_rows(feature: Tensor) -> Tensor:
    """``[N * H * W, C]`` pixels of a map: a view for channels-last maps (FPN outputs), else a copy."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


def _pool(features: Sequence[Tensor], table: _SampleTable, output_size: tuple[int, int],
          channels_last: bool) -> Tensor:
    """Forward: [E, C] weighted gathers from each level's map, written into a [K, C, PH, PW] output (contiguous, or
    channels-last strides) a chunk of RoIs at a time.

    Chunks keep the channels-last rows of only ``_POOL_CHUNK_BYTES`` alive next to the output, instead of a second
    output-sized buffer (1000 RoIs x 256 x 7 x 7 is 50 MB): the peak memory of Faster R-CNN inference.
    """
    channels = features[0].shape[1]
    # Detached: the autograd function differentiates this itself, and embedding_bag would otherwise keep bag
    # bookkeeping for a backward of its own.
    pixels = [_channels_last_rows(f.detach()) if n else None for f, n in zip(features, table.level_rois)]
    weights = table.weight.flatten(1).to(features[0].dtype)
    bins_per_roi = output_size[0] * output_size[1]
    num_rois = len(table.order)
    if channels_last:
        out = features[0].new_empty(num_rois, *output_size, channels)
    else:
        out = features[0].new_empty(num_rois, channels, *output_size)
    chunk_rois = max(1, _POOL_CHUNK_BYTES // (bins_per_roi * channels * features[0].element_size()))
    for level, rois, rows in _level_chunks(table, bins_per_roi, chunk_rois):
        bins = F.embedding_bag(table.index[rows], pixels[level], per_sample_weights=weights[rows], mode="sum")
        bins = bins.view(-1, *output_size, channels)
        out.index_copy_(0, table.order[rois], bins if channels_last else bins.permute(0, 3, 1, 2))
    return out.permute(0, 3, 1, 2) if channels_last else out


def _transposed_table(table: _SampleTable, num_pixels: int, row: int) -> Tensor:
    """``M^T`` of one level as a CSR matrix [num_pixels, E], grouped by pixel without sorting corners.

    Only the samples' anchors (top-left corners) are sorted; every other corner lies at a fixed offset from its
    anchor (1, W, W + 1 for a row of W pixels), so where each corner entry goes in the pixel-grouped order follows
    from the anchor counts by arithmetic: row start + entries of earlier corners in that row + rank among the
    samples sharing the anchor. Sorting all corners instead costs 4x the keys. Repeated (pixel, bin) pairs are fine:
    the matmul sums them. ``num_pixels`` covers the corners past the map's far edge (weight 0).
    """
    samples = table.anchor.shape[1]
    keys = table.anchor.flatten()
    weight = table.weight.view(-1, 4)
    if table.adaptive:
        # The grid is padded to the largest RoI's; leave the unused samples out of the
        # sort and the matmul. (With a fixed grid almost nothing would be dropped.)
        positions = weight.amax(dim=1).nonzero().squeeze(1)
        keys = keys[positions]
        sorted_keys, local_order = torch.sort(keys, stable=True)
        order = positions[local_order]
    else:
        sorted_keys, order = torch.sort(keys, stable=True)
    nnz = keys.numel()

    per_anchor = torch.bincount(keys, minlength=num_pixels)
    rank = torch.arange(nnz, device=keys.device) - (torch.cumsum(per_anchor, 0) - per_anchor)[sorted_keys]
    # Corner c of the samples anchored at pixel a all land on a + offset_c, so their
    # rank among the entries landing there equals their rank among the anchor's.
    offsets = torch.tensor([0, 1, row, row + 1], device=keys.device)
    corners = sorted_keys.long()[:, None] + offsets
    destination = corners + torch.arange(4, device=keys.device) * num_pixels  # [nnz, 4]
    landing = torch.bincount(destination.flatten(), minlength=4 * num_pixels).view(4, num_pixels)
    per_pixel = landing.sum(dim=0)
    crow = per_pixel.new_zeros(num_pixels + 1)
    torch.cumsum(per_pixel, 0, out=crow[1:])
    # Slot of corner c's first entry in row p: row start + earlier corners' entries there.
    first_slot = crow[:-1] + (torch.cumsum(landing, 0) - landing)
    slot = (first_slot.flatten()[destination] + rank[:, None]).flatten()

    index_dtype = torch.int32 if 4 * nnz < 2**31 else torch.int64
    columns = torch.zeros(4 * nnz, dtype=index_dtype, device=keys.device)
    columns[slot] = (order // samples).to(index_dtype).repeat_interleave(4)
    values = torch.zeros(4 * nnz, dtype=weight.dtype, device=keys.device)
    values[slot] = weight[order].flatten()
    with warnings.catch_warnings():
        # torch flags CSR tensors as beta on first use; the matmul used here is stable.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            crow.to(index_dtype), columns, values, (num_pixels, table.anchor.shape[0]), check_invariants=False
        )


def _gradient_rows(grad_output: Tensor, rois: Tensor) -> Tensor:
    """The output gradient of ``rois`` as channels-last rows [len(rois) * PH * PW, C]: whole RoIs gathered, then
    transposed (a strided gather is slower), or gathered alone when the gradient is channels-last already."""
    channels_last = grad_output.permute(0, 2, 3, 1)
    if channels_last.is_contiguous():
        return channels_last.index_select(0, rois).view(-1, grad_output.shape[1])
    return grad_output.index_select(0, rois).permute(0, 2, 3, 1).reshape(-1, grad_output.shape[1])


def _unpool(grad_output: Tensor, table: _SampleTable, needs_grad: Sequence[bool],
            dtype: torch.dtype) -> list[Optional[Tensor]]:
    """Backward: ``M^T @ grad`` into one [N, C, H, W] gradient per level (channels-last strides)."""
    _, channels, out_h, out_w = grad_output.shape
    bins_per_roi = out_h * out_w
    # MKL's CSR matmul has no bf16/fp16 kernel; accumulate those in float32.
    accumulators = [
        grad_output.new_zeros(n * h * w + w + 1, channels, dtype=table.weight.dtype) if wanted else None
        for (n, _, h, w), wanted in zip(table.level_shapes, needs_grad)
    ]
    chunk_rois = max(1, _UNPOOL_CHUNK_BYTES // (bins_per_roi * channels * table.weight.element_size()))
    for level, rois, rows in _level_chunks(table, bins_per_roi, chunk_rois):
        pixels = accumulators[level]
        if pixels is None:
            continue
        chunk = table._replace(anchor=table.anchor[rows], weight=table.weight[rows])
        grad_rows = _gradient_rows(grad_output, table.order[rois])
        pixels.addmm_(_transposed_table(chunk, pixels.shape[0], table.level_shapes[level][3]),
                      grad_rows.to(pixels.dtype))
    # Views of the accumulators without their padding (channels-last strides), not copies.
    return [
        None if pixels is None else pixels[:n * h * w].view(n, h, w, channels).permute(0, 3, 1, 2).to(dtype)
        for (n, _, h, w), pixels in zip(table.level_shapes, accumulators)
    ]


class _SparseRoIAlign(torch.autograd.Function):
    """RoIAlign over one or more levels as a sparse matrix product (see module docstring)."""

    @staticmethod
    def forward(ctx, table: _SampleTable, output_size: tuple[int, int], channels_last: bool,
                *features: Tensor) -> Tensor:
        # The backward needs the anchors and weights only: the corner indices (a third of the table) are dropped.
        ctx.table = table._replace(index=None)
        ctx.dtype = features[0].dtype
        return _pool(features, table, output_size, channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grads = _unpool(grad_output, ctx.table, ctx.needs_input_grad[3:], ctx.dtype)
        return (None, None, None, *grads)


def _sparse_roi_align(features: Sequence[Tensor], table: _SampleTable, output_size: tuple[int, int],
                      channels_last: bool = False) -> Tensor:
    if torch.is_grad_enabled() and any(f.requires_grad for f in features):
        return _SparseRoIAlign.apply(table, output_size, channels_last, *features)
    return _pool(features, table, output_size, channels_last)


def _supported(features: Sequence[Tensor]) -> bool:
    """Whether the sparse CPU path handles these feature maps."""
    return all(
        f.device.type == "cpu" and not f.is_quantized and f.dtype == features[0].dtype for f in features
    ) and features[0].dtype in _SUPPORTED_DTYPES


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_rois(boxes: Union[Tensor, list[Tensor]]) -> Tensor:
    """Check the two accepted box formats and return Tensor[K, 5] (batch index first)."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes as a Tensor must be [K, 5] (batch_index, x1, y1, x2, y2), got {tuple(boxes.shape)}"
            )
        return boxes
    if not isinstance(boxes, (list, tuple)) or not all(isinstance(b, Tensor) for b in boxes):
        raise ValueError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must be [L, 4] (x1, y1, x2, y2), got {tuple(b.shape)}")
    return convert_boxes_to_roi_format(list(boxes))


def roi_align(
    input: Tensor,
    boxes: Union[Tensor, list[Tensor]],
    output_size: Union[int, tuple[int, int], list[int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign, same signature and results as ``torchvision.ops.roi_align``.

    On CPU it runs as a sparse linear map with a parallel forward and backward (several
    times faster than torchvision's serial CPU kernels), and it also takes bfloat16 and
    float16, which torchvision's CPU kernel rejects. On other devices, for quantized
    inputs, and for adaptive sampling on boxes so large that the sampling table would
    exceed ``_MAX_TABLE_ENTRIES``, it calls torchvision's op.

    Args:
        input: [N, C, H, W] feature maps.
        boxes: Tensor[K, 5] of (batch_index, x1, y1, x2, y2), or a list of N Tensor[L, 4]
            of (x1, y1, x2, y2), in input-image coordinates.
        output_size: (height, width) of each pooled RoI, or one int for both.
        spatial_scale: factor mapping box coordinates to feature-map pixels.
        sampling_ratio: samples per bin along each axis; <= 0 for torchvision's adaptive
            ``ceil(roi_size / output_size)``.
        aligned: shift boxes by -0.5 pixel (Detectron2's convention).

    Returns:
        Tensor[K, C, output_size[0], output_size[1]].

    Example:
        >>> feats = torch.randn(2, 8, 32, 32, requires_grad=True)
        >>> boxes = torch.tensor([[0, 1.0, 2.0, 20.0, 18.0], [1, 4.0, 4.0, 9.0, 30.0]])
        >>> roi_align(feats, boxes, 7, spatial_scale=1.0, sampling_ratio=2).shape
        torch.Size([2, 8, 7, 7])
    """
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got shape {tuple(input.shape)}")
    rois = _as_rois(boxes)
    output_size = _pair(output_size)
    table = None
    if _supported([input]):
        table = _sample_table(
            rois.detach(), None, [spatial_scale], [input.shape], output_size, sampling_ratio, aligned,
            _compute_dtype(input.dtype),
        )
    if table is None:
        return torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _sparse_roi_align([input], table, output_size)


class MultiScaleRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """``torchvision.ops.MultiScaleRoIAlign`` with the sparse CPU RoIAlign of this module.

    Constructor, level mapping and scale inference are torchvision's. On CPU one sampling
    table covers every RoI; each level is then pooled straight from its own map (a view of
    a channels-last map), written into the output without torchvision's zero-filled
    result, and the backward accumulates into one gradient per level (timings in the
    module docstring). Elsewhere (CUDA, quantized, oversized adaptive tables) it is
    torchvision's module.

    Example:
        >>> pool = MultiScaleRoIAlign(["p2", "p3"], output_size=7, sampling_ratio=2)
        >>> feats = {"p2": torch.randn(1, 8, 64, 64), "p3": torch.randn(1, 8, 32, 32)}
        >>> pool(feats, [torch.tensor([[0.0, 0.0, 100.0, 80.0]])], [(256, 256)]).shape
        torch.Size([1, 8, 7, 7])
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: Union[int, tuple[int, int], list[int]],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        strides: Optional[Sequence[int]] = None,
        channels_last: bool = False,
        aligned: bool = False,
    ) -> None:
        """Args as torchvision's, plus ``strides``: each level's declared stride, which fixes the scales up front
        instead of inferring them from the first batch's padded size; ``channels_last``: on the CPU path,
        write the pooled features with channels-last strides (same values), which skips a transpose and suits a
        convolutional head (Mask R-CNN's), while a head that flattens them (the box head) wants the default; and
        ``aligned``: shift boxes by -0.5 pixel (``roi_align``'s ``aligned``, detectron2's ROIAlignV2)."""
        super().__init__(featmap_names, output_size, sampling_ratio, canonical_scale=canonical_scale,
                         canonical_level=canonical_level)
        self.channels_last = channels_last
        self.aligned = aligned
        if strides is not None:
            if len(strides) != len(featmap_names):
                raise ValueError(f"strides {list(strides)} must give one stride per level of {featmap_names}")
            self.scales = [1.0 / s for s in strides]
            levels = [int(round(math.log2(s))) for s in strides]
            self.map_levels = initLevelMapper(levels[0], levels[-1], canonical_scale, canonical_level)

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """Pool every box from the pyramid level chosen for its size.

        Args:
            x: feature maps by name, [N, C, H_l, W_l] each (same C on every level).
            boxes: per image, Tensor[L, 4] of (x1, y1, x2, y2) in image coordinates.
            image_shapes: per image, the (height, width) the boxes refer to.

        Returns:
            Tensor[sum(L), C, output_size[0], output_size[1]].
        """
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        table = None
        if _supported(features):
            levels = self.map_levels(boxes) if len(features) > 1 else None
            table = _sample_table(
                _convert_to_roi_format(boxes).detach(), levels, self.scales, [f.shape for f in features],
                self.output_size, self.sampling_ratio, self.aligned, _compute_dtype(features[0].dtype),
            )
        if table is None:
            if self.aligned:
                return self._aligned_fallback(features, boxes)
            return super().forward(x, boxes, image_shapes)
        return _sparse_roi_align(features, table, self.output_size, self.channels_last)

    def _aligned_fallback(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """torchvision's ``roi_align(aligned=True)`` level by level (its module has no ``aligned`` option)."""
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return torchvision.ops.roi_align(features[0], rois, self.output_size, self.scales[0],
                                             self.sampling_ratio, aligned=True)
        levels = self.map_levels(boxes)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            out[index] = torchvision.ops.roi_align(feature, rois[index], self.output_size, scale,
                                                   self.sampling_ratio, aligned=True)
        return out

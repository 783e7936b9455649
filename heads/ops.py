"""RoIAlign with a parallel CPU backward, and a MultiScaleRoIAlign that uses it.

torchvision's CPU RoIAlign kernels are serial loops over RoIs; in an R18-FPN Faster
R-CNN training step (256 px, 4 images) its backward alone took about 45% of the step
on a 2-core CPU. Here RoIAlign is written as a sparse linear map instead:

    out[bin, c] = sum_pixel M[bin, pixel] * features[pixel, c]

where a bin is one (RoI, ph, pw) output cell and the pixels are those of all pyramid
levels, flattened channels-last. A row of ``M`` holds the bilinear weights of one bin
(4 corners for each of its grid_h * grid_w samples), computed from the box alone with
torchvision's exact sampling rules (same positions, clamping and out-of-map zeros), so
the results agree with ``torchvision.ops.roi_align`` to float rounding.

* forward: ``F.embedding_bag`` with per-sample weights gathers the rows (a parallel,
  vectorised kernel; 2x faster here than the same product as a CSR matmul);
* backward: ``M^T @ grad`` as a CSR sparse-dense matmul (MKL, parallel; 1.5x faster
  here than letting ``embedding_bag``'s own backward do it). Building the CSR needs the
  entries grouped by pixel, i.e. a sort. Each pixel row is padded by one column and
  each map by one row, so that a sample's four corners sit at fixed offsets
  (0, 1, W+1, W+2) from its top-left corner; only those anchors are sorted (4x fewer
  keys than corners) and the corners' places follow by counting.

Measured on a 2-core CPU (torch.set_num_threads(2), load 1.3, medians of 5 alternating
runs): 4 images x 512 RoIs, 256 channels, 7x7 output, sampling_ratio=2, p2..p5 of a
256 px image, MultiScaleRoIAlign forward 168 ms vs torchvision 690 ms (4.1x), backward
160 ms vs 3215 ms (20x). Both passes work on chunks of RoIs, which keeps the
intermediate buffers small and in cache.

On CUDA (already parallel), for quantized inputs, and when the sampling table would be
too large (adaptive sampling on huge boxes), the functions call torchvision's ops.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Union

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

# RoIAlign's forward gathers this many bytes of channels-last bins at a time before transposing them into the
# [K, C, PH, PW] output (about 160 RoIs of 256 x 7 x 7 in float32).
_POOL_CHUNK_BYTES = 8 << 20
# The backward's chunks are larger: each one builds its own sparse matrix over all pixels, which costs time per
# chunk (R50-FPN training shapes, 2 images of 512 px x 512 RoIs: one chunk 82 ms, 32 MB chunks 82 ms, 16 MB 98 ms,
# 4 MB 159 ms). 16 MB trades 16 ms a step (0.4%) for 16 MB less at the step's memory peak. Each chunk is
# accumulated in place (``addmm_``), so no pixel-sized temporary exists per chunk.
_UNPOOL_CHUNK_BYTES = 8 << 20

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class _SampleTable(NamedTuple):
    """Sparse RoIAlign matrix over padded, channels-last pixels of all levels.

    E bins (RoIs x PH x PW), S samples per bin (the largest grid_h * grid_w).
    """

    index: Tensor  # [E, 4 * S] padded pixel of every corner of every sample (forward)
    anchor: Tensor  # [E, S] padded pixel of every sample's top-left corner (backward)
    weight: Tensor  # [E, S, 4] corner weights, divided by the bin's sample count
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
        low [K, pooled, max_grid] (int64) and weight [K, pooled, max_grid, 2]. At the
        map's far edge the upper weight is 0, so low + 1 may point into the padding.
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
    return low, torch.stack([(1.0 - frac) * valid, frac * valid], dim=-1)


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
    levels = torch.zeros(num_rois, dtype=torch.long, device=device) if levels is None else levels.long()
    heights = torch.tensor([s[2] for s in level_shapes], device=device)[levels]
    widths = torch.tensor([s[3] for s in level_shapes], device=device)[levels]
    # Padded layout: every level is [N, H + 1, W + 1] pixels, levels one after another.
    padded_sizes = [s[0] * (s[2] + 1) * (s[3] + 1) for s in level_shapes]
    level_start = torch.tensor([0] + padded_sizes[:-1], device=device).cumsum(0)[levels]
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

    low_y, weight_y = _axis_samples(y1, roi_h / pooled_h, grid_h, max_h, pooled_h, heights)
    low_x, weight_x = _axis_samples(x1, roi_w / pooled_w, grid_w, max_w, pooled_w, widths)
    row = widths + 1
    image_start = level_start + rois[:, 0].long() * (heights + 1) * row

    def per_roi(t: Tensor) -> Tensor:
        return t[:, None, None, None, None]

    # [K, PH, PW, grid_h, grid_w]: outer product of the two axes.
    anchor = per_roi(image_start) + low_y[:, :, None, :, None] * per_roi(row) + low_x[:, None, :, None, :]
    count = (grid_h * grid_w).clamp(min=1).to(compute_dtype)
    weight_x = weight_x / count[:, None, None, None]
    # [K, PH, PW, grid_h, grid_w, 2, 2] -> corners (y0 x0, y0 x1, y1 x0, y1 x1)
    weight = weight_y[:, :, None, :, None, :, None] * weight_x[:, None, :, None, :, None, :]
    corner_offset = torch.stack([torch.zeros_like(row), torch.ones_like(row), row, row + 1], dim=1)
    index = anchor[..., None] + corner_offset[:, None, None, None, None, :]

    bins = num_rois * pooled_h * pooled_w
    # int32 keys halve the table and speed up the backward sort.
    index_dtype = torch.int32 if sum(padded_sizes) < 2**31 else torch.int64
    return _SampleTable(
        index=index.reshape(bins, 4 * samples).to(index_dtype),
        anchor=anchor.reshape(bins, samples).to(index_dtype),
        weight=weight.reshape(bins, samples, 4),
        level_shapes=tuple(level_shapes),
        adaptive=sampling_ratio <= 0,
    )


def _padded_pixels(features: Sequence[Tensor]) -> Tensor:
    """All levels as one [sum_l N * (H_l + 1) * (W_l + 1), C] channels-last table."""
    channels = features[0].shape[1]
    total = sum(f.shape[0] * (f.shape[2] + 1) * (f.shape[3] + 1) for f in features)
    pixels = features[0].new_empty(total, channels)
    start = 0
    for f in features:
        n, _, h, w = f.shape
        block = pixels[start:start + n * (h + 1) * (w + 1)].view(n, h + 1, w + 1, channels)
        block[:, :h, :w] = f.permute(0, 2, 3, 1)
        block[:, h].zero_()
        block[:, :h, w].zero_()
        start += block.shape[0] * (h + 1) * (w + 1)
    return pixels


def _pool(features: Sequence[Tensor], table: _SampleTable, output_size: tuple[int, int]) -> Tensor:
    """Forward: [E, C] weighted gathers, written into a [K, C, PH, PW] output a chunk of RoIs at a time.

    Chunks keep the channels-last rows of only ``_POOL_CHUNK_BYTES`` alive next to the output, instead of a second
    output-sized buffer (1000 RoIs x 256 x 7 x 7 is 50 MB): the peak memory of Faster R-CNN inference.
    """
    channels = features[0].shape[1]
    pixels = _padded_pixels(features)
    weights = table.weight.flatten(1).to(pixels.dtype)
    bins_per_roi = output_size[0] * output_size[1]
    num_rois = table.index.shape[0] // bins_per_roi
    out = pixels.new_empty(num_rois, channels, *output_size)
    step = max(1, _POOL_CHUNK_BYTES // (bins_per_roi * channels * pixels.element_size()))
    for start in range(0, num_rois, step):
        rows = slice(start * bins_per_roi, min(start + step, num_rois) * bins_per_roi)
        bins = F.embedding_bag(table.index[rows], pixels, per_sample_weights=weights[rows], mode="sum")
        out[start:start + step].copy_(bins.view(-1, output_size[0], output_size[1], channels).permute(0, 3, 1, 2))
    return out


def _transposed_table(table: _SampleTable) -> Tensor:
    """``M^T`` as a CSR matrix [padded pixels, E], grouped by pixel without sorting corners.

    Only the samples' anchors (top-left corners) are sorted; every other corner lies at
    a fixed offset from its anchor (1, W + 1, W + 2 on the padded grid), so where each
    corner entry goes in the pixel-grouped order follows from the anchor counts by
    arithmetic: row start + entries of earlier corners in that row + rank among the
    samples sharing the anchor. Sorting all corners instead costs 4x the keys.
    Repeated (pixel, bin) pairs are fine: the matmul sums them.
    """
    samples = table.anchor.shape[1]
    num_pixels = sum(s[0] * (s[2] + 1) * (s[3] + 1) for s in table.level_shapes)
    keys = table.anchor.flatten()
    corners = table.index.view(-1, 4)
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
    destination = corners[order].long() + torch.arange(4, device=keys.device) * num_pixels  # [nnz, 4]
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


def _unpool(grad_output: Tensor, table: _SampleTable, needs_grad: Sequence[bool],
            dtype: torch.dtype) -> list[Optional[Tensor]]:
    """Backward: ``M^T @ grad`` split back into one [N, C, H, W] gradient per level."""
    num_rois, channels, out_h, out_w = grad_output.shape
    bins_per_roi = out_h * out_w
    num_pixels = sum(s[0] * (s[2] + 1) * (s[3] + 1) for s in table.level_shapes)
    # MKL's CSR matmul has no bf16/fp16 kernel; accumulate those in float32.
    pixels = grad_output.new_zeros(num_pixels, channels, dtype=table.weight.dtype)
    # A chunk of RoIs at a time, like the forward: the channels-last copy of the gradient and the sparse matrix
    # exist for one chunk only, not for all bins (that copy alone is as large as the pooled output).
    step = max(1, _UNPOOL_CHUNK_BYTES // (bins_per_roi * channels * pixels.element_size()))
    for start in range(0, num_rois, step):
        rows = slice(start * bins_per_roi, min(start + step, num_rois) * bins_per_roi)
        chunk = table._replace(index=table.index[rows], anchor=table.anchor[rows], weight=table.weight[rows])
        grad_rows = grad_output[start:start + step].permute(0, 2, 3, 1).reshape(-1, channels)
        pixels.addmm_(_transposed_table(chunk), grad_rows.to(pixels.dtype))
    grads: list[Optional[Tensor]] = []
    start = 0
    for shape, wanted in zip(table.level_shapes, needs_grad):
        n, _, h, w = shape
        size = n * (h + 1) * (w + 1)
        if wanted:
            # A view into the accumulator (channels-last strides, rows padded by one pixel), not a copy: copying
            # every level out would hold a second pixel-sized buffer at the step's memory peak.
            grad = pixels[start:start + size].view(n, h + 1, w + 1, channels)[:, :h, :w].permute(0, 3, 1, 2)
            grads.append(grad.to(dtype))
        else:
            grads.append(None)
        start += size
    return grads


class _SparseRoIAlign(torch.autograd.Function):
    """RoIAlign over one or more levels as a sparse matrix product (see module docstring).

    The backward builds the sampling table again instead of keeping the forward's: the table is about 7 MB for
    1024 RoIs of 7 x 7 bins and would stay alive through the whole backward, across the step's memory peak, while
    building it costs about 13 ms (R50-FPN training shapes on a 2-core CPU, 0.4% of the step).
    """

    @staticmethod
    def forward(ctx, table: _SampleTable, build_table: Callable[[], Optional[_SampleTable]],
                output_size: tuple[int, int], *features: Tensor) -> Tensor:
        ctx.build_table = build_table
        ctx.dtype = features[0].dtype
        return _pool(features, table, output_size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grads = _unpool(grad_output, ctx.build_table(), ctx.needs_input_grad[3:], ctx.dtype)
        return (None, None, None, *grads)


def _roi_align_from_table(features: Sequence[Tensor], build_table: Callable[[], Optional[_SampleTable]],
                          output_size: tuple[int, int]) -> Optional[Tensor]:
    """Sparse RoIAlign of ``features``; None when the sampling table would be too large (the caller then uses
    torchvision's)."""
    table = build_table()
    if table is None:
        return None
    if torch.is_grad_enabled() and any(f.requires_grad for f in features):
        return _SparseRoIAlign.apply(table, build_table, output_size, *features)
    return _pool(features, table, output_size)


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
    out = None
    if _supported([input]):
        build_table = functools.partial(
            _sample_table, rois.detach(), None, [spatial_scale], [input.shape], output_size, sampling_ratio,
            aligned, _compute_dtype(input.dtype),
        )
        out = _roi_align_from_table([input], build_table, output_size)
    if out is None:
        return torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return out


class MultiScaleRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """``torchvision.ops.MultiScaleRoIAlign`` with the sparse CPU RoIAlign of this module.

    Constructor, level mapping and scale inference are torchvision's. On CPU all levels
    are pooled in one sparse product instead of one ``roi_align`` per level: that saves
    torchvision's zero-filled result and the scatter of each level's output into it
    (and the matching gather in backward), and one sort and matmul replace four
    (timings in the module docstring).
    Elsewhere (CUDA, quantized, oversized adaptive tables) it is torchvision's module.

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
    ) -> None:
        """Args as torchvision's, plus ``strides``: each level's declared stride, which fixes the scales up front
        instead of inferring them from the first batch's padded size."""
        super().__init__(featmap_names, output_size, sampling_ratio, canonical_scale=canonical_scale,
                         canonical_level=canonical_level)
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
        out = None
        if _supported(features):
            levels = self.map_levels(boxes) if len(features) > 1 else None
            build_table = functools.partial(
                _sample_table, _convert_to_roi_format(boxes).detach(), levels, self.scales,
                [f.shape for f in features], self.output_size, self.sampling_ratio, False,
                _compute_dtype(features[0].dtype),
            )
            out = _roi_align_from_table(features, build_table, self.output_size)
        if out is None:
            return super().forward(x, boxes, image_shapes)
        return out

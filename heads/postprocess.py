"""Batched detection post-processing: RPN proposal filtering, box detections and mask pasting.

torchvision's RPN ``filter_proposals`` and ``RoIHeads.postprocess_detections`` loop over the images in Python,
filter each one with boolean masks (a host sync per filter on GPU) and, above 1000 boxes on CPU, run NMS in a
Python loop over classes; ``GeneralizedRCNNTransform.postprocess`` pastes every mask with its own interpolate and
copy. The subclasses here keep torchvision's attributes, constructors and results, and do each step for all
images at once:

* proposals and detections are filtered with one ``nonzero`` for the whole batch, NMS runs over groups
  (image x level, image x class) and the top-k per image is a stable sort by image plus a rank cut; host syncs
  per call: one (RPN) or two (RoIHeads) ``nonzero``, NMS's own, and one ``tolist()`` of the counts per image;
* RoIHeads decodes only the (proposal, class) pairs that pass the score threshold instead of all proposals x
  classes (a few percent of them at ``box_score_thresh=0.05``);
* masks are pasted as two batched matrix products per chunk of masks (bilinear resizing is separable), with
  weights that are zero outside each box, written straight into the result.

Grouped NMS, one call on GPU: torchvision's single-call trick shifts each class by ``class x (max + 1)`` in the
boxes' own dtype, and at 4 images x 91 classes x 1333 px that puts float32 coordinates near 5e5, on a 1/32 px
grid, where IoUs near the threshold come out wrong (tests/test_postprocess.py has a case). Here the shifted
boxes are float64: a float32 coordinate plus a shift below 2^19 is exact to 1e-10 px. On CPU the NMS kernel is
serial and compares each kept box with every later box of any group, O(boxes x kept) for one call, so above
``_CPU_SINGLE_NMS_MAX_BOXES`` boxes each group runs alone on its slice of one sort by group, as torchvision's
own CPU fallback does but without a boolean mask per class. Timings: BENCHMARKS.md, design measurements.

Results equal torchvision's except where scores tie exactly (torchvision orders ties with an unstable sort;
here equal scores keep index order, and the single-call path may keep the other of two tied overlapping boxes)
and, on the single-call path, for IoUs within float32 rounding of the threshold (computed in float64 here).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, expand_boxes, expand_masks
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes, resize_keypoints

__all__ = [
    "BatchedRegionProposalNetwork",
    "BatchedRoIHeads",
    "BatchedGeneralizedRCNNTransform",
    "grouped_nms",
    "paste_masks_in_image",
    "check_paste_inputs",
]

# torchvision's threshold for the same choice on CPU (4000 box coordinates, vision#1311 and #8925).
_CPU_SINGLE_NMS_MAX_BOXES = 1000
# Masks pasted per chunk: as many as fill 16M output elements (64 MB of float32). Bounds the temporaries
# (weights, and the float32 result of a chunk of bfloat16 masks); the result itself is N x H x W, as torchvision's.
_PASTE_CHUNK_ELEMENTS = 1 << 24
# RoIHeads drops boxes with a side shorter than this (torchvision's value).
_MIN_DETECTION_SIZE = 1e-2


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently within each group; indices of the kept boxes in decreasing score order.

    Same contract and results as ``torchvision.ops.batched_nms`` (its exact per-class path), for any number of
    boxes and groups; see the module docstring for how. Equal scores come out in index order.

    Args:
        boxes: [K, 4] (x1, y1, x2, y2).
        scores: [K].
        groups: [K] integer group of each box (e.g. image * num_classes + label); boxes of different groups
            never suppress each other.
        iou_threshold: boxes overlapping a higher-scoring box of their group by IoU > this are dropped.

    Returns:
        Tensor[M] int64 indices into ``boxes``.
    """
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.device.type == "cpu" and boxes.shape[0] > _CPU_SINGLE_NMS_MAX_BOXES:
        keep = _nms_per_group(boxes, scores, groups, iou_threshold)
    else:
        keep = _nms_single_call(boxes, scores, groups, iou_threshold)
    # Decreasing score, equal scores in index order (torchvision leaves those to an unstable sort).
    keep = keep.sort().values
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def _nms_single_call(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """One ``nms`` over all groups, each shifted by group x (extent + 1) in float64 so that none overlap."""
    boxes = boxes.to(torch.float64)
    extent = (boxes.max() - boxes.min()).floor() + 1
    shifted = boxes + (groups.to(torch.float64) * extent)[:, None]
    return torchvision.ops.nms(shifted, scores.to(torch.float64), iou_threshold)


def _nms_per_group(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """``nms`` on each group's contiguous slice after one stable sort by group.

    Each slice holds its group's boxes in their original order, the very input torchvision's per-class path
    gives the kernel, so that equal scores are broken the same way.
    """
    order = torch.argsort(groups, stable=True)
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1].tolist()
    starts = [0, *itertools.accumulate(counts[:-1])]
    kept = [
        torchvision.ops.nms(group_boxes, group_scores, iou_threshold) + start
        for start, group_boxes, group_scores in zip(
            starts, boxes[order].split(counts), scores[order].split(counts)
        )
    ]
    return order[torch.cat(kept)]


def _top_per_image(keep: Tensor, image: Tensor, num_images: int, limit: int) -> tuple[Tensor, list[int]]:
    """The first ``limit`` of each image's kept boxes, grouped by image.

    Args:
        keep: [M] indices in decreasing score order (as ``grouped_nms`` returns them).
        image: image of every box that ``keep`` indexes.

    Returns:
        The selected indices, image by image, each image's in decreasing score order, and the count per image
        (its ``tolist()`` is the only host sync).
    """
    image = image[keep]
    order = torch.argsort(image, stable=True)  # stable: each image's boxes stay in decreasing score order
    keep, image = keep[order], image[order]
    images = torch.arange(num_images, device=keep.device)
    starts = torch.searchsorted(image, images)
    counts = torch.searchsorted(image, images, right=True) - starts
    rank = torch.arange(keep.shape[0], device=keep.device) - starts[image]
    selected = counts.clamp(max=limit).tolist()
    # The selected boxes first, still image by image (a stable sort, where a boolean mask would sync again).
    over = (rank >= limit).to(torch.uint8)
    return keep[torch.argsort(over, stable=True)[: sum(selected)]], selected


def _clip_to_images(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Clip [..., 4] boxes to [0, width] x [0, height]; ``sizes`` holds each box's (height, width).

    Same values as ``torchvision.ops.clip_boxes_to_image`` (a clamp), with one image size per box.
    """
    height, width = sizes.unbind(-1)
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), width[..., None])
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), height[..., None])
    return torch.stack((x, y), dim=-1).flatten(-2)


def _has_min_size(boxes: Tensor, min_size: float, strict: bool = False) -> Tensor:
    """Mask of the boxes with both sides >= ``min_size`` (``torchvision.ops.remove_small_boxes``' rule), or > it
    with ``strict`` (detectron2's ``Boxes.nonempty``)."""
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    if strict:
        return (widths > min_size) & (heights > min_size)
    return (widths >= min_size) & (heights >= min_size)


class BatchedRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` with ``filter_proposals`` done for all images at once.

    Same constructor, attributes, training behaviour and results; see the module docstring.

    Attributes (class-level, for subclasses that follow another framework's rules):
        scores_are_logits: rank proposals (NMS and the per-image cut) and return them by objectness logits
            instead of probabilities, which tie where the sigmoid saturates (detectron2's rule).
        strict_min_size: keep boxes whose sides are > ``min_size`` instead of >= (detectron2's ``nonempty``).
    """

    scores_are_logits: bool = False
    strict_min_size: bool = False

    def _get_top_n_idx(self, objectness: Tensor, num_anchors_per_level: list[int]) -> Tensor:
        """torchvision's per-level top-k, with ``torch.sym_min`` so that export keeps the level sizes symbolic."""
        r, offset = [], 0
        for ob in objectness.split(num_anchors_per_level, 1):
            _, top_n_idx = ob.topk(torch.sym_min(self.pre_nms_top_n(), ob.shape[1]), dim=1)
            r.append(top_n_idx + offset)
            offset += ob.shape[1]
        return torch.cat(r, dim=1)

    def proposal_candidates(
        self, proposals: Tensor, objectness: Tensor, sizes: Tensor, num_anchors_per_level: list[int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The proposals that go into NMS: each level's best, clipped, without small or low-scoring ones.

        Args:
            proposals: [N, A, 4] decoded boxes of all anchors of the N images.
            objectness: [N * A, 1] (or [N, A]) logits.
            sizes: [N, 2] (height, width) of each image, in the proposals' dtype.
            num_anchors_per_level: anchors per image on each level, in the order of the A anchors.

        Returns:
            boxes [K, 4], scores [K] (probabilities, or logits with ``scores_are_logits``), image [K] and NMS group
            [K] (image x level) of each candidate.
        """
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)

        # torchvision's per-level top-k (already batched): columns are level 0's best, then level 1's, ...
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        per_level = [torch.sym_min(self.pre_nms_top_n(), n) for n in num_anchors_per_level]
        levels = torch.cat([torch.full((k,), i, dtype=torch.int64, device=device) for i, k in enumerate(per_level)])
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores = objectness[batch_idx, top_n_idx]
        if not self.scores_are_logits:
            scores = torch.sigmoid(scores)
        boxes = proposals[batch_idx, top_n_idx]

        boxes = _clip_to_images(boxes, sizes.reshape(num_images, 1, 2))
        valid = _has_min_size(boxes, self.min_size, self.strict_min_size) & (scores >= self.score_thresh)

        flat = valid.flatten().nonzero().squeeze(1)
        boxes, scores = boxes.flatten(0, 1)[flat], scores.flatten()[flat]
        # Image and level of each candidate by lookup (not flat // columns, flat % columns: ONNX-friendlier).
        image = batch_idx.expand(valid.shape).flatten()[flat]
        groups = image * len(per_level) + levels.expand(valid.shape).flatten()[flat]
        return boxes, scores, image, groups

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: the best ``post_nms_top_n`` proposals after clipping, size and score filters and NMS per level.

        Args:
            proposals: [N, A, 4] decoded boxes of all anchors of the N images.
            objectness: [N * A, 1] (or [N, A]) logits.
            image_shapes: (height, width) of each image.
            num_anchors_per_level: anchors per image on each level, in the order of the A anchors.

        Returns:
            Boxes [K_i, 4] and scores [K_i] (probabilities) of each image, in decreasing score order.
        """
        num_images = proposals.shape[0]
        sizes = torch.tensor(image_shapes, dtype=proposals.dtype, device=proposals.device)
        boxes, scores, image, groups = self.proposal_candidates(proposals, objectness, sizes, num_anchors_per_level)
        keep = grouped_nms(boxes, scores, groups, self.nms_thresh)
        keep, counts = _top_per_image(keep, image, num_images, self.post_nms_top_n())
        return list(boxes[keep].split(counts)), list(scores[keep].split(counts))


class BatchedRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with ``postprocess_detections`` done for all images at once.

    Same constructor, attributes, losses and results; see the module docstring.

    Attributes:
        min_detection_size: detections with a side shorter than this are dropped (class-level; detectron2 keeps
            every detection here, its subclass sets 0).
    """

    min_detection_size: float = _MIN_DETECTION_SIZE

    def detection_candidates(
        self, class_logits: Tensor, box_regression: Tensor, proposals: Tensor, image: Tensor, sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The (proposal, class) detections that go into NMS: above the score threshold, decoded, clipped, not tiny.

        Args:
            class_logits: [R, C] over the R proposals of all images (C classes including background).
            box_regression: [R, C * 4] deltas per class.
            proposals: [R, 4] proposals of all images.
            image: [R] image of each proposal.
            sizes: [N, 2] (height, width) of each image.

        Returns:
            boxes [D, 4], scores [D], labels [D] (int64, 1..C-1) and image [D] of each candidate.
        """
        num_rois, num_classes = class_logits.shape
        scores = F.softmax(class_logits, -1)

        # Only (proposal, class) pairs above the score threshold are decoded, clipped and kept; the background
        # column never is.
        candidates = (scores[:, 1:] > self.score_thresh).nonzero()
        rows, labels = candidates[:, 0], candidates[:, 1] + 1
        scores = scores[rows, labels]
        deltas = box_regression.reshape(num_rois, num_classes, 4)[rows, labels]
        boxes = self.box_coder.decode_single(deltas, proposals[rows])
        image = image[rows]
        boxes = _clip_to_images(boxes, sizes[image].to(boxes.dtype))

        valid = _has_min_size(boxes, self.min_detection_size).nonzero().squeeze(1)
        return boxes[valid], scores[valid], labels[valid], image[valid]

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: boxes, scores and labels of the best ``detections_per_img`` detections after NMS per class.

        Args:
            class_logits: [R, C] over the R proposals of all images (C classes including background).
            box_regression: [R, C * 4] deltas per class.
            proposals: [R_i, 4] proposals of each image (sum R_i = R).
            image_shapes: (height, width) of each image.

        Returns:
            Lists of boxes [D_i, 4], scores [D_i] and labels [D_i] (int64, 1..C-1), in decreasing score order.
        """
        device = class_logits.device
        num_images = len(proposals)
        num_rois, num_classes = class_logits.shape
        # One row per image: (height, width, number of proposals).
        meta = torch.tensor([(h, w, len(p)) for (h, w), p in zip(image_shapes, proposals)], device=device)
        image = torch.arange(num_images, device=device).repeat_interleave(meta[:, 2], output_size=num_rois)
        boxes, scores, labels, image = self.detection_candidates(
            class_logits, box_regression, torch.cat(proposals), image, meta[:, :2]
        )
        keep = grouped_nms(boxes, scores, image * num_classes + labels, self.nms_thresh)
        keep, counts = _top_per_image(keep, image, num_images, self.detections_per_img)
        return list(boxes[keep].split(counts)), list(scores[keep].split(counts)), list(labels[keep].split(counts))


def _resample_weights(box_start: Tensor, box_end: Tensor, length: int, source_len: int, dtype: torch.dtype) -> Tensor:
    """Bilinear weights from a mask's rows (or columns) to the image's, zero outside the box.

    The mask is resized to the box's ``box_end - box_start + 1`` pixels (at least 1) as
    ``F.interpolate(mode="bilinear", align_corners=False)`` does it: box pixel i samples the source at
    ``(i + 0.5) * source_len / out_len - 0.5``, clamped to [0, source_len - 1].

    Args:
        box_start, box_end: [n] integer box extent (inclusive) along this axis, in image pixels.
        length: image pixels along this axis.
        source_len: mask pixels along this axis.

    Returns:
        [n, length, source_len]: row p holds the weights of image pixel p.
    """
    pixel = torch.arange(length, device=box_start.device)
    inside = ((pixel >= box_start[:, None]) & (pixel <= box_end[:, None])).to(dtype)
    out_len = (box_end - box_start + 1).clamp(min=1)
    scale = source_len / out_len.to(dtype)
    source = ((pixel - box_start[:, None]).to(dtype) + 0.5) * scale[:, None] - 0.5
    source = source.clamp(min=0, max=source_len - 1)
    low = source.to(torch.int64)  # floor: source >= 0
    frac = source - low
    high = (low + 1).clamp(max=source_len - 1)
    weights = torch.zeros(inside.shape + (source_len,), dtype=dtype, device=box_start.device)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights


def check_paste_inputs(masks: Tensor, boxes: Tensor) -> None:
    """ValueError unless ``masks`` is ``[N, 1, M, M]`` and ``boxes`` ``[N, 4]``: what mask pasting takes."""
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be [N, 1, M, M], got shape {tuple(masks.shape)}")
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must be [N, 4] with N={masks.shape[0]} (one per mask), got shape {tuple(boxes.shape)}")


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], padding: int = 1) -> Tensor:
    """Paste each mask into an image-sized zero canvas at its box, without a loop over masks.

    Same results as ``torchvision.models.detection.roi_heads.paste_masks_in_image`` (to float rounding): the
    mask is padded by ``padding``, its box expanded to match and truncated to integers, the mask resized to the
    box bilinearly (``align_corners=False``) and written where box and image overlap; every other pixel is 0.

    Bilinear resizing is separable, so each pasted mask is ``rows @ mask @ cols^T`` with sparse weight matrices
    that are zero outside the box (exact zeros there): two batched matrix products per chunk of masks, written
    straight into the result. Computed in float32 (float64 for float64 masks) with autocast off; returned in
    the masks' dtype.

    Args:
        masks: [N, 1, M, M] probabilities.
        boxes: [N, 4] (x1, y1, x2, y2) in the target image's pixels.
        image_shape: (height, width) of the target image.

    Returns:
        [N, 1, height, width].

    Example:
        >>> boxes = torch.tensor([[4.0, 5.0, 40.0, 30.0], [0.0, 0.0, 9.0, 9.0]])
        >>> paste_masks_in_image(torch.rand(2, 1, 28, 28), boxes, (48, 64)).shape
        torch.Size([2, 1, 48, 64])
    """
    check_paste_inputs(masks, boxes)
    im_h, im_w = image_shape
    num = masks.shape[0]
    out = torch.empty((num, im_h, im_w), dtype=masks.dtype, device=masks.device)
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    # Products written straight into the result unless it needs a cast or autograd (out= records no graph).
    direct = out.dtype == dtype and not (torch.is_grad_enabled() and masks.requires_grad)
    with torch.autocast(masks.device.type, enabled=False):
        masks, scale = expand_masks(masks, padding)
        source_h, source_w = masks.shape[-2:]
        masks = masks[:, 0].to(dtype)
        x0, y0, x1, y1 = expand_boxes(boxes, scale).to(torch.int64).unbind(1)
        step = max(1, _PASTE_CHUNK_ELEMENTS // max(1, im_h * im_w))
        for start in range(0, num, step):
            chunk = slice(start, start + step)
            rows = _resample_weights(y0[chunk], y1[chunk], im_h, source_h, dtype)
            cols = _resample_weights(x0[chunk], x1[chunk], im_w, source_w, dtype)
            resized_cols = torch.bmm(masks[chunk], cols.transpose(1, 2))
            if direct:
                torch.bmm(rows, resized_cols, out=out[chunk])
            else:
                out[chunk] = torch.bmm(rows, resized_cols)
    return out[:, None]


class BatchedGeneralizedRCNNTransform(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` whose ``postprocess`` pastes masks in batch.

    Boxes and keypoints are resized by torchvision's (vectorised) code; masks by ``paste_masks_in_image``.
    """

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Map detections from the resized images back to the original sizes (eval mode only)."""
        if self.training:
            return result
        for prediction, resized, original in zip(result, image_shapes, original_image_sizes):
            prediction["boxes"] = resize_boxes(prediction["boxes"], resized, original)
            if "masks" in prediction:
                prediction["masks"] = paste_masks_in_image(prediction["masks"], prediction["boxes"], original)
            if "keypoints" in prediction:
                prediction["keypoints"] = resize_keypoints(prediction["keypoints"], resized, original)
        return result

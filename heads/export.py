"""Export detectors, classifiers and backbones to ONNX (``torch.onnx.export(dynamo=True)``) and ``torch.export``.

A detector is exported for one image (float32 3×H×W, RGB in [0, 1], H and W dynamic) through
:class:`DetectorForExport`, a traceable forward over the same modules and maths as the eager model's
(``BatchedRegionProposalNetwork.proposal_candidates``, ``BatchedRoIHeads.detection_candidates``, the resize,
anchors, RoIAlign and mask pasting), without Python control flow on data: the eager path's per-image splits,
chunk loops and NMS strategy choice become one-image tensor code. NMS runs as one ``resdet::grouped_nms`` op (NMS
within each group: level for proposals, class for detections): eager it is :func:`heads.postprocess.grouped_nms`,
in ONNX one ``NonMaxSuppression`` with a class per group, so no group offsets and no float64 are needed.

The exported program returns ``boxes`` (N×4), ``labels`` (N, int64), ``scores`` (N) and, for Mask R-CNN, ``masks``
(N×1×H×W probabilities at input size): what the eager model returns for one image.

Example:
    >>> model = heads.build_detector("mask_rcnn", "resnet50").eval()
    >>> heads.export(model, "mask_rcnn.onnx")
    >>> heads.export(model, "mask_rcnn.pt2", format="pt2")
    >>> torch.export.load("mask_rcnn.pt2").module()(torch.rand(3, 480, 640))["masks"].shape

Loading a ``.pt2`` needs ``import heads`` first (it registers ``resdet::grouped_nms``) and torchvision (RoIAlign).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.rpn import concat_box_prediction_layers

from backbones.optimize import fold_norms_
from heads.detectors import FasterRCNN
from heads.detectron2 import Detectron2Transform
from heads.postprocess import _resample_weights, grouped_nms

__all__ = ["DetectorForExport", "Traced", "trace", "export", "FORMATS", "OPSET"]

FORMATS = ("onnx", "pt2")
# ONNX opset of the exported files: 18 is the first with everything used here in its current form (e.g. Pad,
# ScatterElements with reduction, Resize) and onnxscript's torchlib default.
OPSET = 18
# Range of the dynamic image sides: the smallest image still gives every pyramid level at least one cell.
_MIN_SIDE, _MAX_SIDE = 16, 8192


@torch.library.custom_op("resdet::grouped_nms", mutates_args=())
def grouped_nms_op(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, num_groups: int) -> Tensor:
    """:func:`heads.postprocess.grouped_nms` as one op, for export; ``groups`` in ``0..num_groups-1``."""
    return grouped_nms(boxes, scores, groups, iou_threshold)


@grouped_nms_op.register_fake
def _(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, num_groups: int) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.int64)


def _onnx_grouped_nms(boxes, scores, groups, iou_threshold: float, num_groups: int):
    """ONNX for ``resdet::grouped_nms``: one NonMaxSuppression with a score row per group (-inf outside it),
    then the kept indices in decreasing score, equal scores in index order (as the eager op)."""
    from onnxscript import opset18 as op

    ids = op.Range(op.Constant(value_int=0), op.Constant(value_int=num_groups), op.Constant(value_int=1))
    member = op.Equal(op.Unsqueeze(groups, [0]), op.Unsqueeze(ids, [1]))  # [G, K]
    table = op.Where(member, op.Unsqueeze(scores, [0]), op.Constant(value_float=-math.inf))
    selected = op.NonMaxSuppression(
        op.Unsqueeze(boxes, [0]), op.Unsqueeze(table, [0]),
        op.Constant(value_ints=[2**62]), op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[-3.0e38]),
    )
    keep = op.Reshape(op.Slice(selected, [2], [3], [1]), [-1])
    count = op.Shape(keep)
    keep, _ = op.TopK(keep, count, largest=0, sorted=1)
    _, order = op.TopK(op.Gather(scores, keep), count, largest=1, sorted=1)
    return op.Gather(keep, order)


def _resized_size(image: Tensor, min_size: int, max_size: int, min_side: int) -> tuple[Any, Any]:
    """The size torchvision's transform resizes ``image`` to (``scale_factor``, ``recompute_scale_factor``), in the
    same float64 arithmetic, computed as tensors; under export two new size symbols, checked to exceed
    ``min_side`` so that every pyramid level has two cells or more (the exported program asserts it)."""
    sides = torch.stack([_side(image.shape[-2]), _side(image.shape[-1])]).to(torch.float64)
    scale = torch.minimum(min_size / sides.min(), max_size / sides.max())
    new_h, new_w = torch.floor(sides * scale).to(torch.int64).tolist()
    for side in (new_h, new_w):
        torch._check(side > min_side)
        torch._check(side <= max(min_size, max_size))
    return new_h, new_w


def _pasted_masks(masks: Tensor, boxes: Tensor, height: Any, width: Any) -> Tensor:
    """``heads.postprocess.paste_masks_in_image`` as one product for all masks (no chunk loop), same maths."""
    masks, scale = expand_masks(masks, 1)
    x0, y0, x1, y1 = expand_boxes(boxes, scale).to(torch.int64).unbind(1)
    rows = _resample_weights(y0, y1, height, masks.shape[-2], torch.float32)
    cols = _resample_weights(x0, x1, width, masks.shape[-1], torch.float32)
    return torch.bmm(rows, torch.bmm(masks[:, 0].float(), cols.transpose(1, 2)))[:, None]


def _resize_boxes(boxes: Tensor, ratio_height: Tensor, ratio_width: Tensor) -> Tensor:
    """torchvision's ``resize_boxes`` with the ratios given as float32 tensors."""
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_width, y1 * ratio_height, x2 * ratio_width, y2 * ratio_height), dim=1)


def _side(value: Any) -> Tensor:
    """An int (symbolic under export) as a float32 scalar tensor."""
    return torch.ones((), dtype=torch.float32) * value


class DetectorForExport(nn.Module):
    """One image through a ``heads`` FasterRCNN/MaskRCNN in eval mode, written for ``torch.export`` and ONNX.

    ``forward(image)`` takes a float32 3×H×W image (RGB in [0, 1]) and returns a dict with ``boxes``, ``labels``,
    ``scores`` (and ``masks``): the eager model's ``model([image])[0]``, to float rounding. It shares the model's
    modules and parameters (no copy; :func:`trace` wraps a copy with folded norms).
    """

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        if not isinstance(model, FasterRCNN):
            raise ValueError(f"model must be a heads.FasterRCNN or heads.MaskRCNN, got {type(model).__name__}")
        if isinstance(model.transform, Detectron2Transform):
            raise ValueError("export writes torchvision-style detectors; a style='detectron2' detector (its resize, "
                             "proposal and mask rules) is not supported yet")
        self.model = model

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        model = self.model
        transform, roi_heads = model.transform, model.roi_heads
        height, width = image.shape[-2:]
        max_stride = max(spec.stride for spec in model.backbone.output_shape().values())
        new_h, new_w = _resized_size(image, transform.min_size[-1], transform.max_size, max_stride)
        x = F.interpolate(transform.normalize(image)[None], size=(new_h, new_w), mode="bilinear", align_corners=False)
        stride = transform.size_divisible  # batch padding, as torchvision's batch_images
        padded_h, padded_w = (new_h + stride - 1) // stride * stride, (new_w + stride - 1) // stride * stride
        x = F.pad(x, (0, padded_w - new_w, 0, padded_h - new_h))
        features = model.backbone(x)
        size = torch.stack([_side(new_h), _side(new_w)])[None]  # [1, 2] (height, width) of the resized image

        proposals = self._proposals(ImageList(x, [(new_h, new_w)]), features, size)
        box_features = roi_heads.box_head(self._pool(roi_heads.box_roi_pool, features, proposals))
        class_logits, box_regression = roi_heads.box_predictor(box_features)
        no_image = torch.zeros(proposals.shape[0], dtype=torch.int64)
        boxes, scores, labels, _ = roi_heads.detection_candidates(class_logits, box_regression, proposals, no_image,
                                                                 size)
        num_classes = class_logits.shape[1]
        keep = grouped_nms_op(boxes, scores, labels, roi_heads.nms_thresh, num_classes)[: roi_heads.detections_per_img]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]

        result = {"boxes": _resize_boxes(boxes, _side(height) / _side(new_h), _side(width) / _side(new_w)),
                  "labels": labels, "scores": scores}
        if roi_heads.has_mask():
            mask_features = roi_heads.mask_head(self._pool(roi_heads.mask_roi_pool, features, boxes))
            probs = roi_heads.mask_predictor(mask_features).sigmoid()
            probs = probs[torch.arange(probs.shape[0]), labels][:, None]
            result["masks"] = _pasted_masks(probs, result["boxes"], height, width)
        return result

    def _proposals(self, images: ImageList, features: dict[str, Tensor], size: Tensor) -> Tensor:
        """The RPN's proposals for the one image: [P, 4] in decreasing objectness."""
        rpn = self.model.rpn
        maps = list(features.values())
        objectness, deltas = rpn.head(maps)
        anchors = rpn.anchor_generator(images, maps)
        per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(1, -1, 4)
        boxes, scores, _, levels = rpn.proposal_candidates(proposals, objectness, size, per_level)
        keep = grouped_nms_op(boxes, scores, levels, rpn.nms_thresh, len(per_level))[: rpn.post_nms_top_n()]
        return boxes[keep]

    @staticmethod
    def _pool(pool: nn.Module, features: dict[str, Tensor], boxes: Tensor) -> Tensor:
        """Multi-level RoIAlign of [K, 4] boxes: the pool's level mapping and scales, torchvision's RoIAlign (ONNX
        RoiAlign) on each level's boxes, as ``torchvision.ops.MultiScaleRoIAlign`` without sizes read as ints."""
        maps = [features[name] for name in pool.featmap_names]
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
        if len(maps) == 1:
            return torchvision.ops.roi_align(maps[0], rois, pool.output_size, pool.scales[0], pool.sampling_ratio)
        levels = pool.map_levels([boxes])
        result = boxes.new_zeros((boxes.shape[0], maps[0].shape[1], *pool.output_size))
        for level, (feature, scale) in enumerate(zip(maps, pool.scales)):
            index = torch.where(levels == level)[0]
            pooled = torchvision.ops.roi_align(feature, rois[index], pool.output_size, scale, pool.sampling_ratio)
            result = result.index_put((index,), pooled)
        return result


def _dynamic_image(name: str, min_side: int = _MIN_SIDE) -> dict[int, Any]:
    dim = torch.export.Dim
    return {1: dim(f"{name}_height", min=min_side, max=_MAX_SIDE), 2: dim(f"{name}_width", min=min_side, max=_MAX_SIDE)}


class _NamedOutputs(nn.Module):
    """A backbone's ordered dict of maps as a plain dict (the exported outputs keep its names and order)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return dict(self.backbone(images))


def _prepare(model: nn.Module, example: Optional[Tensor]) -> tuple[nn.Module, Tensor, dict[int, Any], str, list[str]]:
    """What to trace, an example input, its dynamic dims, the input's name and the output names, by kind of model."""
    if isinstance(model, FasterRCNN):
        image = example if example is not None else torch.rand(3, 320, 416)
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"a detector's example is one 3xHxW image, got shape {tuple(image.shape)}")
        names = ["boxes", "labels", "scores"] + (["masks"] if model.roi_heads.has_mask() else [])
        return DetectorForExport(model), image, _dynamic_image("image"), "image", names
    images = example if example is not None else torch.rand(2, 3, 224, 224)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"a classifier's or backbone's example is an Nx3xHxW batch, got shape {tuple(images.shape)}")
    # The coarsest map keeps two cells or more (a size-1 dim would be specialised): sides above its stride.
    shapes = model.stage_shapes() if hasattr(model, "stage_shapes") else getattr(model, "output_shape", dict)()
    image_dims = _dynamic_image("images", min_side=max([spec.stride for spec in shapes.values()] or [32]) + 1)
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: image_dims[1], 3: image_dims[2]}
    if not hasattr(model, "output_shape") or getattr(model, "out_features", ()) is None:
        return model, images, dims, "images", ["logits"]  # a classifier (ResNet without out_features)
    return _NamedOutputs(model), images, dims, "images", list(model.output_shape())


class Traced(NamedTuple):
    """A model traced for export: the program, its input's name and its outputs' names (what :func:`export` writes)."""

    program: torch.export.ExportedProgram
    input_name: str
    output_names: list[str]


def trace(model: nn.Module, example: Optional[Tensor] = None) -> Traced:
    """``torch.export`` a detector, classifier or backbone with dynamic sizes (see :func:`export`).

    Traces an eval-mode copy whose norms are folded into the convolutions (``backbones.fold_norms_``): the
    exported graph holds no BatchNorm (whose empty-input check cannot be traced on a data-dependent number of
    RoIs) and does not rescale weights on every call; outputs equal the model's to float rounding."""
    model = copy.deepcopy(model).eval()
    fold_norms_(model)
    module, example, dims, input_name, names = _prepare(model, example)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=(dims,))
    return Traced(program, input_name, names)


def export(
    model: nn.Module | Traced,
    path: str | Path,
    format: str = "onnx",
    *,
    example: Optional[Tensor] = None,
    opset: int = OPSET,
    optimize: bool = True,
) -> Path:
    """Export a detector, classifier or backbone to ONNX or a ``torch.export`` program (``.pt2``).

    Args:
        model: a ``heads.FasterRCNN``/``MaskRCNN`` (one input ``image``, float32 3×H×W; outputs ``boxes``,
            ``labels``, ``scores`` and ``masks``), a ``backbones.ResNet`` classifier (input ``images`` N×3×H×W,
            output ``logits``) or a backbone returning named maps, e.g. ``backbones.FPN`` (outputs ``p2``, ...),
            (not modified); or what :func:`trace` returned, to write both formats from one trace. H, W and
            the batch are dynamic.
        path: the file to write; written over if it exists.
        format: "onnx" (``torch.onnx.export(dynamo=True)``, checked with ``onnx.checker``) or "pt2".
        example: the input traced (default: random, 320×416 for a detector, 2×3×224×224 otherwise); the
            exported program does not depend on its values or size.
        opset: ONNX opset (>= 18).
        optimize: run onnxscript's graph optimizer (constant folding, fusions) on the ONNX graph; about half of
            the export time of a small model, and onnxruntime optimizes the graph again when it loads it.

    Returns:
        ``path``.

    Example:
        >>> heads.export(model, "model.onnx")
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if opset < OPSET:
        raise ValueError(f"opset must be >= {OPSET}, got {opset}")
    path = Path(path)
    traced = model if isinstance(model, Traced) else trace(model, example)
    if format == "pt2":
        torch.export.save(traced.program, path)
        return path
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter translates with it)
    except ImportError:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install -e '.[export]'") from None
    torch.onnx.export(traced.program, f=str(path), dynamo=True, opset_version=opset, verbose=False, optimize=optimize,
                      external_data=False,  # one file: the weights of these models stay far below 2 GB
                      input_names=[traced.input_name], output_names=traced.output_names,
                      custom_translation_table={torch.ops.resdet.grouped_nms.default: _onnx_grouped_nms})
    onnx.checker.check_model(str(path), full_check=True)
    return path

"""Loading detector checkpoints: ours, torchvision's COCO Faster/Mask R-CNN (v1 and v2), detectron2's model zoo."""
import logging
import re
from collections.abc import Mapping
from pathlib import Path

from backbones.weights import Checkpoint, LoadResult, compare_state_dicts, read_checkpoint
from torch import Tensor, nn

from heads.detectron2 import Detectron2BoxPredictor, convert_detectron2_state, is_detectron2_state

__all__ = ["load_weights", "CLASS_SPECIFIC_PREFIXES"]

logger = logging.getLogger(__name__)

# Layers whose shape depends on the number of classes: left at their initial values when the counts differ.
CLASS_SPECIFIC_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")

# Key layouts of older torchvision checkpoints (e.g. the published COCO v1 files), before the convs became
# Conv2dNormActivation blocks. Renamed only when the old key is absent from the model and the new one present,
# so the result does not depend on the module's state-dict version metadata surviving the round trip.
_LEGACY_KEYS: tuple[tuple[re.Pattern, object], ...] = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
    (
        re.compile(r"^(roi_heads\.mask_head)\.mask_fcn(\d+)\.(weight|bias)$"),
        lambda m: f"{m[1]}.{int(m[2]) - 1}.0.{m[3]}",
    ),
)


def load_weights(model: nn.Module, checkpoint: Checkpoint, strict: bool = True) -> LoadResult:
    """Load detector weights into ``model`` (a ``heads`` FasterRCNN/MaskRCNN), in place.

    Args:
        model: the detector; its module names are torchvision's, so torchvision's checkpoints of
            ``fasterrcnn_resnet50_fpn(_v2)`` and ``maskrcnn_resnet50_fpn(_v2)`` load into the matching
            ``build_detector(kind, "resnet50", variant=...)``.
        checkpoint: a path (``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``,
            ``.safetensors``, or a detectron2 model-zoo ``.pkl`` read by the safe unpickler) or a state dict; a
            training checkpoint with the weights under "model" works too (detectron2's ``.pth`` and ``.pkl``
            included). Read with ``backbones.weights.read_checkpoint``. detectron2's names
            (``backbone.bottom_up.res2.0.conv1.norm.weight``, ``proposal_generator.rpn_head.*``,
            ``roi_heads.box_head.fc1``, ...) are mapped onto a model built with ``style="detectron2"``.
        strict: raise ValueError listing any missing, unexpected or wrongly shaped keys (other than the
            class-specific predictor layers); with False, load what fits and report the rest.

    Returns:
        ``backbones.LoadResult(missing_keys, unexpected_keys, skipped_keys)``; with ``strict=False`` keys of the
        wrong shape count as unexpected.

    A checkpoint trained for another number of classes loads everything but the class-specific predictor layers
    (``CLASS_SPECIFIC_PREFIXES``), which keep their initial values; a warning lists them. BatchNorm's
    ``num_batches_tracked`` counters are optional on both sides, so BN and FrozenBN backbones load each other.

    Example:
        >>> model = build_detector("faster_rcnn", "resnet50", num_classes=91, pretrained_backbone=True)
        >>> load_weights(model, "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth")
    """
    state = read_checkpoint(checkpoint)
    expected = model.state_dict()
    file_names: dict[str, str] = {}
    left_out: list[str] = []
    if is_detectron2_state(state):
        predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
        if not isinstance(predictor, Detectron2BoxPredictor):
            where = f"{checkpoint}: " if isinstance(checkpoint, (str, Path)) else ""
            raise ValueError(
                f"{where}a detectron2 checkpoint (its classifier puts the background last) needs a model built "
                "with build_detector(..., style='detectron2')"
            )
        state, file_names, left_out = convert_detectron2_state(model, state)
    state = {_upgrade_key(key, expected): value for key, value in state.items()}

    report = compare_state_dicts(expected, state)
    skipped = sorted(key for key, _, _ in report.wrong_shape if key.startswith(CLASS_SPECIFIC_PREFIXES))
    mismatched = sorted(
        f"{key} (checkpoint {in_checkpoint}, model {in_model})"
        for key, in_checkpoint, in_model in report.wrong_shape
        if key not in skipped
    )
    unexpected = sorted(file_names.get(key, key) for key in report.unexpected)
    missing = sorted(report.missing)
    if strict and (missing or unexpected or mismatched):
        raise ValueError(
            "checkpoint does not match the model:"
            + "".join(
                f"\n  {what} ({len(keys)}): {', '.join(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                if keys
            )
            + "\nbuild the model with the checkpoint's kind/backbone/variant, or pass strict=False"
        )
    if skipped:
        logger.warning(
            "checkpoint was trained for another number of classes; not loading the class-specific layers %s "
            "(they keep their initial values)",
            ", ".join(skipped),
        )

    wrong_shape = {key for key, _, _ in report.wrong_shape}
    loadable = {key: value for key, value in state.items() if key in expected and key not in wrong_shape}
    model.load_state_dict(loadable, strict=False)
    return LoadResult(missing, unexpected + [entry.split(" ")[0] for entry in mismatched], skipped + left_out)


def _upgrade_key(key: str, expected: Mapping[str, Tensor]) -> str:
    if key in expected:
        return key
    for pattern, replacement in _LEGACY_KEYS:
        new_key = pattern.sub(replacement, key)
        if new_key != key and new_key in expected:
            return new_key
    return key

"""Detection evaluation: COCO metrics of a model during training (:func:`evaluate`, every rank) and of a checkpoint
(:func:`evaluate_checkpoint`, the body of ``tools/eval_coco.py --weights``, optionally with test-time augmentation);
a results file is scored by :func:`tools.engine.coco_eval.score_results_file`.

Each writes ``metrics.json`` (:meth:`CocoEvaluation.to_json`: the 12 numbers per IoU type and ``per_category``
AP) and ``pr_curves.png`` (:func:`tools.engine.plots.plot_pr_curves`) into its output folder."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from tools.engine.checkpoint import CheckpointManager
from tools.engine.coco_dataset import CocoDetection
from tools.engine.coco_eval import CocoEvaluation, evaluate_coco_details, write_eval
from tools.engine.coco_results import detections_to_coco_results
from tools.engine.det_config import DetTrainConfig, dataset_paths
from tools.engine.det_loader import build_det_loader
from heads.spec import load_detector
from tools.engine.det_model import for_inference
from tools.engine.det_tta import DetectorWithTTA, TTASettings
from tools.engine.distributed import all_gather_object, is_main_process
from tools.engine.faults import crash_point
from tools.engine.runner import default_device
from tools.engine.train_utils import AmpSettings, autocast
from tools.engine.visualize import draw_detections, save_grid

__all__ = ["evaluate", "prediction_grid", "evaluate_config", "evaluate_checkpoint"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    dataset: CocoDetection,
    device: torch.device,
    label_to_cat_id: dict[int, int] | None = None,
    amp: AmpSettings | None = None,
    iou_types: Sequence[str] | None = None,
) -> tuple[CocoEvaluation | None, list[dict] | None]:
    """COCO-evaluate ``model`` on ``loader`` (this rank's share of ``dataset``); returns ``(evaluation, results)``.

    Every rank runs its images; rank 0 gathers all detections (``all_gather_object``), scores them
    (:func:`tools.engine.coco_eval.evaluate_coco_details`) against ``dataset.coco`` (``bbox``, plus ``segm`` for
    Mask R-CNN) and returns them; other ranks get ``(None, None)``. The model is left in eval mode.
    ``evaluation.metrics`` holds the 12 numbers per IoU type.
    """
    model.eval()
    amp = amp or AmpSettings(None, False)
    mapping = label_to_cat_id or dataset.label_to_cat_id
    has_masks = model.roi_heads.has_mask()
    results: list[dict] = []
    for images, targets in loader:
        images = [img.to(device, non_blocking=True) for img in images]
        with autocast(device, amp):
            outputs = model(images)
        results += detections_to_coco_results(outputs, [t["image_id"] for t in targets], mapping)
        crash_point("eval")  # test hook (tools.engine.faults)
    gathered = all_gather_object(results)
    if not is_main_process():
        return None, None
    results = [r for part in gathered for r in part]
    iou_types = iou_types or (("bbox", "segm") if has_masks else ("bbox",))
    return evaluate_coco_details(dataset.coco, results, iou_types), results


def prediction_grid(model: nn.Module, dataset: CocoDetection, count: int, device: torch.device,
                     class_names: Sequence[str], score_thresh: float, out_png: Path) -> Path | None:
    """Draw the predictions on the first ``count`` images of ``dataset`` into one PNG grid."""
    if count <= 0 or len(dataset) == 0:
        return None
    model.eval()
    drawn = []
    with torch.no_grad():
        for index in range(min(count, len(dataset))):
            image, _ = dataset[index]
            image = image.as_subclass(Tensor)
            detections = model([image.to(device)])[0]
            drawn.append(draw_detections(image, detections, class_names, score_thresh))
    return save_grid(drawn, out_png)



def evaluate_config(cfg: DetTrainConfig, model_overrides: dict[str, Any] | None = None,
                    tta: TTASettings | None = None) -> dict[str, dict[str, float]]:
    """``--eval-only``: evaluate a checkpoint on the recipe's validation set and write the results (``tta``: as
    :func:`evaluate_checkpoint`'s).

    The model is rebuilt from the checkpoint (``heads.load_detector``; ``model_overrides`` replace
    what it says). The weights are ``cfg.weights`` when given, else ``OUTPUT_DIR/model_final.pth``, else the newest
    checkpoint in ``OUTPUT_DIR``. Writes ``coco_results.json`` and ``metrics.json`` there.
    """
    out = Path(cfg.output_dir)
    weights: Path | None = Path(cfg.weights) if cfg.weights else None
    if weights is None:
        weights = out / "model_final.pth" if (out / "model_final.pth").is_file() else CheckpointManager(out).latest()
    if weights is None:
        raise ValueError(f"--eval-only needs --weights or a checkpoint in {out}")
    paths = dataset_paths(cfg)
    return evaluate_checkpoint(weights, paths["val_images"], paths["val_ann"], out, model_overrides,
                               device=cfg.device, batch_size=cfg.batch_size, workers=cfg.workers,
                               allow_outside_root=cfg.allow_outside_root, tta=tta)


def _label_mapping(info: dict[str, Any], dataset: CocoDetection) -> dict[int, int]:
    """Label -> category id: the checkpoint's (COCO's ids for a COCO-sized checkpoint without its own, see
    ``heads.load_detector``), else the dataset's categories in id order. A COCO model may run on a subset of COCO's
    categories; any other checkpoint must know every id it names."""
    if info["label_to_cat_id"] is not None:
        mapping = info["label_to_cat_id"]
        if info.get("coco_labels"):
            logger.info("checkpoint has no label map; %d classes: using COCO's category ids",
                        info["model_spec"]["num_classes"])
    else:
        mapping = dataset.label_to_cat_id
        logger.info("checkpoint has no label map; using the dataset's categories in id order")
    unknown = sorted(set(mapping.values()) - set(dataset.cat_ids))
    if unknown and not info.get("coco_labels"):
        raise ValueError(f"the checkpoint's category ids {unknown} are not in the dataset (ids {dataset.cat_ids})")
    return {label: cat for label, cat in mapping.items() if cat in dataset.coco.cats}


def evaluate_checkpoint(
    weights: str | Path,
    val_images: str | Path,
    val_ann: str | Path,
    output_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    device: str | None = None,
    batch_size: int = 2,
    workers: int = 2,
    allow_outside_root: bool = False,
    bf16: bool = False,
    compile: bool = False,
    tta: TTASettings | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate a detector checkpoint on a COCO set; prints the table, writes ``coco_results.json``,
    ``metrics.json`` and ``pr_curves.png``; returns the 12 numbers per IoU type.

    Detections whose class the dataset lacks (a COCO model on a subset) are left out.
    ``allow_outside_root``: accept annotation ``file_name``s that are absolute or leave ``val_images``.
    ``bf16`` / ``compile``: run through :func:`backbones.optimize_for_inference` with those options.
    ``tta``: run the model through :class:`tools.engine.det_tta.DetectorWithTTA` with these settings;
    ``metrics.json`` then records them under ``"tta"`` (with the sizes actually run).

    Example:
        >>> evaluate_checkpoint("model_final.pth", "val/", "val.json", "out/", tta=TTASettings(sizes=(640, 800)))
    """
    dev = torch.device(device or default_device())
    model, info = load_detector(weights, overrides)
    model = for_inference(model.to(dev), bf16, compile)
    masks = model.roi_heads.has_mask()
    extra = None
    if tta is not None:
        model = DetectorWithTTA(model, tta)
        extra = {"tta": {**tta.to_json(), "augmentations": [list(a) for a in model.augmentations]}}
        logger.info("test-time augmentation: %d views (min size, max size, flip): %s", len(model.augmentations),
                    ", ".join(f"({a.min_size}, {a.max_size}, {a.flip})" for a in model.augmentations))
    val_set = CocoDetection(val_images, val_ann, None, with_masks=masks, allow_outside_root=allow_outside_root)
    mapping = _label_mapping(info, val_set)
    loader = build_det_loader(val_set, batch_size, train=False, workers=workers)
    model.eval()
    results: list[dict] = []
    with torch.no_grad():
        for images, targets in loader:
            outputs = model([img.to(dev) for img in images])
            outputs = [_keep_labels(o, mapping) for o in outputs]
            results += detections_to_coco_results(outputs, [t["image_id"] for t in targets], mapping)
    evaluation = evaluate_coco_details(val_set.coco, results, ("bbox", "segm") if masks else ("bbox",))
    write_eval(Path(output_dir), evaluation, results, extra)
    return evaluation.metrics


def _keep_labels(output: dict[str, Tensor], mapping: dict[int, int]) -> dict[str, Tensor]:
    keep = torch.tensor([int(label) in mapping for label in output["labels"].tolist()], dtype=torch.bool)
    return {k: v[keep.to(v.device)] for k, v in output.items()}

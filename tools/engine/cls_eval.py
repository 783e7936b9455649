"""Classification evaluation: top-1/top-5 during training (every rank) and of a checkpoint (the body of
``tools/train_cls.py --eval-only``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

import backbones
from backbones.weights import read_run_file
from tools.engine.cls_config import ClsTrainConfig, build_model, check_model_options
from tools.engine.cls_data import EXPECTED_LAYOUT, build_transforms, eval_loader, image_folder
from tools.engine.config import load_config
from tools.engine.distributed import all_gather_object
from tools.engine.faults import crash_point
from tools.engine.runner import default_device
from tools.engine.train_utils import AmpSettings, autocast

__all__ = ["evaluate", "evaluate_checkpoint"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: AmpSettings = AmpSettings(None, False),
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 and top-k accuracy (fractions; k = min(5, classes)) over ``loader``, summed over all ranks.

    The loader yields ``(images, targets, skipped)`` as built by this module. Returns
    ``{"top1", "top5", "num_images", "skipped_images"}``.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = count = skipped = 0
    for images, targets, n_skipped in loader:
        skipped += n_skipped
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        k = min(5, logits.shape[1])
        topk = logits.float().topk(k, dim=1).indices
        hits = topk == targets[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        count += len(targets)
        crash_point("eval")  # test hook (tools.engine.faults)
    model.train(was_training)
    totals = [sum(x) for x in zip(*all_gather_object((correct1, correct5, count, skipped)))]
    correct1, correct5, count, skipped = totals
    if count == 0:
        raise ValueError("evaluation saw no images (all unreadable or an empty val set)")
    return {"top1": correct1 / count, "top5": correct5 / count, "num_images": count, "skipped_images": skipped}


def evaluate_checkpoint(
    weights: str | Path,
    data: str | Path,
    model: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    workers: int = 4,
    use_ema: bool = False,
    crop_pct: float | None = None,
    interpolation: Literal["bilinear", "bicubic"] | None = None,
) -> dict[str, float]:
    """Top-1/top-5 of a checkpoint on ``DIR/val`` (or ``DIR`` itself when it holds the class folders).

    ``weights`` is one of ours (``model_final.pth`` or a training checkpoint: model name,
    options, classes and image size are read from it) or a torchvision/timm ImageNet
    checkpoint (``.pth``/``.safetensors``, read by ``backbones.load_weights``; pass ``model``).
    ``image_size``, ``crop_pct`` and ``interpolation`` default to the values stored in our
    checkpoints, else 224 / 0.875 / bilinear (torchvision's ImageNet evaluation).
    """
    state = read_run_file(weights)
    # What the checkpoint says about its model and evaluation goes through the config's checks first.
    stored = {key: state.get(source) for key, source in (("model", "model_name"), ("model_options", "model_options"),
              ("image_size", "image_size"), ("crop_pct", "crop_pct"), ("interpolation", "interpolation"))}
    stored = {key: value for key, value in stored.items() if value is not None}
    checked = load_config(ClsTrainConfig, None, stored, overrides_name=f"{weights} (stored settings)")
    name = model or stored.get("model")
    if name is None:
        raise ValueError(f"{weights} does not name its model; pass --model (one of {sorted(backbones.FACTORIES)})")
    try:
        options = check_model_options(name, checked.model_options)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    if use_ema:
        if not isinstance(state.get("model_ema"), dict):
            raise ValueError(f"{weights} holds no EMA weights (train with ema: true)")
        weights_state = state["model_ema"]
    else:
        weights_state = state
    try:
        flat = backbones.read_checkpoint(weights_state)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    if "fc.weight" not in flat:
        raise ValueError(f"{weights} has no classifier (fc.weight); it cannot be evaluated as a classifier")
    num_classes = flat["fc.weight"].shape[0]
    cfg = load_config(ClsTrainConfig, None, {
        "image_size": image_size or checked.image_size, "crop_pct": crop_pct or checked.crop_pct,
        "interpolation": interpolation or checked.interpolation}, overrides_name="evaluation settings")

    root = Path(data)
    val_dir = root / "val" if (root / "val").is_dir() else root
    if not val_dir.is_dir():
        raise ValueError(f"data folder {root} does not exist. Expected layout: {EXPECTED_LAYOUT}")
    val_set = image_folder(val_dir, build_transforms(cfg)[1], skip_bad_images=False)
    if len(val_set.classes) != num_classes:
        raise ValueError(f"{weights} has {num_classes} classes but {val_dir} has {len(val_set.classes)} class folders")
    saved_classes = state.get("class_names")
    if saved_classes is not None and (not isinstance(saved_classes, list) or saved_classes != val_set.classes):
        raise ValueError(f"class folders {val_set.classes} differ from the checkpoint's classes {saved_classes!r}")

    dev = torch.device(device or default_device())
    net = build_model(name, num_classes, options)
    try:
        backbones.load_weights(net, flat)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    net.to(dev)
    loader = eval_loader(val_set, batch_size, workers, 0, 1)
    return evaluate(net, loader, dev)

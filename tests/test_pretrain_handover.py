"""Pretrain -> fine-tune hand-over, end to end through the two command-line tools: ``tools/train_cls.py`` writes
``model_final.pth`` and ``tools/train_det.py --pretrained`` starts its detector's backbone body from it."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tools import train_cls, train_det
from tools.engine import det_train
from tools.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


def test_classifier_weights_start_the_detector_backbone(shapes_imagefolder, coco_shapes, tmp_path, monkeypatch):
    # 1. A tiny classification run with the embedded recipe (its backbone width is the detection recipe's).
    cls_out = tmp_path / "cls"
    assert train_cls.main([
        "--model", "resnet18", "--config", str(REPO / "configs/cls/shapes.yaml"), "--data", str(shapes_imagefolder),
        "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--workers", "0", "--device", "cpu",
        "--output-dir", str(cls_out),
    ]) == 0
    classifier = load_checkpoint(cls_out / "model_final.pth")["model"]
    # The recipe's AdamW runs the fused kernel (5x less optimizer time per step on CPU).
    last = sorted(cls_out.glob("model_0*.pth"))[-1]
    assert load_checkpoint(last)["optimizer"]["param_groups"][0]["fused"] is True
    assert "fc.weight" in classifier
    # Training moved the BatchNorm statistics off their initial values, so a dropped or mis-mapped norm shows.
    assert not torch.allclose(classifier["bn1.running_mean"], torch.zeros_like(classifier["bn1.running_mean"]))

    # 2. Two detection iterations from that checkpoint, with the embedded detection recipe on tiny images.
    started: list[dict[str, torch.Tensor]] = []
    real_load = det_train.load_start_weights

    def recording_load(model, pretrained=None, weights=None, verbose=True):
        real_load(model, pretrained, weights, verbose)
        started.append({k: v.detach().clone() for k, v in model.backbone.body.state_dict().items()})

    monkeypatch.setattr(det_train, "load_start_weights", recording_load)
    det_out = tmp_path / "det"
    assert train_det.main([
        "--config", str(REPO / "configs/shapes.yaml"), "--backbone", "resnet18",
        "--pretrained", str(cls_out / "model_final.pth"),
        "--train-images", coco_shapes["train_images"], "--train-ann", coco_shapes["train_ann"],
        "--val-images", coco_shapes["val_images"], "--val-ann", coco_shapes["val_ann"],
        "--iters", "2", "--batch-size", "2", "--min-size", "64", "--max-size", "64", "--workers", "0",
        "--device", "cpu", "--output-dir", str(det_out),
    ]) == 0

    # The body started with every classifier weight and statistic; the classifier itself was dropped.
    assert len(started) == 1
    body = started[0]
    expected = {k: v for k, v in classifier.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert not any(k.startswith("fc.") for k in body)
    assert set(expected) <= set(body)
    for key, value in expected.items():
        assert torch.equal(body[key], value), key

    # After training, the frozen parts (stem, c2, every FrozenBN statistic) still hold the classifier's values.
    final = load_checkpoint(det_out / "model_final.pth")["model"]
    frozen = [k for k in expected if k.startswith(("conv1.", "bn1.", "layer1.")) or "running_" in k]
    assert len(frozen) > 20
    for key in frozen:
        assert torch.equal(final[f"backbone.body.{key}"], expected[key]), key
    assert "bbox" in json.loads((det_out / "metrics.json").read_text())

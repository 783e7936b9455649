"""Detectors over the ResNet-FPN backbones: Faster R-CNN and Mask R-CNN (torchvision's conventions; detectron2's
for its model zoo)."""
from heads.build import DETECTORS, RESNET_BACKBONES, STYLES, build_detector
from heads.detectors import VARIANTS, ClassAgnosticBoxPredictor, FasterRCNN, MaskRCNN
from heads.export import DetectorForExport, export
from heads.inputs import check_images, check_targets
from heads.predictor import Predictor
from heads.spec import build_from_spec, check_model_spec, load_detector
from heads.weights import CLASS_SPECIFIC_PREFIXES, load_weights

__all__ = [
    "FasterRCNN",
    "MaskRCNN",
    "ClassAgnosticBoxPredictor",
    "build_detector",
    "load_weights",
    "load_detector",
    "build_from_spec",
    "check_model_spec",
    "export",
    "Predictor",
    "DetectorForExport",
    "check_images",
    "check_targets",
    "DETECTORS",
    "RESNET_BACKBONES",
    "STYLES",
    "VARIANTS",
    "CLASS_SPECIFIC_PREFIXES",
]

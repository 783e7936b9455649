"""``Predictor``: detections for images given as paths, PIL images, numpy arrays or tensors (detectron2's
DefaultPredictor counterpart), from an eager detector or an exported ONNX file run in onnxruntime."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from heads.spec import load_detector

__all__ = ["Predictor", "ImageInput"]

ImageInput = Union[str, Path, Image.Image, np.ndarray, Tensor]


def _as_tensor(image: ImageInput, bgr: bool) -> Tensor:
    """One input as a float32 3×H×W RGB tensor in [0, 1]."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"numpy images must be HxWx3 uint8, got {image.dtype} {image.shape}")
        # A copy: the array may be read-only (PIL's) or a reversed view (BGR).
        image = torch.from_numpy(np.array(image[..., ::-1] if bgr else image)).permute(2, 0, 1)
    elif isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor images must be 3xHxW, got shape {tuple(image.shape)}")
        if bgr:
            image = image.flip(0)
    else:
        raise ValueError(f"an image must be a path, PIL image, numpy array or tensor, got {type(image).__name__}")
    return image.float() / 255 if image.dtype == torch.uint8 else image.float()


class Predictor:
    """Run a detector on one or many images; returns per-image dicts with ``class_names`` added.

    Args:
        model: a ``heads`` detector (put in eval mode and moved to ``device`` here), or the path of a checkpoint
            ``heads.load_detector`` reads (resdet's, torchvision's, detectron2's), which rebuilds it; or None with
            ``onnx``.
        onnx: path of a detector exported by ``heads.export`` / ``tools/export.py``, run in onnxruntime instead.
        device: where the eager model runs (default: cuda when available, else cpu); onnxruntime uses its CPU
            provider unless ``device`` is "cuda" and its CUDA provider is installed.
        score_thresh: detections scoring below this are dropped.
        class_names: name of each label 1..K (label 0 is the background); labels without a name are given as
            their number. Default: the checkpoint's names when ``model`` is a path (torchvision's COCO names for a
            91-class checkpoint without names), else none.
        batch_size: images per eager forward (the ONNX model takes one image at a time). A batch pads its images
            to a common size, as torchvision's and detectron2's detectors do, which moves detections slightly
            compared with one image per forward; 1 gives exactly the exported model's results.

    Attributes:
        info: for a checkpoint path, what ``heads.load_detector`` read besides the model (``label_to_cat_id``,
            ``class_names``, ``model_spec``); else None.

    Example:
        >>> predictor = Predictor("output/model_final.safetensors", score_thresh=0.5)
        >>> predictor = Predictor(model, class_names=["cat", "dog"])
        >>> predictor("street.jpg")["class_names"]
        >>> predictor([frame_bgr_uint8], bgr=True)[0]["boxes"]
    """

    def __init__(
        self,
        model: Optional[nn.Module | str | Path] = None,
        *,
        onnx: Optional[str | Path] = None,
        device: Optional[str | torch.device] = None,
        score_thresh: float = 0.5,
        class_names: Optional[Sequence[str]] = None,
        batch_size: int = 4,
    ) -> None:
        if (model is None) == (onnx is None):
            raise ValueError("give exactly one of model and onnx")
        if not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.score_thresh, self.batch_size = score_thresh, batch_size
        self.model, self.session, self.info = None, None, None
        if isinstance(model, (str, Path)):
            model, self.info = load_detector(model)
            if class_names is None:
                class_names = self.info["class_names"]
        self.class_names = list(class_names) if class_names is not None else None
        if model is not None:
            self.model = model.eval().to(self.device)
        else:
            try:
                import onnxruntime
            except ImportError:
                raise ValueError("running an ONNX file needs onnxruntime: pip install -e '.[export]'") from None
            if not Path(onnx).is_file():
                raise ValueError(f"ONNX file {onnx} does not exist")
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            try:
                self.session = onnxruntime.InferenceSession(str(onnx), providers=providers)
            except Exception as e:  # onnxruntime's own exception types (invalid protobuf, unknown op, ...)
                raise ValueError(f"{onnx}: onnxruntime cannot load it: {e}") from None
            self.output_names = [output.name for output in self.session.get_outputs()]
            if self.output_names[:3] != ["boxes", "labels", "scores"]:
                raise ValueError(f"{onnx} is not a detector exported by heads.export: outputs {self.output_names}")

    def __call__(self, images: ImageInput | Sequence[ImageInput], bgr: bool = False
                 ) -> dict[str, Any] | list[dict[str, Any]]:
        """Detections of one image (a dict) or of a list of images (a list of dicts), each with ``boxes`` (N×4
        xyxy pixels), ``labels``, ``scores``, ``class_names`` (N names) and for Mask R-CNN ``masks`` (N×1×H×W
        probabilities), on the CPU. ``bgr``: numpy arrays and tensors are BGR (OpenCV's order)."""
        single = not isinstance(images, (list, tuple))
        tensors = [_as_tensor(image, bgr) for image in ([images] if single else images)]
        outputs = self._run(tensors)
        results = [self._finish(output) for output in outputs]
        return results[0] if single else results

    def _run(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        if self.session is not None:
            return [{name: torch.from_numpy(value) for name, value in
                     zip(self.output_names, self.session.run(None, {"image": image.numpy()}))} for image in images]
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [image.to(self.device) for image in images[start:start + self.batch_size]]
                outputs += [{k: v.cpu() for k, v in d.items()} for d in self.model(batch)]
        return outputs

    def _finish(self, output: dict[str, Tensor]) -> dict[str, Any]:
        keep = output["scores"] >= self.score_thresh
        result: dict[str, Any] = {key: value[keep] for key, value in output.items()}
        result["class_names"] = [self._name(int(label)) for label in result["labels"]]
        return result

    def _name(self, label: int) -> str:
        names = self.class_names
        return names[label - 1] if names and 0 < label <= len(names) else str(label)

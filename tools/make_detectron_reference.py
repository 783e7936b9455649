"""Reference outputs of detectron2 for ``tests/test_detectron_weights.py``: ``tests/data/detectron/*.safetensors``.

Detectors (``DETECTOR_CASES``): deterministic random weights of detectron2's R50-FPN Faster/Mask R-CNN under its own
names (``detectron2_rcnn_state``), written as a model-zoo ``.pkl`` and loaded by its ``DetectionCheckpointer`` into the
``GeneralizedRCNN`` its config system builds; run on images that need no resize, in float64 (detectron2's float32
casts in box decoding and NMS turned off for that run) and in float32, whose distance from float64 is stored as
detectron2's own float32 noise. Saved: detections (boxes, scores, classes, masks as COCO RLE) and RPN proposals.

Backbones:

For each case this writes a deterministic random Caffe2 ImageNet ResNet (``caffe2_resnet_blobs``, named and laid out
as Detectron's ``R-50.pkl``/``X-101-32x8d.pkl``) to a ``.pkl``, loads it with detectron2's own ``DetectionCheckpointer``
(its Caffe2 renaming and FrozenBN handling) into ``build_resnet_backbone``, and saves the input and the res2..res5
features, computed in float64. ``tests/test_detectron_weights.py`` rebuilds the same file from the same seed (the
weights are too large to check in) and compares ``backbones.load_weights`` + ``ResNet`` against these features.

Runs outside the test suite, with detectron2's source on the path (only its pure-Python modules are used, not the
compiled extension: its ROIAlign is torchvision's op) and its pure-Python dependencies installed::

    pip install "fvcore<0.1.6" "iopath<0.1.10" yacs termcolor tabulate cloudpickle "omegaconf<2.4" pycocotools
    PYTHONPATH=/path/to/detectron2 python tools/make_detectron_reference.py

``--compare-full-width`` prints how the library's detectron2-style Mask R-CNN at R50-FPN's real widths compares
with detectron2 instead (too slow in float64 for the test suite).

The small numpy pickles the tests read (``arrays-numpy{1,2}-protocol*.pkl``) come from ``--pickle-fixtures``, run
once under numpy 1 and once under numpy 2. Importing this module needs numpy only: the test imports the generator
from here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import struct
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "detectron"
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGES = ("res2", "res3", "res4", "res5")


class Case(NamedTuple):
    """One reference network, in detectron2's terms (``MODEL.RESNETS.*``) and as ``backbones.ResNet`` arguments."""

    depth: int
    stem_channels: int  # STEM_OUT_CHANNELS; RES2_OUT_CHANNELS is 4x this
    groups: int  # NUM_GROUPS
    group_width: int  # WIDTH_PER_GROUP: c2's 3x3 has groups * group_width channels
    stride_in_1x1: bool
    seed: int
    layout: str  # "blobs": Detectron's {"blobs": {...}}; "flat": {name: array}
    protocol: int  # 2 is written as Python 2 wrote it (see Python2Pickler)

    def resnet_kwargs(self) -> dict[str, Any]:
        """The same network as ``backbones.ResNet`` keyword arguments (besides ``depth``)."""
        return dict(
            groups=self.groups,
            width_per_group=self.group_width * 64 // self.stem_channels,
            base_channels=self.stem_channels,
            stride_in_1x1=self.stride_in_1x1,
        )


CASES = {
    # MSRA's R-50.pkl: full width, stride on the 1x1, Detectron's {"blobs": ...} as Python 2 pickled it.
    "R-50": Case(50, 64, 1, 64, True, seed=50, layout="blobs", protocol=2),
    # FAIR's X-101-32x8d.pkl layout (32 groups, stride on the 3x3) at a quarter of its width, flat dict.
    "X-101-32x2d-stem16": Case(101, 16, 32, 2, False, seed=101, layout="flat", protocol=4),
}


def caffe2_resnet_blobs(case: Case, num_classes: int = 1000) -> dict[str, np.ndarray]:
    """Random Caffe2 ResNet blobs named as Detectron's ImageNet files, the same for a given ``case`` on every numpy.

    Convolutions ``*_w`` (He-normal) with Detectron's zero ``*_b``; affine-only norms ``*_bn_s``/``*_bn_b`` (scales
    0.5..1.5, 0.1..0.5 at the end of a residual branch so activations stay bounded; biases -0.2..0.2); ``fc1000_w/b``.
    ``np.random.RandomState``: its stream is fixed across numpy versions, unlike ``default_rng``'s.
    """
    rng = np.random.RandomState(case.seed)
    blobs: dict[str, np.ndarray] = {}

    def conv(name: str, out_ch: int, in_ch: int, k: int, groups: int = 1) -> None:
        fan_in = in_ch // groups * k * k
        blobs[f"{name}_w"] = (rng.standard_normal((out_ch, in_ch // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(
            np.float32
        )
        blobs[f"{name}_b"] = np.zeros(out_ch, np.float32)

    def norm(name: str, channels: int, low: float = 0.5, high: float = 1.5) -> None:
        blobs[f"{name}_s"] = rng.uniform(low, high, channels).astype(np.float32)
        blobs[f"{name}_b"] = rng.uniform(-0.2, 0.2, channels).astype(np.float32)

    conv("conv1", case.stem_channels, 3, 7)
    norm("res_conv1_bn", case.stem_channels)
    in_ch, out_ch, width = case.stem_channels, case.stem_channels * 4, case.groups * case.group_width
    for stage, count in zip(STAGES, BLOCKS[case.depth]):
        for i in range(count):
            prefix = f"{stage}_{i}"
            if i == 0:
                conv(f"{prefix}_branch1", out_ch, in_ch, 1)
                norm(f"{prefix}_branch1_bn", out_ch)
            conv(f"{prefix}_branch2a", width, in_ch if i == 0 else out_ch, 1)
            norm(f"{prefix}_branch2a_bn", width)
            conv(f"{prefix}_branch2b", width, width, 3, case.groups)
            norm(f"{prefix}_branch2b_bn", width)
            conv(f"{prefix}_branch2c", out_ch, width, 1)
            norm(f"{prefix}_branch2c_bn", out_ch, 0.1, 0.5)
        in_ch, out_ch, width = out_ch, out_ch * 2, width * 2
    blobs["fc1000_w"] = (rng.standard_normal((num_classes, in_ch)) * 0.01).astype(np.float32)
    blobs["fc1000_b"] = np.zeros(num_classes, np.float32)
    return blobs


def blobs_digest(blobs: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes and bytes: tells whether a regenerated network is the one the reference used."""
    digest = hashlib.sha256()
    for name in sorted(blobs):
        digest.update(f"{name}{blobs[name].shape}{blobs[name].dtype.str}".encode())
        digest.update(np.ascontiguousarray(blobs[name]).tobytes())
    return digest.hexdigest()


class Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote it (Detectron's files): ``str`` and ``bytes`` as BINSTRING (Python 2's
    byte strings, which ``encoding="latin1"`` turns into ``str``) and numpy's module as ``numpy.core``, instead of
    Python 3's ``_codecs.encode`` calls and ``numpy._core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=2)

    def save_py2_str(self, obj: Any) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: Any = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode("ascii"))
        self.memoize(obj)


def write_pickle(case: Case, blobs: dict[str, np.ndarray], path: Path) -> None:
    """Write ``blobs`` as a Detectron ImageNet file would hold them."""
    data = {"blobs": blobs} if case.layout == "blobs" else blobs
    with open(path, "wb") as f:
        if case.protocol == 2:
            Python2Pickler(f).dump(data)
        else:
            pickle.dump(data, f, protocol=case.protocol)


def fixture_arrays() -> dict[str, Any]:
    """The small dict ``--pickle-fixtures`` pickles: the dtypes and scalars a checkpoint holds."""
    return {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "f64": np.linspace(-1, 1, 5),
        "i64": np.array([-(2**40), 0, 3], dtype=np.int64),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "empty": np.zeros((0, 4), np.float32),
        "big_endian": np.array([1.5, -2.0], dtype=">f4"),
        "scalar": np.float32(0.25),
        "__author__": "resdet fixture",
    }


def write_pickle_fixtures(folder: Path) -> list[Path]:
    """``arrays-numpy<major>-protocol<p>.pkl`` for protocols 2, 4 and 5, with the running numpy: run once under
    numpy 1 and once under numpy 2 to have both module layouts (``numpy.core``, ``numpy._core``)."""
    paths = []
    for protocol in (2, 4, 5):
        path = folder / f"arrays-numpy{np.__version__.split('.')[0]}-protocol{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump(fixture_arrays(), f, protocol=protocol)
        paths.append(path)
    return paths


def reference_input(case: Case, size: int = 64) -> np.ndarray:
    """The raw ``(1, 3, size, size)`` float64 batch both backbones see (no pixel mean or BGR step: that is the
    detector's, not the backbone's)."""
    return np.random.RandomState(case.seed + 1).standard_normal((1, 3, size, size))


# -- whole detectors: detectron2's GeneralizedRCNN ---------------------------------------------------------------


class DetectorCase(NamedTuple):
    """One reference detector: detectron2's R50-FPN Faster/Mask R-CNN config, optionally narrower (for test time).

    ``stem_channels`` is ``RESNETS.STEM_OUT_CHANNELS`` (64: the real R-50; res2 is 4x, the bottleneck 1x);
    ``fpn_channels`` ``FPN.OUT_CHANNELS``; ``box_head_width`` ``ROI_BOX_HEAD.FC_DIM``; ``mask_head_width``
    ``ROI_MASK_HEAD.CONV_DIM``; ``num_classes`` ``ROI_HEADS.NUM_CLASSES``. The images are ``(height, width)``
    with the shorter side 800 and the longer <= 1333: detectron2's test resize leaves them as they are.
    """

    kind: str  # "faster_rcnn" or "mask_rcnn"
    stem_channels: int
    fpn_channels: int
    box_head_width: int
    mask_head_width: int
    num_classes: int
    seed: int
    image_sizes: tuple[tuple[int, int], ...]
    background_offset: float = 2.0  # added to the background logit: fewer proposals pass the 0.05 threshold

    def build_options(self) -> dict[str, Any]:
        """``heads.build_detector(kind, "resnet50", **options)`` keywords for the same network."""
        return dict(
            num_classes=self.num_classes,
            style="detectron2",
            backbone_options=dict(base_channels=self.stem_channels),
            fpn_options=dict(out_channels=self.fpn_channels),
            box_head_width=self.box_head_width,
            **(dict(mask_head_width=self.mask_head_width) if self.kind == "mask_rcnn" else {}),
        )


_NARROW = dict(stem_channels=8, fpn_channels=32, box_head_width=128, mask_head_width=32, num_classes=80)
DETECTOR_CASES = {
    # R50-FPN at an eighth of its widths (float64 convolutions take the slow path), COCO's 80 classes, two images
    # of different sizes in one padded batch.
    "mask_rcnn_R_50_FPN-narrow": DetectorCase("mask_rcnn", **_NARROW, seed=2024,
                                              image_sizes=((800, 1000), (960, 800)), background_offset=11.0),
    # The 100-detection cut at work: more than 100 detections pass the threshold.
    "faster_rcnn_R_50_FPN-narrow": DetectorCase("faster_rcnn", **_NARROW, seed=2025, image_sizes=((800, 928),)),
}
# Scales of the random head weights (relative to a unit-variance initialisation): large enough that the RPN
# ranks proposals clearly and that the classifier gives clear detections above detectron2's 0.05 threshold.
_OBJECTNESS_SCALE = 0.8
_CLASS_SCALE = 0.5
_MASK_SCALE = 4.0


def detectron2_rcnn_state(case: DetectorCase) -> dict[str, np.ndarray]:
    """Random weights of detectron2's R50-FPN ``GeneralizedRCNN`` under its own names, the same for a ``case`` on
    every numpy (``RandomState``). FrozenBN layers get non-trivial statistics (mean -0.2..0.2, variance 0.5..2)."""
    rng = np.random.RandomState(case.seed)
    state: dict[str, np.ndarray] = {}

    def weight(name: str, shape: tuple[int, ...], std: float) -> None:
        state[f"{name}.weight"] = (rng.standard_normal(shape) * std).astype(np.float32)

    def bias(name: str, channels: int, scale: float = 0.1) -> None:
        state[f"{name}.bias"] = rng.uniform(-scale, scale, channels).astype(np.float32)

    def conv(name: str, out_ch: int, in_ch: int, k: int, gain: float = 2.0, with_bias: bool = True) -> None:
        weight(name, (out_ch, in_ch, k, k), np.sqrt(gain / (in_ch * k * k)))
        if with_bias:
            bias(name, out_ch)

    def norm(name: str, channels: int, low: float = 0.5, high: float = 1.5) -> None:
        state[f"{name}.weight"] = rng.uniform(low, high, channels).astype(np.float32)
        state[f"{name}.bias"] = rng.uniform(-0.2, 0.2, channels).astype(np.float32)
        state[f"{name}.running_mean"] = rng.uniform(-0.2, 0.2, channels).astype(np.float32)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)

    bottom_up = "backbone.bottom_up"
    stem = case.stem_channels
    # The input is 0..255 minus the mean (about 74 rms for uniform noise): the stem scales it to unit size.
    weight(f"{bottom_up}.stem.conv1", (stem, 3, 7, 7), np.sqrt(2.0 / (3 * 49)) / 74.0)
    norm(f"{bottom_up}.stem.conv1.norm", stem)
    in_ch, out_ch, width = stem, stem * 4, stem
    widths = {}
    for stage, count in zip(STAGES, BLOCKS[50]):
        for i in range(count):
            prefix = f"{bottom_up}.{stage}.{i}"
            if i == 0:
                conv(f"{prefix}.shortcut", out_ch, in_ch, 1, with_bias=False)
                norm(f"{prefix}.shortcut.norm", out_ch)
            conv(f"{prefix}.conv1", width, in_ch if i == 0 else out_ch, 1, with_bias=False)
            norm(f"{prefix}.conv1.norm", width)
            conv(f"{prefix}.conv2", width, width, 3, with_bias=False)
            norm(f"{prefix}.conv2.norm", width)
            conv(f"{prefix}.conv3", out_ch, width, 1, with_bias=False)
            norm(f"{prefix}.conv3.norm", out_ch, 0.1, 0.5)
        widths[stage] = out_ch
        in_ch, out_ch, width = out_ch, out_ch * 2, width * 2
    channels = case.fpn_channels
    for level, stage in zip(range(2, 6), STAGES):
        conv(f"backbone.fpn_lateral{level}", channels, widths[stage], 1, gain=1.0)
        conv(f"backbone.fpn_output{level}", channels, channels, 3, gain=1.0)
    rpn = "proposal_generator.rpn_head"
    conv(f"{rpn}.conv", channels, channels, 3)
    conv(f"{rpn}.objectness_logits", 3, channels, 1, gain=_OBJECTNESS_SCALE**2)
    conv(f"{rpn}.anchor_deltas", 12, channels, 1, gain=0.01)
    box, fc = "roi_heads.box_head", case.box_head_width
    weight(f"{box}.fc1", (fc, channels * 49), np.sqrt(2.0 / (channels * 49)))
    bias(f"{box}.fc1", fc)
    weight(f"{box}.fc2", (fc, fc), np.sqrt(2.0 / fc))
    bias(f"{box}.fc2", fc)
    classes = case.num_classes
    # Rows centred: the box head's features are ReLU outputs (all positive), whose mean would otherwise give each
    # class a fixed offset and one class every detection. The background logit gets an offset so that only the
    # clearest proposals pass the 0.05 threshold.
    weight("roi_heads.box_predictor.cls_score", (classes + 1, fc), _CLASS_SCALE / np.sqrt(fc))
    _centre_rows(state["roi_heads.box_predictor.cls_score.weight"])
    bias("roi_heads.box_predictor.cls_score", classes + 1)
    state["roi_heads.box_predictor.cls_score.bias"][-1] += case.background_offset
    weight("roi_heads.box_predictor.bbox_pred", (4 * classes, fc), 0.1 / np.sqrt(fc))
    bias("roi_heads.box_predictor.bbox_pred", 4 * classes)
    if case.kind == "mask_rcnn":
        mask, dim = "roi_heads.mask_head", case.mask_head_width
        for k in range(1, 5):
            conv(f"{mask}.mask_fcn{k}", dim, channels if k == 1 else dim, 3)
        weight(f"{mask}.deconv", (dim, dim, 2, 2), np.sqrt(2.0 / dim))
        bias(f"{mask}.deconv", dim)
        conv(f"{mask}.predictor", classes, dim, 1, gain=_MASK_SCALE**2)
        _centre_rows(state[f"{mask}.predictor.weight"])  # masks that vary over the box, not all on or all off
    return state


def _centre_rows(weight: np.ndarray) -> None:
    """Subtract each output's mean weight over its inputs, in place."""
    flat = weight.reshape(weight.shape[0], -1)
    flat -= flat.mean(axis=1, keepdims=True)


def reference_images(case: DetectorCase) -> list[np.ndarray]:
    """The RGB float64 images in [0, 1] (``3 x H x W``) both detectors see: smooth random blobs over noise."""
    rng = np.random.RandomState(case.seed + 1)
    images = []
    for height, width in case.image_sizes:
        coarse = rng.uniform(0, 1, (3, height // 32 + 2, width // 32 + 2))
        smooth = np.kron(coarse, np.ones((32, 32)))[:, :height, :width]
        images.append(np.clip(0.7 * smooth + 0.3 * rng.uniform(0, 1, (3, height, width)), 0, 1))
    return images


def write_detectron2_pkl(state: dict[str, np.ndarray], path: Path) -> None:
    """Write ``state`` as detectron2's model zoo does: ``{"model": {name: array}, "__author__": ...}``."""
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "resdet reference"}, f, protocol=2)


def _detectron2_cfg(case: DetectorCase) -> Any:
    from detectron2.config import get_cfg

    cfg = get_cfg()
    name = "mask_rcnn_R_50_FPN_1x" if case.kind == "mask_rcnn" else "faster_rcnn_R_50_FPN_1x"
    folder = "COCO-InstanceSegmentation" if case.kind == "mask_rcnn" else "COCO-Detection"
    import detectron2

    root = Path(detectron2.__file__).resolve().parent.parent / "configs"
    cfg.merge_from_file(str(root / folder / f"{name}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = case.stem_channels
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = case.stem_channels * 4
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = case.stem_channels
    cfg.MODEL.FPN.OUT_CHANNELS = case.fpn_channels
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = case.box_head_width
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = case.mask_head_width
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = case.num_classes
    return cfg


class _Float64Throughout:
    """detectron2 keeps boxes in float32 even in a float64 model (``Boxes`` casts its tensor, box decoding and NMS
    call ``.float()``), and its NMS then fails on float64 scores. For the float64 reference, while the model runs,
    ``Tensor.float`` keeps the dtype and ``Boxes`` keeps a float64 tensor as it is, so that the whole model is
    float64; nothing else changes (in float32 both are no-ops)."""

    def __enter__(self) -> None:
        import torch
        from detectron2.structures import Boxes

        self.float, self.init = torch.Tensor.float, Boxes.__init__
        init = self.init

        def keep_float64(boxes: Any, tensor: Any) -> None:
            init(boxes, tensor)  # detectron2's checks
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
                boxes.tensor = tensor.reshape(-1, 4)

        torch.Tensor.float = lambda tensor, *args, **kwargs: tensor  # type: ignore[method-assign]
        Boxes.__init__ = keep_float64  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        import torch
        from detectron2.structures import Boxes

        torch.Tensor.float = self.float  # type: ignore[method-assign]
        Boxes.__init__ = self.init  # type: ignore[method-assign]


def _detectron2_detections(case: DetectorCase, pkl: Path, images: list[np.ndarray], dtype: Any) -> list[dict]:
    import contextlib

    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(_detectron2_cfg(case)).eval()
    DetectionCheckpointer(model).load(str(pkl))
    model.to(dtype)
    inputs = [
        {"image": torch.from_numpy(image).to(dtype).mul(255.0).flip(0), "height": image.shape[1],
         "width": image.shape[2]}
        for image in images
    ]
    proposals: list[Any] = []
    hook = model.proposal_generator.register_forward_hook(lambda m, i, o: proposals.extend(o[0]))
    with torch.no_grad(), (_Float64Throughout() if dtype == torch.float64 else contextlib.nullcontext()):
        outputs = model(inputs)
    hook.remove()
    results = []
    for output, proposal in zip(outputs, proposals):
        instances = output["instances"]
        result = {
            "boxes": instances.pred_boxes.tensor.double(),
            "scores": instances.scores.double(),
            "classes": instances.pred_classes.long(),
            "proposals": proposal.proposal_boxes.tensor.double(),
        }
        if instances.has("pred_masks"):
            result["masks"] = instances.pred_masks.bool()
        results.append(result)
    return results


def _mask_rle(masks: Any) -> list[dict[str, Any]]:
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    return [{"size": list(e["size"]), "counts": e["counts"].decode("ascii")} for e in encoded]


def _noise(reference: list[dict], other: list[dict]) -> dict[str, Any]:
    """How far detectron2's float32 run is from its float64 run (boxes and scores of matching detections)."""
    import torch

    noise: dict[str, Any] = {"same_detections": True, "box": 0.0, "score": 0.0}
    for ref, out in zip(reference, other):
        if not torch.equal(ref["classes"], out["classes"]):
            noise["same_detections"] = False
            continue
        noise["box"] = max(noise["box"], (ref["boxes"] - out["boxes"]).abs().max().item() if len(ref["boxes"]) else 0)
        noise["score"] = max(noise["score"], (ref["scores"] - out["scores"]).abs().max().item()
                             if len(ref["scores"]) else 0)
        if "masks" in ref:
            inter = (ref["masks"] & out["masks"]).flatten(1).sum(1)
            union = (ref["masks"] | out["masks"]).flatten(1).sum(1).clamp(min=1)
            noise["mask_iou"] = min(noise.get("mask_iou", 1.0), (inter / union).min().item() if len(inter) else 1.0)
    return noise


def write_detector_reference(name: str, case: DetectorCase, output: Path, keep_pkl: bool = False) -> Path:
    """Run detectron2 on ``case`` in float64 (and float32, for its noise) and save ``<name>.safetensors``."""
    import tempfile

    import detectron2
    import torch
    from safetensors.torch import save_file

    state = detectron2_rcnn_state(case)
    images = reference_images(case)
    with tempfile.TemporaryDirectory() as tmp:
        pkl = (output if keep_pkl else Path(tmp)) / f"{name}.pkl"
        write_detectron2_pkl(state, pkl)
        reference = _detectron2_detections(case, pkl, images, torch.float64)
        single = _detectron2_detections(case, pkl, images, torch.float32)
    tensors: dict[str, Any] = {}
    masks = []
    for i, result in enumerate(reference):
        for key in ("boxes", "scores", "classes", "proposals"):
            tensors[f"{key}{i}"] = result[key].contiguous()
        if "masks" in result:
            masks.append(_mask_rle(result["masks"]))
        print(f"  image {i} {tuple(images[i].shape)}: {len(result['boxes'])} detections, scores "
              f"{result['scores'].max().item() if len(result['scores']) else 0:.3f} max, classes "
              f"{sorted(set(result['classes'].tolist()))[:12]}")
    noise = _noise(reference, single)
    print(f"  detectron2 float32 vs float64: {noise}")
    metadata = {
        "case": json.dumps(case._asdict()),
        "state_sha256": blobs_digest(state),
        "images_sha256": blobs_digest({str(i): image for i, image in enumerate(images)}),
        "float32_noise": json.dumps(noise),
        "masks_rle": json.dumps(masks),
        "detectron2": getattr(detectron2, "__version__", "unknown"),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    path = output / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    print(f"  wrote {path} ({path.stat().st_size} bytes)")
    return path


# The real R50-FPN widths, for a one-off comparison (too slow in float64 for the test suite).
FULL_WIDTH = DetectorCase("mask_rcnn", 64, 256, 1024, 256, 80, seed=7, image_sizes=((800, 1000),))


def compare_full_width() -> None:
    """Print how ``heads``' detectron2-style Mask R-CNN at R50-FPN's real widths compares with detectron2's, in
    float64 and float32, against detectron2's float64 run (needs detectron2, like the references)."""
    import tempfile

    import torch

    import heads

    case = FULL_WIDTH
    images = reference_images(case)
    with tempfile.TemporaryDirectory() as tmp:
        pkl = Path(tmp) / "full-width.pkl"
        write_detectron2_pkl(detectron2_rcnn_state(case), pkl)
        reference = _detectron2_detections(case, pkl, images, torch.float64)
        single = _detectron2_detections(case, pkl, images, torch.float32)
        print(f"detectron2 float32 vs float64: {_noise(reference, single)}")
        model = heads.build_detector(case.kind, "resnet50", **case.build_options()).eval()
        heads.load_weights(model, pkl)
    for dtype in (torch.float64, torch.float32):
        with torch.no_grad():
            outputs = model.to(dtype)([torch.from_numpy(image).to(dtype) for image in images])
        ours = [{"boxes": o["boxes"].double(), "scores": o["scores"].double(), "classes": o["labels"] - 1,
                 "masks": o["masks"][:, 0] >= 0.5} for o in outputs]
        print(f"heads {dtype} vs detectron2 float64: {_noise(reference, ours)}, "
              f"{[len(r['boxes']) for r in reference]} detections")


def _detectron2_features(case: Case, pkl: Path, image: np.ndarray) -> dict[str, Any]:
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()
    resnets = cfg.MODEL.RESNETS
    resnets.DEPTH = case.depth
    resnets.NORM = "FrozenBN"
    resnets.STRIDE_IN_1X1 = case.stride_in_1x1
    resnets.NUM_GROUPS = case.groups
    resnets.WIDTH_PER_GROUP = case.group_width
    resnets.STEM_OUT_CHANNELS = case.stem_channels
    resnets.RES2_OUT_CHANNELS = case.stem_channels * 4
    resnets.OUT_FEATURES = list(STAGES)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    DetectionCheckpointer(backbone).load(str(pkl))
    stem_var = backbone.stem.conv1.norm.running_var
    print(f"  detectron2 stem FrozenBN after loading: running_var in [{stem_var.min():.8f}, {stem_var.max():.8f}], "
          f"eps {backbone.stem.conv1.norm.eps}")
    backbone.eval().double()
    with torch.no_grad():
        features = backbone(torch.from_numpy(image))
    return {name: features[name].contiguous() for name in STAGES}


def main(argv: list[str] | None = None) -> int:
    """Write one ``<case>.safetensors`` per case into ``--output``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder for the reference files")
    parser.add_argument("--keep-pkl", action="store_true", help="also leave the generated .pkl files there")
    parser.add_argument(
        "--pickle-fixtures", action="store_true",
        help="only write the small numpy pickles (needs numpy alone; run under numpy 1 and 2)",
    )
    parser.add_argument("--detectors", action="store_true", help="only write the detector references")
    parser.add_argument("--backbones", action="store_true", help="only write the backbone references")
    parser.add_argument("--compare-full-width", action="store_true",
                        help="only print heads vs detectron2 at R50-FPN's real widths (writes nothing)")
    args = parser.parse_args(argv)
    if args.compare_full_width:
        compare_full_width()
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    if args.pickle_fixtures:
        for path in write_pickle_fixtures(args.output):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
        return 0
    if not args.backbones:
        for name, detector in DETECTOR_CASES.items():
            print(f"{name}: {detector}")
            write_detector_reference(name, detector, args.output, args.keep_pkl)
        if args.detectors:
            return 0

    import tempfile

    import detectron2
    import torch
    from safetensors.torch import save_file

    for name, case in CASES.items():
        print(f"{name}: {case}")
        blobs = caffe2_resnet_blobs(case)
        with tempfile.TemporaryDirectory() as tmp:
            pkl = (args.output if args.keep_pkl else Path(tmp)) / f"{name}.pkl"
            write_pickle(case, blobs, pkl)
            image = reference_input(case)
            features = _detectron2_features(case, pkl, image)
        tensors = {"input": torch.from_numpy(image), **features}
        metadata = {
            "case": json.dumps(case._asdict()),
            "blobs_sha256": blobs_digest(blobs),
            "detectron2": getattr(detectron2, "__version__", "unknown"),
            "torch": torch.__version__,
            "numpy": np.__version__,
        }
        path = args.output / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        print(f"  wrote {path} ({path.stat().st_size} bytes): " + ", ".join(
            f"{k} {tuple(v.shape)}" for k, v in features.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

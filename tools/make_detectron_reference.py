"""Reference features of detectron2's ResNet backbone loading Caffe2 weights: ``tests/data/detectron/*.safetensors``.

For each case this writes a deterministic random Caffe2 ImageNet ResNet (``caffe2_resnet_blobs``, named and laid out
as Detectron's ``R-50.pkl``/``X-101-32x8d.pkl``) to a ``.pkl``, loads it with detectron2's own ``DetectionCheckpointer``
(its Caffe2 renaming and FrozenBN handling) into ``build_resnet_backbone``, and saves the input and the res2..res5
features, computed in float64. ``tests/test_detectron_weights.py`` rebuilds the same file from the same seed (the
weights are too large to check in) and compares ``backbones.load_weights`` + ``ResNet`` against these features.

Runs outside the test suite, with detectron2's source on the path (only its pure-Python modules are used, not the
compiled extension) and its pure-Python dependencies installed::

    pip install "fvcore<0.1.6" "iopath<0.1.10" yacs termcolor tabulate cloudpickle "omegaconf<2.4"
    PYTHONPATH=/path/to/detectron2 python tools/make_detectron_reference.py

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
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.pickle_fixtures:
        for path in write_pickle_fixtures(args.output):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
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

"""Reading checkpoints safely and loading them into backbones.

Every file goes through ``torch.load(weights_only=True)``, safetensors, or (``.pkl`` files of Detectron and
detectron2) an unpickler that rebuilds only containers, numbers, strings and numpy arrays: a checkpoint can carry
tensors and plain values, never code.
"""
from __future__ import annotations

import collections
import importlib
import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "Checkpoint",
    "KeyReport",
    "LoadResult",
    "UnsafeCheckpointError",
    "compare_state_dicts",
    "read_file",
    "read_checkpoint",
    "read_metadata",
    "read_run_file",
    "load_weights",
    "load_state_dict_checked",
]

logger = logging.getLogger(__name__)

Checkpoint = Union[str, Path, Mapping[str, Any]]
# Keys under which checkpoints nest the weights: training scripts (ours, timm's and torchvision's references, and
# detectron2's model zoo) use "model"; Detectron's Caffe2 files "blobs".
_NESTING_KEYS = ("model", "state_dict", "model_state_dict", "blobs")
# Deformable-conv offset predictors are absent from plain checkpoints; they start at zero (a plain 3x3 conv).
_OFFSET_KEYS = ("conv2_offset.weight", "conv2_offset.bias")


class LoadResult(NamedTuple):
    """What ``load_weights`` did not load: keys absent from the checkpoint, extra ones, and deliberately skipped.

    Missing keys are the model's names; unexpected and skipped keys are named as in the checkpoint (a Caffe2 file's
    blob names, e.g. ``res2_0_branch2a_b``).
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    skipped_keys: list[str]


class UnsafeCheckpointError(ValueError, pickle.UnpicklingError):
    """A checkpoint holds Python objects other than tensors and plain values: refused, nothing of it ran.

    A ``ValueError`` (the command-line tools report it as a user error, naming the file) and a
    ``pickle.UnpicklingError`` (what ``torch.load(weights_only=True)`` raises).
    """


def read_file(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Any:
    """Load a ``.safetensors`` file, a ``.pth/.pt/.bin`` file with ``torch.load(weights_only=True)``, or a ``.pkl``.

    A ``.pkl`` is a Detectron/detectron2 pickle (``{"blobs": {name: array}}``, ``{"model": {name: array}, ...}`` or a
    flat ``{name: array}``, Python 2 pickles included), read by an unpickler that rebuilds only containers, numbers,
    strings and numpy arrays; its numeric arrays come back as tensors. A ``.pkl`` written by ``torch.save`` is read
    like a ``.pth``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file holds objects other than tensors, arrays and plain containers (a pickle that
            would run code is refused without running it).
        ValueError: naming ``path``, for anything else that is not a readable checkpoint: empty, truncated or
            corrupt files, other file types, a safetensors file with a bad header, an unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        if path.suffix == ".pkl" and not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                loaded = _ArrayUnpickler(f, path).load()
            # The legacy (pre-zip) torch.save format starts with a pickled magic number: torch.load reads it below.
            if not (type(loaded) is int and loaded == torch.serialization.MAGIC_NUMBER):
                return _arrays_to_tensors(loaded, map_location)
        return torch.load(path, map_location=map_location, weights_only=True)
    except UnsafeCheckpointError:
        raise
    except pickle.UnpicklingError as e:
        refused = _refusal(path, e)
        if refused is not None:
            raise UnsafeCheckpointError(f"refused to load {path}: {refused}") from None
        raise ValueError(f"cannot read checkpoint {path}: {_read_problem(path, e)}") from None
    except Exception as e:  # noqa: BLE001 - corrupt bytes surface as EOFError, KeyError, OSError, RuntimeError,
        # SafetensorError, ...: whatever the parser tripped on, the file is not a readable checkpoint.
        raise ValueError(f"cannot read checkpoint {path}: {_read_problem(path, e)}") from None


def read_metadata(path: Union[str, Path]) -> dict[str, Any]:
    """The header metadata of a ``.safetensors`` file, JSON values decoded (``{}`` for other files).

    resdet's training tools store what rebuilds the model there (e.g. ``model_spec``, ``class_names``) as JSON
    strings.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the header is unreadable
        raise ValueError(f"cannot read the header of {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         ) from None
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value  # a plain string written by another tool
    return decoded


def read_run_file(path: Union[str, Path]) -> dict[str, Any]:
    """A checkpoint file as a dict (:func:`read_file`); for a ``.safetensors`` file, its header's metadata with the
    weights under ``"model"``, so both of resdet's final files (``model_final.pth``/``.safetensors``) read alike."""
    state = read_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    if Path(path).suffix == ".safetensors":
        state = {**read_metadata(path), "model": state}
    return state


def _numpy_global(module: str, name: str) -> Callable[[], Any]:
    """The numpy object ``numpy._core.<module>.<name>`` (numpy 2) or ``numpy.core.<module>.<name>`` (numpy 1)."""

    def resolve() -> Any:
        try:
            found = importlib.import_module(f"numpy._core.{module}")
        except ImportError:
            found = importlib.import_module(f"numpy.core.{module}")
        return getattr(found, name)

    return resolve


def _numpy_attribute(name: str) -> Callable[[], Any]:
    def resolve() -> Any:
        import numpy

        return getattr(numpy, name)

    return resolve


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2 and below: latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as Python 3 pickles an empty ``bytes`` at protocol 2 and below; nothing else."""
    if args:
        raise pickle.UnpicklingError("unexpected bytes(...) call in the pickle")
    return b""


# Everything a pickle of nested dicts/lists of numpy arrays and scalars references, as written by numpy 1 and 2
# (``numpy.core`` / ``numpy._core``) with every pickle protocol: ``_reconstruct`` + ``ndarray`` + ``dtype`` (protocols
# 0-4), ``_frombuffer`` (protocol 5), ``scalar`` (numpy scalars), and the bytes of protocols 0-2 (``_codecs.encode``,
# ``bytes()``); plus the plain containers Python pickles by reference.
_PICKLE_GLOBALS: dict[str, Callable[[], Any]] = {
    **{
        f"{package}.{module}.{name}": _numpy_global(module, name)
        for package in ("numpy.core", "numpy._core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    },
    "numpy.ndarray": _numpy_attribute("ndarray"),
    "numpy.dtype": _numpy_attribute("dtype"),
    "_codecs.encode": lambda: _latin1_encode,
    "__builtin__.bytes": lambda: _empty_bytes,
    "builtins.bytes": lambda: _empty_bytes,
    "collections.OrderedDict": lambda: collections.OrderedDict,
    "__builtin__.set": lambda: set,
    "builtins.set": lambda: set,
    "__builtin__.frozenset": lambda: frozenset,
    "builtins.frozenset": lambda: frozenset,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds containers, numbers, strings and numpy arrays; any other global is refused before anything runs.

    ``find_class`` is asked for every global a pickle names, before the pickle can call it: refusing there means no
    code of the file runs. ``encoding="latin1"`` reads Python 2 pickles (Detectron's Caffe2 files), whose ``str``
    holds the arrays' bytes.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        resolve = _PICKLE_GLOBALS.get(f"{module}.{name}")
        if resolve is None:
            shown = f"{module}.{name}"
            shown = shown if shown.isprintable() else ascii(shown)
            raise UnsafeCheckpointError(
                f"refused to load {self._path}: it holds Python objects other than arrays and plain values "
                f"({shown[:200]}), which could run code when unpickled"
            )
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("unsupported persistent id in a .pkl file (not a Detectron/detectron2 pickle)")


def _arrays_to_tensors(obj: Any, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``obj`` with numeric numpy arrays turned into tensors (copies, native byte order) and numpy scalars into
    Python numbers, through dicts, lists and tuples; other arrays (strings, objects) are left as they are."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            return obj
        try:
            tensor = torch.from_numpy(np.array(obj, dtype=obj.dtype.newbyteorder("="), copy=True))
        except TypeError:  # a dtype torch has no tensor type for
            return obj
        return tensor.to(map_location)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _arrays_to_tensors(v, map_location) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_arrays_to_tensors(v, map_location) for v in obj)
    return obj


def _refusal(path: Path, error: pickle.UnpicklingError) -> Optional[str]:
    """Why a safe load refused ``path``, or None when its bytes are simply no checkpoint (random, corrupt)."""
    if not str(error).startswith("Weights only load failed"):
        return None  # the plain unpickler: not a pickle at all
    # torch wraps its unpickler's message in advice (retry with weights_only=False); the original is the context.
    raw = str(error.__context__ or error).strip()
    first = raw.splitlines()[0].strip() if raw else ""
    if first.startswith(("Unsupported operand", "String is too long", "unsupported persistent id")) or not first:
        with open(path, "rb") as f:
            is_pickle = f.read(1) == b"\x80"  # the PROTO opcode every pickle since protocol 2 starts with
        if not is_pickle or not first.startswith("Unsupported operand"):
            return None  # a byte that is no pickle opcode, a length past the end: random or corrupt data
        return (f"it is a pickle that a safe load cannot read ({first}; e.g. written by pickle.dump, not "
                "torch.save), and unpickling it could run code")
    found = re.sub(r"\s*was not an allowed global by default.*", "", first).removeprefix("Unsupported global: ")
    return (f"it holds Python objects other than tensors and plain values ({found[:200]}), which could run code "
            "when unpickled")


def _read_problem(path: Path, error: Exception) -> str:
    """A one-line reason why ``path`` could not be read."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
    except OSError:
        pass
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, EOFError):
        return "the file is truncated"
    if isinstance(error, pickle.UnpicklingError) and error.__context__ is not None:
        error = error.__context__  # torch's own wrapping is advice; the unpickler's message says what it found
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", lines[0]).split(". ")[0][:200] if lines else ""
    return f"not a PyTorch or safetensors checkpoint, or corrupt ({type(error).__name__}: {detail})"


def read_checkpoint(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """A flat state dict from a path or a dict, unwrapping ``{"model": ...}``-style nesting and DDP's ``module.``."""
    from_file = isinstance(checkpoint, (str, Path))
    where = f"{checkpoint}: " if from_file else ""
    state: Any = read_file(checkpoint) if from_file else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}checkpoint must hold a dict of tensors, got {type(state).__name__}")
    while True:
        nested = next((k for k in _NESTING_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = state[nested]
    if not from_file:
        state = _arrays_to_tensors(state)  # a dict of numpy arrays unpickled by the caller
    state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{where}checkpoint holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _format_keys(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def is_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``: optional on both sides, so BN and FrozenBN checkpoints load each other."""
    return key.endswith("num_batches_tracked")


class KeyReport(NamedTuple):
    """How a state dict fits a model's.

    Attributes:
        missing: the model's keys the state dict lacks, in the model's order.
        unexpected: the state dict's keys the model lacks, in the state dict's order.
        wrong_shape: ``(key, checkpoint shape, model shape)`` for keys in both with different shapes.
    """

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]


def compare_state_dicts(
    expected: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    allowed_missing: Callable[[str], bool] = lambda key: False,
) -> KeyReport:
    """Missing, unexpected and wrongly shaped keys of ``state`` against ``expected`` (a ``model.state_dict()``).

    BatchNorm counters (``num_batches_tracked``) are optional on both sides; keys for which ``allowed_missing`` is
    true may be absent from ``state``.
    """
    missing = [k for k in expected if k not in state and not is_counter(k) and not allowed_missing(k)]
    unexpected = [k for k in state if k not in expected and not is_counter(k)]
    wrong_shape = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return KeyReport(missing, unexpected, wrong_shape)


def load_state_dict_checked(
    model: nn.Module,
    state: Mapping[str, Tensor],
    strict: bool = True,
    allowed_missing: tuple[str, ...] = (),
    names: Optional[Mapping[str, str]] = None,
) -> tuple[list[str], list[str]]:
    """``model.load_state_dict`` with readable errors: shape mismatches, missing and unexpected keys all listed.

    Missing keys ending with one of ``allowed_missing`` are accepted (parameters with a defined initial value), and
    so are BatchNorm counters. ``names`` shows keys in the messages as the checkpoint named them (e.g.
    ``"res2_0_branch2a_bn_s (layer1.0.bn1.weight)"``). Returns the missing and unexpected keys.
    """
    report = compare_state_dicts(model.state_dict(), state, lambda key: key.endswith(allowed_missing))
    names = names or {}
    if report.wrong_shape:
        mismatched = [f"{names.get(k, k)}: checkpoint {c} vs model {m}" for k, c, m in report.wrong_shape]
        raise ValueError(f"checkpoint shapes do not match the model: {_format_keys(mismatched)}")
    if strict and (report.missing or report.unexpected):
        parts = []
        if report.missing:
            parts.append(f"missing keys: {_format_keys([names.get(k, k) for k in report.missing])}")
        if report.unexpected:
            parts.append(f"unexpected keys: {_format_keys([names.get(k, k) for k in report.unexpected])}")
        raise ValueError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=False)
    return report.missing, report.unexpected


def load_weights(model: nn.Module, checkpoint: Checkpoint, strict: bool = True) -> LoadResult:
    """Load ImageNet or library weights into a backbone.

    Args:
        model: a ``ResNet`` (classifier or feature extractor), an ``FPN`` (loads its bottom-up model) or any module
            whose keys match the checkpoint's.
        checkpoint: a path (``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``, ``.safetensors``,
            or a Detectron/detectron2 ``.pkl``) or a state dict; torchvision and timm ImageNet checkpoints, this
            library's own (also training checkpoints nesting the weights under ``"model"``), and Caffe2 ImageNet
            ResNets (``R-50.pkl``, ``R-101.pkl``, ``X-101-32x8d.pkl``: see ``backbones.detectron``).
        strict: raise ``ValueError`` listing any missing or unexpected key (other than those skipped on purpose).

    The classifier (``fc``) is dropped when the model is a feature extractor, and skipped with a message when the
    class count differs. Deformable-conv offset predictors may be missing: they start at zero (a plain conv), and so
    may BatchNorm counters.

    Example:
        >>> model = resnet50(out_features=("c2", "c3", "c4", "c5"))
        >>> load_weights(model, "resnet50-0676ba61.pth")
        >>> msra = ResNet(50, out_features=("c2", "c3", "c4", "c5"), stride_in_1x1=True, norm="FrozenBN")
        >>> load_weights(msra, "R-50.pkl")
    """
    from .detectron import convert_caffe2_state, is_caffe2_state
    from .fpn import FPN
    from .resnet import STAGE_NAMES, ResNet

    if isinstance(model, FPN):
        return load_weights(model.body, checkpoint, strict)
    state = read_checkpoint(checkpoint)
    skipped: list[str] = []
    left_out: list[str] = []  # checkpoint entries the model has no place for, left out on purpose
    file_names: dict[str, str] = {}  # key -> the checkpoint's own name, where it differs
    display_names: dict[str, str] = {}
    if isinstance(model, ResNet):
        if is_caffe2_state(state):
            source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "checkpoint"
            state, file_names, display_names, left_out = convert_caffe2_state(model, state, source)
        own = model.state_dict()
        # Stages past the last requested feature and the classifier of a feature extractor are not built.
        unbuilt = {f"layer{i}" for i in range(len(model.stages()) + 1, len(STAGE_NAMES) + 1)}
        unbuilt |= {"fc"} if model.out_features is not None else set()
        absent = [k for k in state if k.split(".")[0] in unbuilt]
        if absent:
            logger.info("feature extractor: not loading %d checkpoint keys (%s...)", len(absent), absent[0])
        # Only a different class count skips the classifier; a different width is a wrong model and raises below.
        other_classes = "fc.weight" in state and "fc.weight" in own and state["fc.weight"].shape[0] != model.num_classes
        fc_mismatch = [k for k in ("fc.weight", "fc.bias") if other_classes and k in state]
        if fc_mismatch:
            logger.warning(
                "skipping the classifier: checkpoint has %d classes, model has %d",
                state["fc.weight"].shape[0],
                model.num_classes,
            )
        skipped = absent + fc_mismatch
        state = {k: v for k, v in state.items() if k not in set(skipped)}
    missing, unexpected = load_state_dict_checked(
        model, state, strict, allowed_missing=_OFFSET_KEYS + tuple(skipped), names=display_names
    )
    return LoadResult(
        missing, [file_names.get(k, k) for k in unexpected], left_out + [file_names.get(k, k) for k in skipped]
    )

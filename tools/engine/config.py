"""Typed configs: dataclasses loaded from YAML, checked and coerced, plus schedule helpers.

A config is a plain ``@dataclass`` whose fields have simple type hints (``int``, ``float``,
``bool``, ``str``, ``X | None``, ``tuple[...]``, ``list[...]``, ``dict``, ``Literal[...]``).
:func:`load_config` reads a YAML mapping into it, rejects unknown keys (listing the valid
ones), coerces simple types and applies overrides (typically from command-line flags).

Inheritance is explicit and shallow: a YAML file may name one parent with
``_base_: other.yaml`` (path relative to the file). The parent's keys are read first and the
child's keys replace them whole (a ``dict`` value is replaced, not merged). A parent may
not itself have a ``_base_``.

Example::

    @dataclass
    class TrainConfig:
        lr: float = 0.1
        steps: tuple[int, ...] = (30, 60)

    cfg = load_config(TrainConfig, "configs/x.yaml", {"lr": 0.02})
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import yaml

from backbones.options import read_value

__all__ = [
    "load_config",
    "bounds",
    "config_to_dict",
    "save_config",
    "scale_lr",
    "rescale_schedule",
    "ema_decay_for_run",
]

T = TypeVar("T")
_BASE_KEY = "_base_"
_BOUNDS = "bounds"


class Range(NamedTuple):
    """Bounds of a number: ``ge``/``gt`` below, ``le``/``lt`` above; ``None`` leaves that side open."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: object) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]


def bounds(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> dict[str, Range]:
    """Field metadata declaring the range :func:`load_config` checks a number against (each item of a tuple or
    list field; ``None`` values pass).

    Example::

        momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))
    """
    return {_BOUNDS: Range(ge, gt, le, lt)}


def _check_bounds(value: Any, field_range: Range, name: str) -> None:
    items = value if isinstance(value, (list, tuple)) else (value,)
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and item not in field_range:
            raise ValueError(f"config key {name!r} must be {field_range}, got {value!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        data = yaml.safe_load(text)
    except UnicodeDecodeError as err:
        raise ValueError(f"config {path} is not UTF-8 text (bad byte at offset {err.start})") from None
    except OSError as err:
        raise ValueError(f"cannot read config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config {path}: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a YAML mapping at top level, got {type(data).__name__}")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML syntax error or a refused tag, with its line and column."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    if isinstance(err, yaml.constructor.ConstructorError):
        # safe_load refuses tags such as !!python/object, which would build Python objects.
        return f"{where}{problem}; configs hold plain values only (tags that build Python objects are refused)"
    return f"{where}invalid YAML: {problem}"


def _read_with_base(path: Path) -> dict[str, Any]:
    data = _read_yaml(path)
    base_name = data.pop(_BASE_KEY, None)
    if base_name is None:
        return data
    base_path = (path.parent / str(base_name)).resolve()
    base = _read_yaml(base_path)
    if _BASE_KEY in base:
        raise ValueError(
            f"config {path}: its base {base_path} has its own {_BASE_KEY!r}; "
            "inheritance is limited to one level, copy the needed keys instead"
        )
    return {**base, **data}


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                overrides_name: str = "overrides") -> T:
    """Build a ``cls`` dataclass from the defaults, then ``path`` (YAML), then ``overrides``.

    Args:
        cls: a dataclass type whose fields all have defaults.
        path: YAML file (may name one ``_base_`` parent); ``None`` uses the defaults only.
        overrides: key -> value applied last; ``None`` values in it are ignored so that
            unset command-line flags can be passed through as they are.
        overrides_name: what error messages call ``overrides`` (e.g. the checkpoint they came from).

    Raises:
        ValueError: naming the file (or ``overrides_name``) and the key: an unknown key (the message
            lists the valid keys), a value that cannot be read as the field's type, a non-finite
            float, or a number outside the field's declared :func:`bounds`; YAML syntax errors and
            refused tags (``!!python/object``) with their line.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        sources.append((str(path), _read_with_base(Path(path))))
    if overrides:
        sources.append((overrides_name, {k: v for k, v in overrides.items() if v is not None}))
    for origin, data in sources:
        unknown = sorted((k for k in data if k not in fields), key=str)
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown} in {origin} for {cls.__name__}; "
                f"valid keys: {sorted(fields)}"
            )
        for key, value in data.items():
            try:
                values[key] = read_value(value, hints[key], key)
                if _BOUNDS in fields[key].metadata:
                    _check_bounds(values[key], fields[key].metadata[_BOUNDS], key)
            except ValueError as err:
                raise ValueError(f"{origin}: {err}") from None
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (tuples become lists), safe for YAML/JSON and ``torch.load(weights_only=True)``."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML (loadable again with :func:`load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def scale_lr(
    base_lr: float, base_batch: int, batch: int, explicit_lr: float | None = None,
    rule: Literal["linear", "sqrt"] = "linear",
) -> tuple[float, str | None]:
    """Learning rate for ``batch``: the linear scaling rule (Goyal et al., 2017), or ``"sqrt"`` scaling.

    Returns ``(lr, message)``. ``explicit_lr``, when given, is used as is (message ``None``).
    Otherwise ``lr = base_lr * batch / base_batch`` (``"linear"``, for SGD) or
    ``base_lr * sqrt(batch / base_batch)`` (``"sqrt"``, timm's choice for Adam-family optimizers)
    and, when that differs from ``base_lr``, the message says so, for the training log.

    Example::

        >>> scale_lr(0.1, 256, 64)
        (0.025, 'linear scaling rule: lr = 0.1 x 64 / 256 = 0.025')
    """
    if explicit_lr is not None:
        if not explicit_lr > 0 or explicit_lr == float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {explicit_lr}")
        return float(explicit_lr), None
    if base_lr <= 0 or base_batch <= 0 or batch <= 0:
        raise ValueError(
            f"base_lr, base_batch and batch must be > 0, got base_lr={base_lr}, base_batch={base_batch}, batch={batch}"
        )
    if rule not in ("linear", "sqrt"):
        raise ValueError(f"lr scaling rule must be 'linear' or 'sqrt', got {rule!r}")
    if batch == base_batch:
        return float(base_lr), None
    if rule == "sqrt":
        lr = base_lr * (batch / base_batch) ** 0.5
        return lr, f"square-root scaling rule: lr = {base_lr:g} x sqrt({batch} / {base_batch}) = {lr:g}"
    lr = base_lr * batch / base_batch
    return lr, f"linear scaling rule: lr = {base_lr:g} x {batch} / {base_batch} = {lr:g}"


def rescale_schedule(
    base_iters: int, steps: typing.Sequence[int], warmup: int, new_iters: int, warmup_floor: int = 1
) -> tuple[tuple[int, ...], int]:
    """Move decay ``steps`` and the ``warmup`` length from a ``base_iters`` run to a ``new_iters`` run.

    Each decay step keeps its fraction of the run (rounded; a positive step stays >= 1), so a
    recipe written for 90 epochs with decays at 30/60/80 decays at 10/20/27 when run for 30.

    Warmup does not shrink in proportion: it exists so that the first updates of a fresh model do
    not blow up, and that takes a number of updates, not a fraction of the run (a 1000-iteration
    warmup scaled to a 300-iteration run would be 3 iterations, and diverges). The rule:

        warmup' = min(warmup, max(warmup x ratio, warmup_floor), new_iters // 4)

    so it never exceeds the recipe's (a longer run keeps the recipe's warmup), is at least
    ``warmup_floor`` (100 iterations for detection, 1 epoch for classification), and at most a
    quarter of the run. A recipe without warmup stays without. Works for epochs or iterations.

    Example::

        >>> rescale_schedule(90, (30, 60, 80), 5, 30, warmup_floor=1)
        ((10, 20, 27), 2)
        >>> rescale_schedule(90000, (60000, 80000), 1000, 300, warmup_floor=100)
        ((200, 267), 75)
    """
    if base_iters <= 0 or new_iters <= 0:
        raise ValueError(f"base_iters and new_iters must be > 0, got {base_iters} and {new_iters}")
    if warmup < 0 or any(s < 0 for s in steps):
        raise ValueError(f"steps and warmup must be >= 0, got steps={list(steps)}, warmup={warmup}")
    ratio = new_iters / base_iters
    # A step that rounds to 0 would decay before the first update; keep it at 1 at least.
    new_steps = tuple(max(1, int(round(s * ratio))) if s > 0 else 0 for s in steps)
    if warmup == 0:
        return new_steps, 0
    scaled = int(round(warmup * ratio))
    return new_steps, max(1, min(warmup, max(scaled, warmup_floor), new_iters // 4))


def ema_decay_for_run(decay: float, total_updates: int) -> float:
    """``decay``, lowered where needed so that the EMA's time constant ``1 / (1 - decay)`` is at most a tenth
    of the run's ``total_updates``.

    A decay written for a 600-epoch ImageNet run (0.99998: a time constant of 50,000 updates) would
    leave the EMA of a 500-update run at its initial weights.

    Example::

        >>> ema_decay_for_run(0.99998, 750_000), ema_decay_for_run(0.99998, 500)
        (0.99998, 0.98)
    """
    if not 0 < decay < 1:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    if total_updates < 1:
        raise ValueError(f"total_updates must be >= 1, got {total_updates}")
    return min(decay, 1 - 10 / max(total_updates, 20))

"""Reading keyword options given as data (a YAML config, a checkpoint's model spec) against the signature of what
receives them: :func:`keyword_hints` reads a constructor's keyword parameters and their type hints, :func:`check_options`
checks a mapping against them, and :func:`read_value` reads one value as its type hint.

A spec is data, never a way to run code or load files: only keys the receiver declares pass, and values are read as
the simple types their hints name (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[...]``, ``list[...]``,
``dict``, ``Literal[...]``).
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Union

__all__ = ["read_value", "keyword_hints", "check_options"]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def read_value(value: Any, tp: Any, name: str) -> Any:
    """``value`` read as type hint ``tp``; ValueError naming the config key ``name`` otherwise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, name)
    if value is None:
        raise ValueError(f"config key {name!r} may not be null (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"config key {name!r} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp in _SCALAR_READERS:
        return _SCALAR_READERS[tp](value, name)
    if origin in (tuple, list) or tp in (tuple, list):
        return _coerce_sequence(value, tp, name)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {name!r} must be a mapping, got {value!r}")
        return dict(value)
    # Unknown annotation: pass the value through unchanged.
    return value


def _coerce_union(value: Any, tp: Any, name: str) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"config key {name!r} may not be null (expected {_type_name(tp)})")
    candidates = [arg for arg in args if arg is not type(None)]
    for arg in candidates:
        try:
            return read_value(value, arg, name)
        except ValueError as err:
            if len(candidates) == 1:  # "X | None": X's own message says what is wrong
                raise err from None
    raise ValueError(f"config key {name!r}: cannot read {value!r} as {_type_name(tp)}")


def _read_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"config key {name!r} must be a bool (true/false), got {value!r}")


def _read_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"config key {name!r} must be an int, got bool {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ValueError(f"config key {name!r} must be an int, got {value!r}")


def _read_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"config key {name!r} must be a float, got bool {value!r}")
    number = None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            pass
    elif isinstance(value, str):
        # PyYAML reads "1e-4" (no dot) as a string; accept it as the number it clearly is.
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"config key {name!r} must be a float, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"config key {name!r} must be a finite number, got {value!r}")
    return number


def _read_str(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"config key {name!r} must be a string, got {value!r}")


_SCALAR_READERS: dict[type, Callable[[Any, str], Any]] = {
    bool: _read_bool, int: _read_int, float: _read_float, str: _read_str}


def _coerce_sequence(value: Any, tp: Any, name: str) -> list | tuple:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"config key {name!r} must be a list, got {value!r}")
    container = tuple if (origin is tuple or tp is tuple) else list
    if not args:
        return container(value)
    if container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ValueError(f"config key {name!r} must have {len(args)} items, got {value!r}")
        return tuple(read_value(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return container(read_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))


def keyword_hints(*targets: Callable[..., Any], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The keyword parameters of ``targets`` (for a class, its ``__init__``) -> their type hints.

    What a config may pass to a constructor, read from its signature rather than written down twice. A
    parameter whose hint cannot be resolved gets ``Any``.
    """
    exclude = set(exclude)
    hints: dict[str, Any] = {}
    for target in targets:
        function = target.__init__ if inspect.isclass(target) else target
        try:
            resolved = typing.get_type_hints(function)
        except Exception:  # noqa: BLE001 - an unresolvable annotation: names are still known
            resolved = {}
        for name, param in inspect.signature(function).parameters.items():
            if name in exclude or name == "self" or param.kind not in (
                    inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                continue
            hints.setdefault(name, resolved.get(name, Any))
    return hints


def check_options(options: Any, hints: Mapping[str, Any], name: str, *, open_ended: bool = False,
                  refused: Iterable[str] = (), refused_reason: str = "") -> dict[str, Any]:
    """``options`` (keyword arguments from a config or a checkpoint) checked against ``hints``; returns a copy
    with values read as their hints (:func:`keyword_hints`).

    Raises:
        ValueError: naming ``name`` and the key, for a non-mapping, a key not in ``hints`` (the valid keys are
            listed; unless ``open_ended``, for a callee taking ``**kwargs``), a ``refused`` key, or a value that
            does not read as its hint.
    """
    if not isinstance(options, Mapping):
        raise ValueError(f"{name} must be a mapping of keyword arguments, got {options!r}")
    refused = set(refused)
    valid = f"valid keys: {sorted(hints)}" + (" and the model's own keyword arguments" if open_ended else "")
    bad = sorted((k for k in options if k in refused), key=str)
    if bad:
        raise ValueError(f"{name}: {bad} may not be set{f' ({refused_reason})' if refused_reason else ''}; {valid}")
    unknown = sorted((k for k in options if not isinstance(k, str) or (k not in hints and not open_ended)), key=str)
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {unknown}; {valid}")
    return {k: read_value(v, hints[k], f"{name}.{k}") if k in hints else v for k, v in options.items()}

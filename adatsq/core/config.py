"""Map plain mappings (YAML/JSON) onto frozen dataclasses, naming every bad key or value on the way.

One reader serves recipes, checkpoint configs and plan files, so every format rejects unknown keys and
wrong types with the same kind of message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from adatsq.errors import ConfigError

T = TypeVar("T")


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from `data`; `where` names the location for error messages (e.g. 'recipe')."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where}: {err}") from None


def to_mapping(obj: Any) -> Any:
    """Inverse of `from_mapping`: dataclasses and tuples become dicts and lists (JSON/YAML-ready)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(item) for item in obj]
    if isinstance(obj, Mapping):
        return {key: to_mapping(value) for key, value in obj.items()}
    return obj


def _coerce_union(hint: Any, value: Any, where: str) -> Any:
    options = typing.get_args(hint)
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce(option, value, where)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")


def _coerce_tuple(hint: Any, value: Any, where: str) -> tuple:
    args = typing.get_args(hint)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if len(args) != len(value):
        raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
    return tuple(
        _coerce(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, value, strict=True))
    )


def _coerce_dict(hint: Any, value: Any, where: str) -> dict:
    key_type, value_type = typing.get_args(hint)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return {
        _coerce(key_type, k, f"{where} key"): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()
    }


def _coerce_literal(hint: Any, value: Any, where: str) -> Any:
    allowed = typing.get_args(hint)
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def _coerce_plain(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {hint.__name__}, got a boolean {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


# typing origin -> coercion of a value against a hint with that origin
_COERCERS = {
    typing.Union: _coerce_union,
    types.UnionType: _coerce_union,
    tuple: _coerce_tuple,
    dict: _coerce_dict,
    typing.Literal: _coerce_literal,
}


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    return _COERCERS.get(typing.get_origin(hint), _coerce_plain)(hint, value, where)

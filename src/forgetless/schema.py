"""Typed mappings -> dataclasses, naming the offending key: the leaf every config section and every
regularizer's options are parsed with (no forgetless import but errors, so anything may import it)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from forgetless.errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted where that is unambiguous."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}{key}: must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as the number it plainly is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in forgetless, not user input


# keys that existed once: what replaces them
REMOVED_KEYS = {
    "train.bf16": "precision is set once, by model.dtype (auto = bfloat16 on a GPU that supports it; "
                  "bfloat16 / float16 also turn on mixed precision)",
}


def from_dict(cls: type, data: dict[str, Any], where: str = "", prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # YAML 1.1 reads an unquoted `on:` / `off:` key as a boolean; give it back its name.
    data = {({True: "on", False: "off"}.get(k, k) if isinstance(k, bool) else k): v for k, v in data.items()}
    for key in data:
        if f"{prefix}{key}" in REMOVED_KEYS:
            raise ConfigError(f"{where}{prefix}{key}: no longer a setting: {REMOVED_KEYS[f'{prefix}{key}']}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{where}{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name, where)
    built = cls(**kwargs)
    # value checks a dataclass states itself: {field: what is wrong}, named here with the field's full key
    for name, problem in getattr(built, "problems", lambda: {})().items():
        raise ConfigError(f"{where}{prefix}{name}: {problem}")
    return built

"""Typed mappings -> dataclasses, naming the offending key: the leaf every config section and every
regularizer's options are parsed with (no forgetless import but errors, so anything may import it)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from forgetless.errors import ConfigError


def closest(name: Any, choices: Any) -> str | None:
    """The one of `choices` closest to a misspelt `name` (difflib's rule), or None: every "did you mean" here."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return close[0] if close else None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a mapping naming a key twice is an error at the second one: plain yaml
    keeps the last silently, so a config setting train.learning_rate twice would train with whichever came
    last. (A merge key's entries, `<<: *defaults`, may still be overridden: that is what merging is for.)"""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    line = first_line.get(key)
                except TypeError:  # an unhashable key: the safe loader's own error says so
                    continue
                if line is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} appears twice in one mapping (first on line {line + 1}); "
                        "keep one", key_node.start_mark)
                first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """`text` read as YAML by forgetless's one loader (UniqueKeyLoader): config files, run files, overrides."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def read_yaml_mapping(path: Path, hint: str = "") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file: {}); anything else is a ConfigError naming the
    file and the line where it breaks, with `hint` (what to do) after it, never yaml's traceback."""
    try:
        loaded = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{at} not valid YAML: {getattr(exc, 'problem', None) or exc}{hint}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}){hint}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}{hint}")
    return loaded


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
    if dataclasses.is_dataclass(tp):  # a section of options: what the user writes, not the class it is read into
        return "a mapping of its options"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(ConfigError):
    """`key`'s value is not of the annotated kind at all (a union then tries its other arms)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted where that is unambiguous."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch(f"{where}{key}: expected a mapping, got {value!r}", key)
        return from_dict(tp, value, where=where, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except _Mismatch as exc:
                if exc.key != key:  # the value has this arm's shape; what is wrong is inside it
                    raise
            # any other ConfigError (a bad value of the right type: nan, a nested problem) is the answer
        raise _Mismatch(f"{where}{key}: expected {_type_name(tp)}, got {value!r}", key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise _Mismatch(f"{where}{key}: must be one of {_type_name(tp)}, got {value!r}", key)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch(f"{where}{key}: expected {_type_name(tp)}, got {value!r}", key)
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"{where}{key}: expected a mapping, got {value!r}", key)
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        for k in value:
            if key_tp is str and not isinstance(k, str):  # YAML reads `0.1:` or `yes:` as a number / boolean
                raise ConfigError(f"{where}{key}: names must be strings, got {k!r} (quote it: '{k}')")
        return {k: _coerce(v, value_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(f"{where}{key}: expected true or false, got {value!r}", key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(f"{where}{key}: expected an integer, got {value!r}", key)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as the number it plainly is.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise _Mismatch(f"{where}{key}: expected a number, got {value!r}", key)
        try:
            number = float(number)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        # nan passes every `< low` check and inf every `> 0` one: no setting means either
        if not math.isfinite(number):
            raise ConfigError(f"{where}{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(f"{where}{key}: expected a string, got {value!r}", key)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in forgetless, not user input


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _within(value: Any, rule: str) -> bool:
    if rule[0] in "[(":  # an interval: "[0, 1)"
        low, high = (float(x) for x in rule[1:-1].split(","))
        return ((low <= value) if rule[0] == "[" else (low < value)) and \
            ((value <= high) if rule[-1] == "]" else (value < high))
    op, bound = rule.split()  # a bound: ">= 1"
    return _COMPARE[op](value, float(bound))


def out_of_range(obj: Any, ranges: dict[str, str]) -> dict[str, str]:
    """{field: problem} for the numeric fields of `obj` outside their range, each rule written as it
    reads: ">= 1", "> 0", "[0, 1)", "(0, 1]". A list is checked item by item (`field[i]`); None
    (unset) passes. For a dataclass's `problems()` (see from_dict)."""
    found: dict[str, str] = {}
    for name, rule in ranges.items():
        value = getattr(obj, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            problem = _range_problem(item, rule)
            if problem:
                found[name if i is None else f"{name}[{i}]"] = problem
                break
    return found


def _range_problem(value: Any, rule: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # built in code, not parsed
        return f"expected a number, got {value!r}"
    if (isinstance(value, float) and not math.isfinite(value)) or not _within(value, rule):
        return f"must be {'in ' if rule[0] in '[(' else ''}{rule}, got {value!r}"
    return None


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
            close = closest(key, fields)
            hint = f" (did you mean '{prefix}{close}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{where}{prefix}{key}: unknown key{hint}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and name not in data:
            raise ConfigError(f"{where}{prefix}{name}: missing; this setting has no default")
    kwargs = {}
    for name, value in data.items():
        # a field may name its own parser (metadata "parse": (value, where, key) -> value), e.g. the typed
        # `regularizers:` entries of forgetless.registry
        parse = fields[name].metadata.get("parse")
        kwargs[name] = parse(value, where, prefix + name) if parse else _coerce(value, hints[name], prefix + name, where)
    built = cls(**kwargs)
    # value checks a dataclass states itself: {field: what is wrong}, named here with the field's full key
    for name, problem in getattr(built, "problems", lambda: {})().items():
        raise ConfigError(f"{where}{prefix}{name}: {problem}")
    return built


def check_problems(obj: Any, where: str = "", prefix: str = "") -> None:
    """from_dict's value checks (every nested dataclass's `problems()`, inner first) on a dataclass
    built or changed in code."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                check_problems(item, where, f"{prefix}{f.name}{'' if i is None else f'[{i}]'}.")
    for name, problem in getattr(obj, "problems", lambda: {})().items():
        raise ConfigError(f"{where}{prefix}{name}: {problem}")

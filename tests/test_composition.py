"""Methods combined: the rules between regularizers and replay, the presets, and LfU + KL + replay in one run."""

import json

import pytest
import torch

from forgetless.config import load_config
from forgetless.errors import ConfigError
from forgetless.train import train

from conftest import make_trainer, tiny_config, trained_weights, with_method


def test_kl_on_replay_needs_replay(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="needs replay rows"):
        make_trainer(tiny_llama, tmp_path, "lora", [{"kl": {"on": "replay"}}])


def test_rules_between_regularizers_are_checked_when_the_config_is_parsed():
    """Before any model loads, naming the entry and its option; the order of the entries does not matter."""
    from forgetless.config import load_config

    with pytest.raises(ConfigError, match=r"regularizers\[0\].kl.on: 'both' needs replay rows: add a `replay:`"):
        load_config(None, ["regularizers=[{kl: {on: both}}]"])
    load_config(None, ["regularizers=[{kl: {on: both}}]", "replay={}"])  # with replay: fine
    with pytest.raises(ConfigError, match=r"replay.forward: with_sft cannot be combined with lfu"):
        load_config(None, ["regularizers=[{lfu: {}}]", "replay={forward: with_sft}"])
    with pytest.raises(ConfigError, match=r"regularizers\[0\].lfu: at most one perturbing regularizer"):
        load_config(None, ["regularizers=[{lfu: {}}, {lfu: {variant: reps}}]"])
    # and inside a compare run, before anything trains
    with pytest.raises(ConfigError, match=r"compare.runs.x: regularizers\[0\].kl.on: 'replay' needs replay rows"):
        load_config(None, ["compare.runs={x: {regularizers: [{kl: {on: replay}}]}}"])


def test_zero_coef_and_zero_ratio_reproduce_plain_sft_exactly(tiny_llama, memo_data, tmp_path):
    steps = dict(max_steps=4, batch_size=4, learning_rate=1e-2)
    sft = trained_weights(tiny_llama, memo_data, tmp_path / "sft", [], **steps)
    noop = trained_weights(tiny_llama, memo_data, tmp_path / "noop", [{"kl": {"coef": 0.0}}], {"ratio": 0.0}, **steps)
    for n, p in sft.items():
        assert torch.equal(p, noop[n]), n


@pytest.mark.parametrize("method", ["arr", "kl", "replay"])
def test_presets_train_and_log(tiny_gpt2, memo_data, tmp_path, method):
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "o", max_steps=3, batch_size=4, learning_rate=1e-2)
    cfg = load_config(None, [f"method={method}", f"model.name_or_path={cfg.model.name_or_path}",
                             f"data.train={cfg.data.train}", f"output_dir={cfg.output_dir}", "train.max_steps=3",
                             "train.logging_steps=1", "train.progress_bar=false", "model.lora.target_modules=all-linear",
                             "regularizers=[]"]
                      # the default ratio (0.03) draws no replay row in 3 steps of 4 examples: half a row each
                      + (["regularizers=[{kl: {on: both}}]"] if method == "arr" else [])
                      + (["replay={max_length: 16, ratio: 0.5}"] if method in ("arr", "replay") else []))
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    keys = set().union(*rows)
    expected = {"arr": {"kl", "kl_replay", "l_replay"}, "kl": {"kl"}, "replay": {"l_replay", "replay_fraction"}}[method]
    assert expected <= keys


def test_lfu_composes_with_kl_and_replay(tiny_gpt2, memo_data, tmp_path):
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "o", max_steps=3, batch_size=4, learning_rate=1e-2)
    cfg = with_method(cfg, [{"lfu": {}}, {"kl": {"coef": 0.1}}], replay={"max_length": 16, "ratio": 0.5})
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl") if '"l_cons"' in line]
    assert rows and all({"kl", "l_replay", "l_cons"} <= set(r) for r in rows)

"""The command line as a user runs it: subprocesses, exit codes, messages without tracebacks."""

import json
import os
import subprocess
import sys

import pytest

from forgetless.errors import ModelError
from forgetless.model import load_trained

from conftest import memorisation_rows, write_jsonl


def run_cli(*args, cwd=None, **env_vars):
    env = dict(os.environ, **env_vars)
    return subprocess.run([sys.executable, "-m", "forgetless.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_help_everywhere():
    for args in [["--help"], ["train", "--help"], ["config", "--help"]]:
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr
        assert "usage: forgetless" in res.stdout


def test_python_dash_m_forgetless_is_the_command(tmp_path):
    """`python -m forgetless` runs the CLI with its exit status (for a venv whose bin/ is not on PATH)."""
    res = subprocess.run([sys.executable, "-m", "forgetless", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage: forgetless" in res.stdout
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  batchsize: 4\n")
    res = subprocess.run([sys.executable, "-m", "forgetless", "train", str(cfg)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "batchsize" in res.stderr


def test_bad_config_key_is_one_clear_error(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  batchsize: 4\n")
    res = run_cli("train", str(cfg))
    assert res.returncode == 2
    assert "run.yaml: train.batchsize: unknown key (did you mean 'train.batch_size'?)" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_misspelt_packaged_config_name_says_which_it_was_close_to(tmp_path, monkeypatch, capsys):
    from forgetless.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["config", "defualt"]) == 2
    assert "config file defualt does not exist (did you mean the packaged 'default'?)" in capsys.readouterr().err
    assert main(["config", "nothing-like-it"]) == 2
    assert capsys.readouterr().err.strip() == "forgetless: error: config file nothing-like-it does not exist"


def test_uncached_hub_id_offline_is_one_clear_error(tmp_path):
    res = run_cli("train", "default", "model.name_or_path=meta-llama/Llama-3.1-8B", f"output_dir={tmp_path}/o",
                  HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    assert res.returncode == 2
    assert "'meta-llama/Llama-3.1-8B' is not a local folder and not in the Hugging Face cache" in res.stderr
    assert "HF_HUB_OFFLINE is set" in res.stderr and "hf download meta-llama/Llama-3.1-8B" in res.stderr
    assert "Traceback" not in res.stderr


def test_neither_folder_nor_hub_id_is_one_clear_error(tmp_path):
    res = run_cli("train", "default", f"model.name_or_path=./no/such/folder", f"output_dir={tmp_path}/o")
    assert res.returncode == 2
    assert "is neither a local folder nor a Hugging Face Hub id" in res.stderr
    assert "Traceback" not in res.stderr
@pytest.mark.slow
def test_train_end_to_end_from_yaml(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows())
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: {tiny_llama}\n  lora: {{target_modules: all-linear}}\n"
        f"data:\n  train: {data}\n  eval: {data}\n  max_length: 64\ntrain:\n  max_steps: 4\n  batch_size: 4\n"
        "  logging_steps: 2\n  save_steps: 2\n"
    )
    res = run_cli("train", str(cfg), "train.learning_rate=1e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    for noise in ("Setting accelerator to CPU", "is_gradient_checkpointing", "Failed to load CPU gemm_4bit_forward"):
        assert noise not in res.stderr  # third-party lines no user can act on (forgetless.console)
    out = tmp_path / "out"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_steps"] == 4 and summary["eval_loss"] > 0
    assert "learning_rate: 0.001" in (out / "config.yaml").read_text()
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "l_sft" in r] == [1, 2, 4]
    # a second run into the same folder is refused
    res = run_cli("train", str(cfg))
    assert res.returncode == 2 and "--overwrite" in res.stderr
@pytest.mark.slow
def test_eval_command_writes_results_for_base_and_run(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows())
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"Calculate {i} + 5.", "response": str(i + 5)} for i in range(4)])
    text = tmp_path / "g.txt"
    text.write_text(("the quick brown fox jumps over the lazy dog. " * 6 + "\n\n") * 4)
    common = [f"model.name_or_path={tiny_llama}", f"data.train={data}", "data.max_length=64",
              "model.lora.target_modules=all-linear", f"evaluation.task={task}", f"evaluation.general_text={text}",
              "evaluation.block_length=16", "evaluation.mc=null", "evaluation.max_new_tokens=3"]
    res = run_cli("train", "default", f"output_dir={tmp_path / 'o'}", "train.max_steps=2", "train.progress_bar=false", *common)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("eval", "default", *common, "--run", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "base: task NLL" in res.stderr  # its progress: below, a damaged run stops eval before this
    results = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert set(results) == {"base", str(tmp_path / "o")}
    assert results["base"]["general_drift_kl"]["value"] == 0.0
    assert results[str(tmp_path / "o")]["target_acc"]["n"] == 4
    # a damaged adapter config: one line naming the file, no traceback, and nothing written over the results
    adapter = tmp_path / "o" / "adapter_config.json"
    text = adapter.read_text()
    adapter.write_text(text[: len(text) // 2])  # cut short, as by a full disk
    res = run_cli("eval", "default", *common, "--run", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{adapter} is not valid JSON" in res.stderr and "train the run again" in res.stderr
    assert "base: task NLL" not in res.stderr  # refused before the base's evaluation, not after it
    assert json.loads((tmp_path / "o" / "eval.json").read_text()) == results
    adapter.write_text("[]")
    with pytest.raises(ModelError, match="not a peft adapter config"):
        load_trained(tmp_path / "o")
    adapter.write_text(text)
    saved = tmp_path / "o" / "config.yaml"
    saved.write_text("model: [unclosed\n  name: x\n")  # a run's own config, edited by hand into invalid YAML
    res = run_cli("eval", "default", *common, "--run", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{saved}: line 2 not valid YAML" in res.stderr and "base: task NLL" not in res.stderr

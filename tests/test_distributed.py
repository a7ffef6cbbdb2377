"""Two CPU processes (gloo) through `accelerate launch` give the same model as one process that
sees the same micro-batches (batch 2 x 2 accumulation steps), for SFT, LfU and KL+replay."""

import json
import subprocess
import sys

import pytest
import torch

from forgetless.train import load_trained

from conftest import ACCELERATE_CPU, memorisation_rows, write_jsonl


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "lfu", "arr", "kl+replay"])
def test_two_processes_match_one(tiny_llama, tmp_path, method):
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(8))
    corpus = tmp_path / "c.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog " * 8 + "\n\n") * 30)
    common = [f"model.name_or_path={tiny_llama}", f"data.train={data}", "data.max_length=64", "train.max_steps=3",
              "train.batch_size=2", "train.learning_rate=0.05", "train.optim=sgd", "train.max_grad_norm=0",
              "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.progress_bar=false",
              "model.lora.target_modules=all-linear", f"method={method}"]
    if method == "arr":
        common += ["regularizers=[{kl: {coef: 0.5}}]", f"replay={{data: {corpus}, max_length: 16, ratio: 0.5}}"]
    if method == "kl+replay":  # the packaged form: KL on the replay rows as inputs, no NLL on them (weight 0)
        common += ["regularizers=[{kl: {coef: 0.5}}, {kl: {coef: 1.0, on: replay}}]",
                   f"replay={{data: {corpus}, max_length: 16, ratio: 0.5, weight: 0.0}}"]
    one = subprocess.run([sys.executable, "-m", "forgetless.cli", "train", "default", f"output_dir={tmp_path / 'one'}",
                          "train.grad_accum=2", *common], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # --overwrite of an earlier run under several processes: emptied once, no race
    stale = tmp_path / "two" / "metrics.jsonl"
    stale.parent.mkdir()
    (stale.parent / ".forgetless-run").write_text("{}")
    stale.write_text('{"step": 1}\n')
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU),
                          "-m", "forgetless.cli", "train", "default", f"output_dir={tmp_path / 'two'}", "--overwrite",
                          *common], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert '{"step": 1}' not in stale.read_text()
    assert two.stdout.count("done:") == 1  # the summary is printed by the main process only
    # ... and its train_loss is the mean over processes, as one process computes it
    losses = [json.loads((tmp_path / run / "train_summary.json").read_text())["train_loss"] for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    a = dict(load_trained(tmp_path / "one")[0].named_parameters())
    b = dict(load_trained(tmp_path / "two")[0].named_parameters())
    for name, p in a.items():
        torch.testing.assert_close(b[name], p, rtol=1e-4, atol=1e-6)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in a.items())  # training really moved the adapter

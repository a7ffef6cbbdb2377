"""DeepSpeed through accelerate on CPU (ZeRO-2 and ZeRO-3, two processes over gloo): the run equals one
plain process that sees the same micro-batches, with gradient accumulation and with replay blocks that
would otherwise get a pass of their own: every term reaches DeepSpeed's engine in one backward per
micro-batch, scaled once."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetless.train import load_trained

from conftest import memorisation_rows, write_jsonl

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "accelerate"


def zero_cpu(stage: int) -> Path:
    """The shipped CPU config of this ZeRO stage (so what ships is what ran)."""
    return EXAMPLES / f"deepspeed_zero{stage}_cpu.yaml"


@pytest.mark.parametrize("stage,method", [(2, "sft"), (2, "kl-both+replay"), (3, "kl-both+replay")])
def test_deepspeed_matches_one_plain_process(tiny_llama, tmp_path, stage, method):
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(8))
    corpus = tmp_path / "c.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog " * 8 + "\n\n") * 30)
    common = [f"model.name_or_path={tiny_llama}", f"data.train={data}", "data.max_length=64", "train.max_steps=2",
              "train.batch_size=2", "train.learning_rate=0.05", "train.optim=sgd", "train.max_grad_norm=0",
              "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.progress_bar=false", "data.eval=null"]
    if method == "kl-both+replay":  # blocks longer than the SFT rows: `auto` would give them a pass of their own
        common += ["regularizers=[{kl: {coef: 0.5, on: both}}]", f"replay={{data: {corpus}, max_length: 48, ratio: 0.5}}"]
    one = subprocess.run([sys.executable, "-m", "forgetless.cli", "train", "default", f"output_dir={tmp_path / 'one'}",
                          "train.grad_accum=4", *common], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch_zero(stage, tmp_path / "ds", *common)
    assert two.returncode == 0, two.stderr[-3000:]
    a = dict(load_trained(tmp_path / "one")[0].named_parameters())
    b = dict(load_trained(tmp_path / "ds")[0].named_parameters())
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in a.items())
    for name, p in a.items():
        torch.testing.assert_close(b[name], p, rtol=1e-4, atol=1e-6, msg=name)


# A DeepSpeed CPU process once aborted with this C++ message (1 run in ~12 of the ZeRO-3 case, in a clean
# clone; not reproduced in 9 more): the launch is retried once on exactly that, never on an error of ours.
NATIVE_ABORT = "terminate called without an active exception"


def launch_zero(stage: int, output_dir: Path, *overrides: str, config: Path | None = None) -> subprocess.CompletedProcess:
    """`forgetless train default` under the shipped ZeRO CPU config of `stage` (or `config`), two processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config or zero_cpu(stage)),
           "-m", "forgetless.cli", "train", "default", f"output_dir={output_dir}", "train.grad_accum=2", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and NATIVE_ABORT in res.stderr:
        res = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=600)
    return res


def test_zero3_full_fine_tuning_kl_partitions_its_reference(tiny_llama, tmp_path):
    """Full fine-tuning with KL under ZeRO-3: the frozen reference is partitioned like the model (each of the
    two processes holds about half of its weights, measured from the tensors it keeps) and the run still equals
    one plain process seeing the same micro-batches."""
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(8))
    common = [f"model.name_or_path={tiny_llama}", f"data.train={data}", "data.max_length=64", "train.max_steps=2",
              "train.batch_size=2", "train.learning_rate=0.05", "train.optim=sgd", "train.max_grad_norm=0",
              "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.progress_bar=false", "data.eval=null",
              "model.finetune=full", "regularizers=[{kl: {coef: 0.5}}]"]
    one = subprocess.run([sys.executable, "-m", "forgetless.cli", "train", "default", f"output_dir={tmp_path / 'one'}",
                          "train.grad_accum=4", *common], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch_zero(3, tmp_path / "ds", *common)
    assert two.returncode == 0, two.stderr[-3000:]
    whole = [int(m) for m in re.findall(r"kl: frozen reference: .*\((\d+) bytes\).*\(a whole copy\)", one.stderr)]
    parts = [int(m) for m in re.findall(r"kl: frozen reference: .*\((\d+) bytes\).*\(partitioned by ZeRO-3\)", two.stderr)]
    assert len(whole) == 1 and len(parts) == 2, (one.stderr[-2000:], two.stderr[-2000:])
    for held in parts:  # half of the big tensors, plus the small ones every process keeps whole
        assert 0.45 * whole[0] < held < 0.6 * whole[0], (held, whole)
    a = dict(load_trained(tmp_path / "one")[0].named_parameters())
    b = dict(load_trained(tmp_path / "ds")[0].named_parameters())
    for name, p in a.items():
        torch.testing.assert_close(b[name], p, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage, setting, error", [
    (2, "replay={forward: own}", "replay.forward: own is not possible under DeepSpeed"),
    (3, "method=l2sp", "regularizers: l2sp read the weights' values, which DeepSpeed ZeRO-3 partitions"),
])
def test_what_cannot_work_under_deepspeed_is_refused(tiny_llama, tmp_path, stage, setting, error):
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(4))
    res = launch_zero(stage, tmp_path / "ds", f"model.name_or_path={tiny_llama}", f"data.train={data}",
                      "train.max_steps=1", setting)
    assert res.returncode != 0
    assert error in res.stderr


def test_zero3_full_fine_tuning_that_would_save_no_model_is_refused_before_training(tiny_llama, tmp_path):
    """Without the end-of-run gather, ZeRO-3 leaves only its partitioned checkpoint: refused up front."""
    text = zero_cpu(3).read_text()
    assert "zero3_save_16bit_model: true" in text
    config = tmp_path / "zero3_no_gather.yaml"
    config.write_text(text.replace("zero3_save_16bit_model: true", "zero3_save_16bit_model: false"))
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(4))
    res = launch_zero(3, tmp_path / "ds", f"model.name_or_path={tiny_llama}", f"data.train={data}",
                      "train.max_steps=1", "model.finetune=full", config=config)
    assert res.returncode != 0
    assert "set `zero3_save_16bit_model: true`" in res.stderr
    assert not (tmp_path / "ds" / "metrics.jsonl").exists()  # nothing trained

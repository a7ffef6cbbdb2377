"""Failure behaviour: non-finite losses, kills mid-run and exact resume, never a half-written output."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from forgetless.config import ModelConfig
from forgetless.errors import TrainingError
from forgetless.model import apply_finetune
from forgetless.registry import METHODS, Method
from forgetless.regularizers import Regularizer
from forgetless.train import latest_checkpoint, load_trained, train

from conftest import make_batch, memorisation_rows, step_trainer, tiny_config, with_method, write_jsonl


@dataclass
class PoisonConfig:
    bad_steps: list[int]


class Poison(Regularizer):
    """Test-only: adds NaN to the loss at the listed optimizer steps."""

    name = "poison"

    def __init__(self, cfg):
        self.bad = set(cfg.bad_steps)

    def loss(self, ctx):
        if ctx.global_step in self.bad:
            return torch.tensor(float("nan")), {}
        return None, {}


def test_nonfinite_steps_are_skipped_and_logged(tiny_gpt2, memo_data, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "poison", Method("poison", PoisonConfig, Poison))
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "o", max_steps=6, batch_size=4, learning_rate=1e-2)
    cfg = with_method(cfg, [{"poison": {"bad_steps": [1, 3]}}])
    train(cfg)
    model, _ = load_trained(tmp_path / "o")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert sum(1 for r in rows if r.get("nonfinite_skipped")) == 2


def test_repeated_nonfinite_loss_aborts_without_writing_a_model(tiny_gpt2, memo_data, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "poison", Method("poison", PoisonConfig, Poison))
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "o", max_steps=10, batch_size=4, max_nonfinite_steps=3)
    cfg = with_method(cfg, [{"poison": {"bad_steps": list(range(2, 10))}}])
    with pytest.raises(TrainingError, match="NaN/inf for 3 micro-batches in a row"):
        train(cfg)
    out = tmp_path / "o"
    assert not (out / "train_summary.json").exists()
    assert not (out / "adapter_model.safetensors").exists()


def test_a_nonfinite_lfu_term_is_skipped_and_the_clean_gradient_kept(tiny_llama, tmp_path):
    """An infinite ascent step makes l_cons NaN: it must not reach .grad (which then equals plain SFT's)."""
    from transformers import AutoModelForCausalLM

    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    grads = {}
    for name, regs in [("sft", []), ("lfu", [{"lfu": {}}])]:
        torch.manual_seed(0)
        model = apply_finetune(AutoModelForCausalLM.from_pretrained(tiny_llama), ModelConfig())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = step_trainer(model, tmp_path, regs)
        for reg in trainer.regularizers:  # a config refuses alpha = inf; set on the built regularizer
            reg.cfg.alpha = float("inf")
        loss = trainer.training_step(model, dict(batch))
        assert torch.isfinite(loss)
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        for n, p in model.named_parameters():  # the perturbation was undone
            assert torch.equal(p, before[n]), n
    assert trainer.pending_metrics()["lfu_nonfinite_skipped"] == [1.0]
    for n, g in grads["sft"].items():
        torch.testing.assert_close(grads["lfu"][n], g, rtol=0, atol=0)


def test_latest_checkpoint_skips_a_half_written_one(tmp_path):
    for step, state in [(2, '{"global_step": 2}'), (4, '{"global_st')]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-6").mkdir()  # killed before its state file was written
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def _cli(*args):
    return [sys.executable, "-m", "forgetless.cli", "train", *args]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "arr"])
def test_sigkill_then_resume_ends_with_the_same_weights(tiny_llama, tmp_path, method):
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(8))
    corpus = tmp_path / "c.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog " * 8 + "\n\n") * 30)
    common = [f"model.name_or_path={tiny_llama}", f"data.train={data}", "data.max_length=64", "train.max_steps=40",
              "train.batch_size=4", "train.save_steps=4", "train.save_total_limit=3", "train.learning_rate=1e-3",
              "train.progress_bar=false", "model.lora.target_modules=all-linear", "train.logging_steps=100"]
    if method == "arr":
        common += ["regularizers=[{kl: {coef: 0.1}}]", f"replay={{data: {corpus}, max_length: 16, ratio: 0.5}}"]
    ref = subprocess.run(_cli("default", f"output_dir={tmp_path / 'ref'}", *common), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("default", f"output_dir={run}", *common), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "checkpoint-12").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "train_summary.json").exists(), "the run finished before it could be killed"
    assert latest_checkpoint(run / "checkpoints") is not None

    refused = subprocess.run(_cli("default", f"output_dir={run}", *common), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(_cli("default", f"output_dir={run}", "--resume", *common), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = dict(load_trained(tmp_path / "ref")[0].named_parameters())
    b = dict(load_trained(run)[0].named_parameters())
    for name, p in a.items():
        torch.testing.assert_close(b[name], p, rtol=0, atol=1e-6)


def test_a_sharded_full_fine_tune_that_would_save_no_model_is_named_before_training():
    """ZeRO-3 without the end-of-run gather, or FSDP with a sharded state dict, would end as "done" with only the
    engine's own partitioned checkpoint; LoRA adapters are saved either way (accelerate's plugin state, faked)."""
    from types import SimpleNamespace

    from forgetless.trainer import unsaved_model_problem

    def zero3(gather):
        config = {"zero_optimization": {"stage": 3, **({} if gather is None else
                                                       {"stage3_gather_16bit_weights_on_model_save": gather})}}
        return SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3, deepspeed_config=config))

    assert "zero3_save_16bit_model: true" in unsaved_model_problem(zero3(None), lora=False)
    assert "zero3_save_16bit_model: true" in unsaved_model_problem(zero3(False), lora=False)
    assert unsaved_model_problem(zero3(True), lora=False) is None
    assert unsaved_model_problem(zero3(False), lora=True) is None
    zero2 = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2, deepspeed_config={}))
    assert unsaved_model_problem(zero2, lora=False) is None
    fsdp = lambda kind: SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(state_dict_type=kind))
    assert "FULL_STATE_DICT" in unsaved_model_problem(fsdp("StateDictType.SHARDED_STATE_DICT"), lora=False)
    assert "FULL_STATE_DICT" in unsaved_model_problem(fsdp("StateDictType.SHARDED_STATE_DICT"), lora=True)
    old_name = zero3(None)
    old_name.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_gather_fp16_weights_on_model_save"] = True
    assert unsaved_model_problem(old_name, lora=False) is None
    assert unsaved_model_problem(fsdp("StateDictType.FULL_STATE_DICT"), lora=False) is None
    assert unsaved_model_problem(SimpleNamespace(), lora=False) is None  # one process, DDP
    shipped = Path(__file__).resolve().parent.parent / "examples" / "accelerate"
    assert "fsdp_state_dict_type: FULL_STATE_DICT" in (shipped / "fsdp.yaml").read_text()

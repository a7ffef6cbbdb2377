"""On a CUDA GPU (skipped elsewhere; `bash scripts/gpu-check.sh` runs them): every model and batch of
train, the regularizers' own passes (KL reference and its cache, EWC's Fisher, replay, LfU), eval and
compare sits on the GPU; model.dtype auto is bfloat16 there; peak memory is the GPU's own."""

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetless.config import load_config
from forgetless.registry import PRESETS

from conftest import with_method, write_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@contextlib.contextmanager
def cpu_forwards():
    """Every module call whose own parameters or tensor inputs sit on the CPU, as (module, what) pairs."""
    found = []

    def check(module, args):
        for name, p in module.named_parameters(recurse=False):
            if p.device.type != "cuda":
                found.append((type(module).__name__, f"parameter {name} on {p.device}"))
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.device.type != "cuda":
                found.append((type(module).__name__, f"input {i} on {a.device}"))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield found
    finally:
        handle.remove()


def test_train_eval_compare_all_on_the_gpu(tiny_llama, suite, tmp_path, monkeypatch):
    from forgetless.compare import run_compare
    from forgetless.train import load_trained

    train_file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Calculate {i} + 2.", "response": str(i + 2)}
                                                        for i in range(8)])
    replay = tmp_path / "replay.txt"
    replay.write_text(("in the beginning was the word. " * 10 + "\n\n") * 20)
    monkeypatch.setitem(PRESETS, "arr", {"regularizers": [{"kl": {}}],
                                         "replay": {"data": str(replay), "max_length": 16}})
    monkeypatch.setitem(PRESETS, "kl-cached", {"regularizers": [{"kl": {"cache": "topk", "topk": 8}}]})
    monkeypatch.setitem(PRESETS, "ewc", {"regularizers": [{"ewc": {"data": str(replay), "samples": 4, "max_length": 16}}]})
    config = load_config(None, [
        f"model.name_or_path={tiny_llama}", f"data.train={train_file}", f"output_dir={tmp_path / 'cmp'}",
        "data.max_length=64", "train.max_steps=2", "train.batch_size=4", "train.progress_bar=false",
        "compare.methods=[sft, lfu, lfu-reps, lfu-fast, arr, kl-cached, ewc]",
    ])
    config.evaluation = suite
    with cpu_forwards() as found:
        report = run_compare(config)
    assert found == [], found[:5]
    model, _ = load_trained(tmp_path / "cmp" / "sft", device="cuda")
    assert next(model.get_base_model().parameters()).dtype == torch.bfloat16  # model.dtype auto on this GPU
    for method, run in report["runs"].items():
        assert 0 < run["peak_mem_bytes"] < torch.cuda.get_device_properties(0).total_memory, method


def test_full_finetune_kl_reference_on_the_gpu(tiny_llama, memo_data, tmp_path):
    """Full fine-tuning: the frozen KL reference copy, EWC's snapshot and Fisher stay on the GPU."""
    from forgetless.train import train

    from conftest import tiny_config

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "o", max_steps=2)
    cfg.model.finetune = "full"
    cfg = with_method(cfg, [{"kl": {}}, {"lfu": {}}])
    with cpu_forwards() as found:
        train(cfg)
    assert found == [], found[:5]


FSDP_YAML = Path(__file__).resolve().parent.parent / "examples" / "accelerate" / "fsdp.yaml"


def fsdp_launch(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`forgetless train` under the shipped FSDP2 config as one process, float32 (a tight comparison)."""
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_YAML),
                           "--num_processes", "1", "--mixed_precision", "no", "-m", "forgetless.cli", "train",
                           "default", f"output_dir={out}", *overrides], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "replay", "lfu"])
def test_fsdp2_one_process_matches_a_plain_run(tiny_llama, tmp_path, method):
    """The shipped FSDP2 config launched as one process trains a full fine-tune to the plain run's weights and
    saves a model that loads; LfU is refused there (which also shows FSDP really ran)."""
    from transformers import AutoModelForCausalLM

    from forgetless.train import load_trained

    from conftest import memorisation_rows

    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(8))
    corpus = tmp_path / "c.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog " * 8 + "\n\n") * 30)
    common = [f"model.name_or_path={tiny_llama}", f"data.train={data}", "data.max_length=64", "train.max_steps=3",
              "train.batch_size=2", "train.grad_accum=2", "train.learning_rate=0.01", "train.optim=sgd",
              "train.max_grad_norm=0", "train.lr_scheduler=constant", "train.warmup_ratio=0",
              "train.progress_bar=false", "data.eval=null", "model.finetune=full", "model.dtype=float32",
              f"method={method}"]
    if method == "replay":
        common += [f"replay={{data: {corpus}, max_length: 16, ratio: 0.5}}"]
    fsdp = fsdp_launch(tmp_path / "fsdp", *common)
    if method == "lfu":
        assert fsdp.returncode != 0 and "regularizers.lfu: not supported with" in fsdp.stderr, fsdp.stderr[-3000:]
        return
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    plain = subprocess.run([sys.executable, "-m", "forgetless.cli", "train", "default",
                            f"output_dir={tmp_path / 'plain'}", *common], capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    a = dict(load_trained(tmp_path / "plain")[0].named_parameters())
    b = dict(load_trained(tmp_path / "fsdp")[0].named_parameters())
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_llama).named_parameters())
    for name, p in a.items():
        torch.testing.assert_close(b[name].float().cpu(), p.float().cpu(), rtol=1e-4, atol=1e-6, msg=name)
    assert max((a[n].float().cpu() - initial[n].float()).abs().max().item() for n in a) > 1e-4  # it trained

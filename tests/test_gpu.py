"""On a CUDA GPU (skipped elsewhere; `bash scripts/gpu-check.sh` runs them): every model and batch of
train, the regularizers' own passes (KL reference and its cache, EWC's Fisher, replay, LfU), eval and
compare sits on the GPU; model.dtype auto is bfloat16 there; peak memory is the GPU's own."""

import contextlib

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
    monkeypatch.setitem(PRESETS, "kl+replay", {"regularizers": [{"kl": {}}],
                                               "replay": {"data": str(replay), "max_length": 16}})
    monkeypatch.setitem(PRESETS, "kl-cached", {"regularizers": [{"kl": {"cache": "topk", "topk": 8}}]})
    monkeypatch.setitem(PRESETS, "ewc", {"regularizers": [{"ewc": {"data": str(replay), "samples": 4, "max_length": 16}}]})
    config = load_config(None, [
        f"model.name_or_path={tiny_llama}", f"data.train={train_file}", f"output_dir={tmp_path / 'cmp'}",
        "data.max_length=64", "train.max_steps=2", "train.batch_size=4", "train.progress_bar=false",
        "compare.methods=[sft, lfu, lfu-reps, lfu-fast, kl+replay, kl-cached, ewc]",
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

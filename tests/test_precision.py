"""Precision, attention, QLoRA and the user's Trainer knobs: one dtype setting, the tuned model
evaluated in its base's dtype, a 4-/8-bit base trained with every regularizer kind, report_to and
train.extra passed through to transformers."""

import importlib.util

import pytest
import torch

from forgetless.config import load_config
from forgetless.errors import ConfigError, ModelError
from forgetless.evaluate import evaluate_base_and_runs
from forgetless.model import default_device, load_model, resolve_dtype
from forgetless.train import load_trained, train, training_arguments

from conftest import memorisation_rows, tiny_config, with_method, write_jsonl

CORPUS = ("the quick brown fox jumps over the lazy dog " * 8 + "\n\n") * 30
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_on_a_bf16_gpu(monkeypatch):
    cfg = load_config(None, []).model
    assert cfg.dtype == "auto"
    assert resolve_dtype(cfg, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(cfg, torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(cfg, torch.device("cuda", 0)) == torch.float32
    cfg.dtype = "float16"
    assert resolve_dtype(cfg, torch.device("cpu")) == torch.float16


def test_one_precision_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"train.bf16: no longer a setting: precision is set once, by model.dtype"):
        load_config(None, ["train.bf16=true"])
    args = training_arguments(load_config(None, ["model.dtype=bfloat16"]), tmp_path)
    assert args.bf16 and not args.fp16
    args = training_arguments(load_config(None, ["model.dtype=float32"]), tmp_path)
    assert not args.bf16 and not args.fp16
    with pytest.raises(ConfigError, match="model.dtype: float16 weights cannot be fully fine-tuned"):
        load_config(None, ["model.dtype=float16", "model.finetune=full"])


def test_tuned_model_is_evaluated_in_the_base_dtype(tiny_llama, memo_data, suite, tmp_path):
    """A bf16 run whose adapter is mixed back to zero (WiSE-FT alpha 0) is the base model: its drift must
    be exactly 0. Loaded in float32 against a bf16 base (the old behaviour) it was not."""
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "o", max_steps=2, learning_rate=1e-2)
    cfg.model.dtype = "bfloat16"
    cfg = with_method(cfg, [{"wise_ft": {"alpha": 0.0}}])
    train(cfg)
    model, _ = load_trained(tmp_path / "o")
    assert next(model.parameters()).dtype == torch.bfloat16  # the run's own dtype by default
    cfg.evaluation = suite
    results = evaluate_base_and_runs(cfg, {"tuned": str(tmp_path / "o")})
    assert results["tuned"]["general_drift_kl"]["value"] == 0.0
    assert results["tuned"]["general_ppl"]["value"] == results["base"]["general_ppl"]["value"]
    fp32, _ = load_trained(tmp_path / "o", dtype=torch.float32)
    assert next(fp32.parameters()).dtype == torch.float32


def test_attention_implementation(tiny_llama):
    cfg = load_config(None, ["model.attn_implementation=eager"]).model
    assert load_model(cfg, tiny_llama).config._attn_implementation == "eager"
    if importlib.util.find_spec("flash_attn") is None:
        cfg.attn_implementation = "flash_attention_2"
        with pytest.raises(ModelError, match="flash_attention_2 needs the flash-attn package"):
            load_model(cfg, tiny_llama)


def test_quantised_base_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="model.quantization: a 4bit base cannot be fully fine-tuned"):
        load_config(None, ["model.quantization=4bit", "model.finetune=full"])
    with pytest.raises(ConfigError, match="merge: folding the adapter into a 8bit base"):
        load_config(None, ["model.quantization=8bit", "merge=true"])


@needs_bnb
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_with_kl_replay_and_lfu_and_evaluates(bits, tiny_llama64, memo_data, suite, tmp_path):
    import bitsandbytes as bnb

    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    cfg = tiny_config(tiny_llama64, memo_data, tmp_path / "o", max_steps=3, batch_size=2, learning_rate=1e-2)
    cfg.model.quantization = bits
    cfg = with_method(cfg, [{"kl": {"coef": 0.5, "on": "both"}}, {"lfu": {"lam": 1.0}}],
                      replay={"data": str(corpus), "max_length": 16, "ratio": 0.5})
    train(cfg)
    model, _ = load_trained(tmp_path / "o", device=default_device())
    kind = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    layers = [m for m in model.modules() if isinstance(m, kind)]
    assert len(layers) == 2 * 7  # every linear layer of both blocks is quantised under its adapter
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # the adapter trained
    cfg.evaluation = suite
    results = evaluate_base_and_runs(cfg, {"qlora": str(tmp_path / "o")})
    assert results["base"]["general_drift_kl"]["value"] == 0.0
    assert results["qlora"]["general_drift_kl"]["value"] > 0
    assert torch.isfinite(torch.tensor(results["qlora"]["target_nll"]["value"]))


def test_report_to_tensorboard_holds_our_metrics(tiny_llama, memo_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "o", max_steps=2, batch_size=2)
    cfg.train.report_to = "tensorboard"
    cfg = with_method(cfg, [{"kl": {}}, {"lfu": {}}], replay={"data": str(corpus), "max_length": 16, "ratio": 0.5})
    train(cfg)
    (events,) = (tmp_path / "o" / "tensorboard").glob("events.out.tfevents.*")
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    for name in ["l_sft", "kl", "l_replay", "l_cons", "lfu_perturb_norm", "tokens_per_s"]:
        assert f"train/{name}" in tags, sorted(tags)


def test_train_extra_reaches_training_arguments_and_is_checked(tmp_path):
    cfg = load_config(None, ["train.extra={adam_beta2: 0.95, run_name: my-run}"])
    args = training_arguments(cfg, tmp_path)
    assert args.adam_beta2 == 0.95 and args.run_name == "my-run"
    with pytest.raises(ConfigError, match=r"train.extra.adam_beta: not a transformers TrainingArguments field "
                                          r"\(did you mean 'adam_beta[12]'\?\)"):
        load_config(None, ["train.extra={adam_beta: 0.9}"])
    with pytest.raises(ConfigError, match="train.extra.learning_rate: set by forgetless from train.learning_rate"):
        load_config(None, ["train.extra={learning_rate: 0.1}"])
    with pytest.raises(ConfigError, match=r"train.extra.use_cpu: set by forgetless \(chosen from the machine\); leave it"):
        load_config(None, ["train.extra={use_cpu: true}"])
    with pytest.raises(ConfigError, match="train.extra.bf16: set by forgetless from model.dtype"):
        load_config(None, ["train.extra={bf16: true}"])


@needs_bnb
def test_qlora_gradient_is_the_dequantised_models(tiny_llama64):
    """The adapters' gradient on a 4-bit base equals the one on a float model holding the dequantised
    weights (bitsandbytes' CPU kernel computes in lower precision: 2% of the largest entry)."""
    import bitsandbytes as bnb

    from forgetless.model import apply_finetune

    qcfg = load_config(None, [f"model.name_or_path={tiny_llama64}", "model.quantization=4bit", "model.dtype=float32"]).model
    fcfg = load_config(None, [f"model.name_or_path={tiny_llama64}", "model.dtype=float32"]).model
    quantised = apply_finetune(load_model(qcfg, tiny_llama64), qcfg)  # on this machine's device
    plain = load_model(fcfg, tiny_llama64, device=default_device())
    layers = dict(quantised.get_base_model().named_modules())
    for name, module in plain.named_modules():
        if isinstance(module, torch.nn.Linear) and isinstance(getattr(layers[name], "base_layer", None), bnb.nn.Linear4bit):
            weight = layers[name].base_layer.weight
            module.weight.data = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    plain = apply_finetune(plain, fcfg)
    q_params, p_params = dict(quantised.named_parameters()), dict(plain.named_parameters())
    g = torch.Generator().manual_seed(1)
    for name, p in p_params.items():
        if "lora_" in name:  # B != 0, so every adapter has a gradient
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g).to(p.device))
            q_params[name].data.copy_(p.data)
    ids = torch.randint(10, 300, (2, 12), generator=g).to(default_device())
    for model in (quantised, plain):
        model(input_ids=ids, labels=ids).loss.backward()
    for name, p in p_params.items():
        if "lora_" in name:
            torch.testing.assert_close(q_params[name].grad, p.grad, rtol=0, atol=0.02 * float(p.grad.abs().max()))

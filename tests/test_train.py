"""The SFT engine on tiny random-init models: losses, gradients, and which parameters move."""

import json

import pytest
import torch
from dataclasses import dataclass

from forgetless.errors import ConfigError, DataError
from forgetless.registry import METHODS, Method
from forgetless.regularizers import Regularizer
from forgetless.train import load_trained, train
from forgetless.losses import next_token_targets, prediction_mask, token_nll

from conftest import memorisation_rows, tiny_config, with_method, write_jsonl


def base_weights(model):
    """Copies of the base model's own weights (LoRA's adapters excluded)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_masked_positions_contribute_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6], [-100, -100, 1, 2, -100, -100]])
    keep = prediction_mask(labels)
    nll = token_nll(logits[keep], next_token_targets(labels, keep))
    # by hand: position t predicts label t+1
    expected = []
    for b in range(2):
        for t in range(5):
            if labels[b, t + 1] != -100:
                expected.append(-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]])
    assert torch.allclose(nll, torch.stack(expected))
    nll.sum().backward()
    grad = logits.grad
    trained_rows = {(0, 2), (0, 3), (0, 4), (1, 1), (1, 2)}
    for b in range(2):
        for t in range(6):
            is_zero = bool((grad[b, t] == 0).all())
            assert is_zero == ((b, t) not in trained_rows), (b, t)


def test_loss_decreases_on_a_memorisation_set(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "out", max_steps=80, batch_size=8, learning_rate=1e-2)
    cfg.model.finetune = "full"
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    losses = [r["l_sft"] for r in rows if "l_sft" in r]
    assert losses[0] > 4.0  # ~ln(vocab) for a random init
    assert losses[-1] < 0.25 * losses[0]
    assert all("tokens_per_s" in r and "learning_rate" in r for r in rows if "l_sft" in r)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
def test_lora_leaves_base_weights_bit_identical(model_fixture, memo_data, tmp_path, request, monkeypatch):
    model_dir = request.getfixturevalue(model_fixture)
    cfg = tiny_config(model_dir, memo_data, tmp_path / "out", max_steps=5, learning_rate=1e-2)
    snapshots = {}

    import forgetless.train as train_mod
    real = train_mod.load_for_training

    def spy(model_cfg, *args):
        model, tok, path = real(model_cfg, *args)
        snapshots["base"] = base_weights(model)
        snapshots["lora"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        snapshots["model"] = model
        return model, tok, path

    monkeypatch.setattr(train_mod, "load_for_training", spy)
    train(cfg)
    model = snapshots["model"]
    after = base_weights(model)
    assert after.keys() == snapshots["base"].keys()
    for name, before in snapshots["base"].items():
        assert torch.equal(before, after[name]), name
    lora_after = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora_after and all(p.requires_grad for p in lora_after.values())
    moved = [n for n, p in lora_after.items() if not torch.equal(p.detach(), snapshots["lora"][n])]
    assert len(moved) == len(lora_after)


def test_full_finetune_changes_base_weights_and_reloads(tiny_llama, memo_data, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "out", max_steps=3, learning_rate=1e-2)
    cfg.model.finetune = "full"
    train(cfg)
    before = AutoModelForCausalLM.from_pretrained(tiny_llama)
    after, _ = load_trained(tmp_path / "out")
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert len(changed) == len(list(after.parameters()))


def test_lora_output_reloads_and_merge_gives_the_same_model(tiny_llama, memo_data, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "out", max_steps=3, learning_rate=1e-2)
    cfg.merge = True
    result = train(cfg)
    out = tmp_path / "out"
    for name in ["adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
                 "train_summary.json", "tokenizer.json"]:
        assert (out / name).exists(), name
    adapter_model, tok = load_trained(out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = tok("Calculate 3 + 4.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, m, b = adapter_model(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(a, m, atol=1e-5)
    assert not torch.allclose(a, b, atol=1e-3)  # the adapter really changed the model
    assert result.summary["global_steps"] == 3


def test_gradient_accumulation_matches_one_big_batch(tiny_llama, tmp_path):
    """4 micro-batches of 1 == 1 batch of 4: the loss is a mean over the step's response tokens."""
    rows = memorisation_rows(4)
    lengths = {len(r["response"]) for r in rows}
    assert len(lengths) > 1  # responses of different lengths: a mean of per-batch means would differ
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    params = {}
    for batch, accum in [(4, 1), (1, 4)]:
        cfg = tiny_config(tiny_llama, data, tmp_path / f"out{batch}", max_steps=2, batch_size=batch,
                          grad_accum=accum, learning_rate=0.5, optim="sgd", max_grad_norm=0, seed=3)
        cfg.model.finetune = "full"
        train(cfg)
        model, _ = load_trained(tmp_path / f"out{batch}")
        params[batch] = {n: p.detach() for n, p in model.named_parameters()}
    base = {n: p for n, p in load_trained(tiny_llama)[0].named_parameters()}
    for name, p in params[4].items():
        assert not torch.equal(p, base[name].detach()), name
        torch.testing.assert_close(params[1][name], p, rtol=1e-5, atol=1e-6)


@dataclass
class PullConfig:
    coef: float = 1.0


class PullToZero(Regularizer):
    """Test-only regularizer: coef * sum of squares of the trainable parameters."""

    name = "pull_to_zero"

    def __init__(self, cfg: PullConfig) -> None:
        self.coef = cfg.coef

    def loss(self, ctx):
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        term = self.coef * sum((p ** 2).sum() for p in params)
        return term, {"pull": term.item()}


def test_regularizer_term_is_added_to_the_gradient_and_logged(tiny_llama, memo_data, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "pull_to_zero", Method("pull_to_zero", PullConfig, PullToZero))
    finals = {}
    for coef in [0.0, 0.5]:
        cfg = tiny_config(tiny_llama, memo_data, tmp_path / f"out{coef}", max_steps=1, batch_size=8,
                          learning_rate=0.1, optim="sgd", max_grad_norm=0)
        cfg.model.finetune = "full"
        cfg = with_method(cfg, [{"pull_to_zero": {"coef": coef}}])
        train(cfg)
        finals[coef] = {n: p.detach() for n, p in load_trained(tmp_path / f"out{coef}")[0].named_parameters()}
        log = [json.loads(line) for line in open(tmp_path / f"out{coef}" / "metrics.jsonl")]
        assert any("pull" in row for row in log)
    # SGD: theta_reg = theta_sft - lr * coef * 2 * theta0  (the extra gradient is exactly 2*coef*theta0)
    base = {n: p.detach() for n, p in load_trained(tiny_llama)[0].named_parameters()}
    for name, p0 in base.items():
        torch.testing.assert_close(finals[0.5][name], finals[0.0][name] - 0.1 * 0.5 * 2 * p0, rtol=1e-4, atol=1e-6)


def test_output_dir_is_never_overwritten_silently(tiny_gpt2, memo_data, tmp_path):
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "out", max_steps=1)
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a finished run; pass --overwrite"):
        train(cfg)
    train(cfg, overwrite=True)
    assert (tmp_path / "out" / "train_summary.json").exists()
    # a run stopped by bad input while it was set up leaves empty folders only: the corrected rerun may go on
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "there"}, {"prompt": "only a prompt"}])
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "fresh", max_steps=1)
    cfg = with_method(cfg, replay={"data": str(bad)})
    for _ in range(2):  # the second time the same data error, not "already holds files"
        with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'response'"):
            train(cfg)
    # the marker and the config it was started with: nothing to lose
    assert sorted(p.name for p in (tmp_path / "fresh").rglob("*") if p.is_file()) == [".forgetless-run", "config.yaml"]
    train(with_method(cfg))

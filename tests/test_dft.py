"""DFT (arXiv 2508.05629) and its anchored form ASFT (arXiv 2509.23753): the loss and gradient against the
formula written out by hand, the presets, and DFT beside LoRA / full fine-tuning, replay and LfU."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from forgetless.config import ForgetlessConfig, ModelConfig, load_config
from forgetless.errors import ConfigError
from forgetless.model import apply_finetune
from forgetless.registry import METHODS, PRESETS, entry, strengths
from forgetless.regularizers.dft import DFT, DFTConfig
from forgetless.regularizers.kl import KL, KLConfig
from forgetless.train import build_method, train

from conftest import make_batch, make_trainer, memorisation_rows, step_trainer, tiny_config, with_method, write_jsonl


def log_probs(model, batch):
    """By hand: the log-probabilities [N, V] at the trained positions (float64, row-major order), with their
    graph, and the trained tokens [N]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    keep = batch["labels"][:, 1:] != -100
    return torch.log_softmax(logits[keep], -1), batch["labels"][:, 1:][keep]


def token_nll(model, batch):
    """By hand: the NLL of every trained token."""
    logp, targets = log_probs(model, batch)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def dft_sum(nll):
    """sum_t sg(p_t) * nll_t with p_t = exp(-nll_t)."""
    return (torch.exp(-nll.detach()) * nll).sum()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(ours, model):
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-7, atol=1e-12, msg=lambda m: f"{n}: {m}")


def first_update(trainer, batch):
    """One SGD step, so the LoRA B factors are not zero and the model is not the initial one."""
    trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.model.zero_grad()


# ------------------------------------------------------------------ the loss and its gradient

@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_dft_loss_and_gradient_are_those_of_the_formula_across_accumulation(tiny_llama, tmp_path, finetune):
    """Two micro-batches of one optimizer step (response tokens n1 + n2 = N): the training loss of each is
    sum_t sg(p_t) * nll_t / N and the accumulated gradient is autograd's of the whole step's DFT loss;
    l_sft stays the plain NLL mean and l_dft is the DFT loss' token mean."""
    trainer = make_trainer(tiny_llama, tmp_path, finetune, [{"dft": {}}])
    assert [type(r) for r in trainer.regularizers] == [DFT]
    model = trainer.model
    b1 = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    b2 = make_batch(tiny_llama, tmp_path, memorisation_rows(8)[3:])
    first_update(trainer, b1)
    n1, n2 = (int((b["labels"][:, 1:] != -100).sum()) for b in (b1, b2))
    assert n1 != n2
    losses = [trainer.training_step(model, dict(b), num_items_in_batch=n1 + n2) for b in (b1, b2)]
    ours = grads(model)
    metrics = trainer.pending_metrics()
    model.zero_grad()

    nll1, nll2 = token_nll(model, b1), token_nll(model, b2)
    expected = (dft_sum(nll1) + dft_sum(nll2)) / (n1 + n2)
    expected.backward()
    assert losses[0].item() == pytest.approx(dft_sum(nll1).item() / (n1 + n2), rel=1e-9)
    assert losses[1].item() == pytest.approx(dft_sum(nll2).item() / (n1 + n2), rel=1e-9)
    assert_same_grads(ours, model)
    assert metrics["l_dft"][-2:] == pytest.approx([dft_sum(n).item() / n.numel() for n in (nll1, nll2)], rel=1e-9)
    assert metrics["l_sft"][-2:] == pytest.approx([n.mean().item() for n in (nll1, nll2)], rel=1e-9)
    # a real reweighting: DFT's loss is well below the NLL's
    assert expected.item() < 0.5 * (nll1.sum() + nll2.sum()).item() / (n1 + n2)


def test_asft_is_dft_plus_the_kl_anchor_in_loss_and_gradient(tiny_llama, tmp_path):
    """The asft preset: mean sg(p) * nll + 0.1 * mean KL(p_initial || p_theta) over the response tokens."""
    trainer = make_trainer(tiny_llama, tmp_path, "lora", PRESETS["asft"]["regularizers"])
    assert [type(r) for r in trainer.regularizers] == [DFT, KL]
    model = trainer.model
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    torch.manual_seed(0)
    with torch.no_grad():  # move the model away from the reference (DFT's first steps on a random model are tiny)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    loss = trainer.training_step(model, dict(batch))
    ours = grads(model)
    model.zero_grad()

    # one forward for both terms, as the step has: Llama's RMSNorm runs in float32 even in a float64 model,
    # so the backwards of two forwards, summed, differ from the backward of one in the 7th digit
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    logp, targets = log_probs(model, batch)
    with torch.no_grad():
        logr, _ = log_probs(initial, batch)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kl = (logr.exp() * (logr - logp)).sum()  # sum over the tokens of KL(p_initial || p_theta)
    expected = (dft_sum(nll) + 0.1 * kl) / nll.numel()
    expected.backward()
    assert kl.item() / nll.numel() > 1e-4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert_same_grads(ours, model)


# ------------------------------------------------------------------ presets and options

def test_dft_and_asft_presets_parse_and_build():
    for parse in (lambda m: load_config(None, [f"method={m}"]), lambda m: ForgetlessConfig(method=m)):
        assert parse("dft").regularizers == [DFTConfig()]
        cfg = parse("asft")
        assert cfg.regularizers == [DFTConfig(), KLConfig(coef=0.1, direction="forward", on="sft")]
        assert cfg.replay is None
        regularizers, replay = build_method(cfg)
        assert [type(r) for r in regularizers] == [DFT, KL] and replay is None
    assert entry(DFTConfig()) == {"dft": {}}
    assert METHODS["dft"].strength is None and "dft" not in strengths()
    # one entry per run; no options
    with pytest.raises(ConfigError, match=r"regularizers\[0\].dft: at most one dft entry"):
        load_config(None, ["regularizers=[{dft: {}}, {dft: {}}]"])
    with pytest.raises(ConfigError, match=r"regularizers\[0\].dft.coef: unknown key"):
        load_config(None, ["regularizers=[{dft: {coef: 1}}]"])
    # it composes with the others, replay included
    cfg = load_config(None, ["regularizers=[{dft: {}}, {l2sp: {}}, {lfu: {}}]", "replay={}"])
    assert [type(o).__name__ for o in cfg.regularizers] == ["DFTConfig", "L2SPConfig", "LfUConfig"]


# ------------------------------------------------------------------ with replay and with LfU

@pytest.mark.parametrize("forward", ["own", "with_sft"])
def test_dft_reweights_the_sft_rows_only_beside_replay(tiny_llama, tmp_path, forward):
    """KJV replay rows, joined to the SFT forward or in their own pass first: the same step with and without
    the dft entry differs by exactly sum_t (sg(p_t) - 1) * nll_t / N over the SFT tokens, in loss and in
    gradient; the replay rows' term is untouched (whatever its normalisation) and replay's own pass adds
    no DFT term."""
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))

    def one_step(regularizers):
        trainer = make_trainer(tiny_llama, tmp_path, "full", regularizers, per_device_train_batch_size=3,
                               replay={"ratio": 1.0, "max_length": 8, "weight": 2.0, "forward": forward})
        forwards = []
        trainer.model.register_forward_pre_hook(
            lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
        loss = trainer.training_step(trainer.model, dict(batch))
        step_grads = grads(trainer.model)
        trainer.model.zero_grad()
        return trainer.model, loss, step_grads, trainer.pending_metrics(), forwards

    model, loss, ours, metrics, forwards = one_step([{"dft": {}}])
    _, plain_loss, plain, plain_metrics, plain_forwards = one_step([])
    assert forwards == plain_forwards == ([3, 3] if forward == "own" else [6])
    assert len(metrics["l_dft"]) == 1  # replay's own pass adds no DFT term
    assert metrics["l_replay"] == plain_metrics["l_replay"] and metrics["l_sft"] == plain_metrics["l_sft"]

    nll = token_nll(model, batch)
    term = (dft_sum(nll) - nll.sum()) / nll.numel()
    term.backward()
    assert loss.item() == pytest.approx(plain_loss.item() + term.item(), rel=1e-9)
    for n, p in model.named_parameters():
        # two steps' backwards differ in the 7th digit: Llama's RMSNorm runs in float32 even in a float64 model
        torch.testing.assert_close(ours[n] - plain[n], p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")


def test_dft_with_lfu_the_ascent_is_the_plain_nll_gradient(tiny_llama, tmp_path):
    """LfU + DFT, one step: finite; LfU's ascent direction is the gradient of the plain NLL l_sft (not of
    DFT's loss); the logged loss is the DFT loss + lam * l_cons."""
    model = apply_finetune(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64), ModelConfig())
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    trainer = step_trainer(model, tmp_path, [{"dft": {}}, {"lfu": {}}])
    lfu = trainer.perturber
    handed = []
    original = lfu.perturbed_backward
    lfu.perturbed_backward = lambda ctx: handed.append([g.clone() for g in ctx.sft_grads]) or original(ctx)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B != 0, so the ascent has a gradient on every LoRA factor
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    loss = trainer.training_step(model, dict(batch))
    metrics = trainer.pending_metrics()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.zero_grad()
    nll = token_nll(model, batch)
    plain = torch.autograd.grad(nll.mean(), lfu.ascent_tensors(), retain_graph=True)
    reweighted = torch.autograd.grad(dft_sum(nll) / nll.numel(), lfu.ascent_tensors())
    for ours, expected, dft in zip(handed[0], plain, reweighted):
        torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-12)
        assert not torch.allclose(ours, dft)  # the two directions really differ
    assert metrics["l_sft"][-1] == pytest.approx(nll.mean().item(), rel=1e-9)
    assert metrics["l_dft"][-1] == pytest.approx(dft_sum(nll).item() / nll.numel(), rel=1e-9)
    assert loss.item() == pytest.approx(metrics["l_dft"][-1] + 5.0 * metrics["l_cons"][-1], rel=1e-7)


def test_asft_preset_trains_end_to_end_and_logs_its_parts(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(4))
    cfg = tiny_config(tiny_gpt2, data, tmp_path / "o", max_steps=2, batch_size=4, learning_rate=1e-2)
    train(with_method(cfg, PRESETS["asft"]["regularizers"]))
    logged = [r for r in map(json.loads, open(tmp_path / "o" / "metrics.jsonl")) if "l_dft" in r]
    assert len(logged) == 2
    for r in logged:
        assert 0 < r["l_dft"] < r["l_sft"]
        # the logged loss is l_sft + the DFT term, two float32 sums that nearly cancel on a random model
        # (p ~ 1 / vocabulary): equal up to l_sft's own rounding
        assert r["loss"] == pytest.approx(r["l_dft"] + 0.1 * r["kl"], abs=1e-6 * r["l_sft"])

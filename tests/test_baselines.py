"""The standard baselines behind the regularizer interface: L2-SP, EWC, NEFTune, WiSE-FT."""

import importlib.util
import json

import pytest
import torch
from transformers import TrainerCallback

from forgetless.model import lora_factors
from forgetless.registry import build
from forgetless.regularizers import ewc as ewc_mod
from forgetless.train import load_trained, train

from conftest import make_batch, make_trainer, memorisation_rows, tiny_config, with_method


def step_grads(trainer, batch) -> dict[str, torch.Tensor]:
    trainer.model.zero_grad()
    trainer.training_step(trainer.model, dict(batch))
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def randomise_lora_b(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b, _ in lora_factors(model):
            b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype))


# ------------------------------------------------------------------ L2-SP


def test_l2sp_lora_penalises_exactly_the_merged_weight_update(tiny_llama, tmp_path):
    coef = 0.8
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    torch.manual_seed(0)  # the same LoRA init for both
    with_reg = make_trainer(tiny_llama, tmp_path, "lora", [{"l2sp": {"coef": coef}}])
    torch.manual_seed(0)
    plain = make_trainer(tiny_llama, tmp_path, "lora", [])
    for t in (with_reg, plain):
        randomise_lora_b(t.model)  # a non-zero update B @ A, as after some training
    grads, base = step_grads(with_reg, batch), step_grads(plain, batch)

    # by hand, from peft's own merged update of each layer (d x d, no trace trick)
    from peft.tuners.lora import LoraLayer

    model, penalty = with_reg.model, 0.0
    a_b = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            delta = module.get_delta_weight("default")
            penalty += delta.pow(2).sum()
            a_b[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"])
    assert len(a_b) > 0
    assert with_reg.pending_metrics()["l2sp_dist_sq"][-1] == pytest.approx(penalty.item(), rel=1e-9)
    hand = torch.autograd.grad(0.5 * coef * penalty, [t for a, b, _ in a_b.values() for t in (a, b)])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    got = [grads[n] - base[n] for n in names]  # the SFT parts are identical: the difference is the penalty's
    assert len(got) == len(hand)
    for g, h in zip(got, hand):
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-12)


def test_l2sp_full_pulls_towards_the_snapshot(tiny_llama, tmp_path):
    coef = 0.5
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    with_reg = make_trainer(tiny_llama, tmp_path, "full", [{"l2sp": {"coef": coef}}])
    plain = make_trainer(tiny_llama, tmp_path, "full", [])
    g = torch.Generator().manual_seed(0)
    shifts = {n: 0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in plain.model.named_parameters()}
    for t in (with_reg, plain):
        with torch.no_grad():
            for n, p in t.model.named_parameters():
                p.add_(shifts[n])
    grads, base = step_grads(with_reg, batch), step_grads(plain, batch)
    assert with_reg.pending_metrics()["l2sp_dist_sq"][-1] == pytest.approx(sum(s.pow(2).sum().item() for s in shifts.values()))
    for n, s in shifts.items():
        torch.testing.assert_close(grads[n] - base[n], coef * s, rtol=1e-7, atol=1e-12)


def _update_size(run_dir, base_dir) -> float:
    from transformers import AutoModelForCausalLM

    tuned = load_trained(run_dir)[0].merge_and_unload()
    base = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())
    return sum((p - base[n]).pow(2).sum().item() for n, p in tuned.named_parameters())


def test_l2sp_and_ewc_keep_the_trained_model_closer_to_the_base(tiny_llama, memo_data, tmp_path):
    text = tmp_path / "general.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    sizes = {}
    for name, regs in [("sft", []), ("l2sp", [{"l2sp": {"coef": 50.0}}]),
                       ("ewc", [{"ewc": {"coef": 50.0, "data": str(text), "samples": 4, "max_length": 32}}])]:
        cfg = with_method(tiny_config(tiny_llama, memo_data, tmp_path / name, max_steps=8, batch_size=4,
                                      learning_rate=3e-2), regs)
        train(cfg)
        sizes[name] = _update_size(tmp_path / name, tiny_llama)
    assert sizes["l2sp"] < 0.7 * sizes["sft"]
    assert sizes["ewc"] < 0.9 * sizes["sft"]


# ------------------------------------------------------------------ EWC


def test_ewc_fisher_by_hand_penalty_gradient_and_reuse(tiny_gpt2, tmp_path, monkeypatch):
    text = tmp_path / "general.txt"
    text.write_text("the lazy dog jumps over 7 brown foxes; hello world. " * 40)
    opts = {"coef": 0.6, "data": str(text), "samples": 3, "max_length": 24}
    trainer = make_trainer(tiny_gpt2, tmp_path, "full", [{"ewc": opts}])
    reg = trainer.regularizers[0]

    # Fisher by hand: per block, squared gradient of its mean NLL (explicit log-softmax), averaged,
    # then divided by the mean over every weight
    from forgetless.data import load_texts, pack_blocks

    blocks = pack_blocks(load_texts(str(text)), trainer.processing_class, 24)
    pick = torch.linspace(0, len(blocks) - 1, 3).round().long()
    model = trainer.model
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    hand = [torch.zeros_like(p) for p in params]
    for block in blocks[pick]:
        logits = model(input_ids=block[None]).logits[0]
        nll = -sum(torch.log_softmax(logits[t], -1)[block[t + 1]] for t in range(len(block) - 1)) / (len(block) - 1)
        for h, gr in zip(hand, torch.autograd.grad(nll, params)):
            h += gr.pow(2) / 3
    mean = sum(h.sum() for h in hand) / sum(h.numel() for h in hand)
    model.train()
    for f, h in zip(reg.fisher, hand):
        torch.testing.assert_close(f.double(), (h / mean).double(), rtol=1e-5, atol=1e-12)

    # penalty gradient after moving the weights: coef * F * (theta - theta_0)
    batch = make_batch(tiny_gpt2, tmp_path, memorisation_rows(3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        shifts = [0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        for p, s in zip(params, shifts):
            p.add_(s)
    grads = step_grads(trainer, batch)
    plain = make_trainer(tiny_gpt2, tmp_path / "plain", "full", [])
    with torch.no_grad():
        for p, s in zip([p for p in plain.model.parameters() if p.requires_grad], shifts):
            p.add_(s)
    base = step_grads(plain, batch)
    expected_penalty = sum((f * s.pow(2)).sum().item() for f, s in zip(reg.fisher, shifts))
    assert trainer.pending_metrics()["ewc_penalty"][-1] == pytest.approx(expected_penalty, rel=1e-6)
    for (n, _), f, s in zip(reg.params, reg.fisher, shifts):
        torch.testing.assert_close(grads[n] - base[n], 0.6 * f * s, rtol=1e-6, atol=1e-12)

    # stored with the run and reused (resume): no re-estimation; other settings re-estimate
    path = tmp_path / "t" / ewc_mod.FISHER_FILE
    assert path.exists()
    calls = []
    real = ewc_mod.empirical_fisher
    monkeypatch.setattr(ewc_mod, "empirical_fisher", lambda *a: calls.append(1) or real(*a))
    again = make_trainer(tiny_gpt2, tmp_path, "full", [{"ewc": opts}])
    assert calls == []
    for f, f2 in zip(reg.fisher, again.regularizers[0].fisher):
        torch.testing.assert_close(f.float(), f2.float())
    make_trainer(tiny_gpt2, tmp_path, "full", [{"ewc": dict(opts, samples=2)}])
    assert calls == [1]


def test_ewc_with_lora_weighs_only_b_at_the_start(tiny_llama, tmp_path):
    text = tmp_path / "general.txt"
    text.write_text("hello world, the quick brown fox. " * 40)
    trainer = make_trainer(tiny_llama, tmp_path, "lora", [{"ewc": {"data": str(text), "samples": 2, "max_length": 16}}])
    reg = trainer.regularizers[0]
    for (name, _), f in zip(reg.params, reg.fisher):
        if "lora_A" in name:
            assert f.abs().max() == 0  # B = 0 at init: A has no gradient, so no Fisher
        else:
            assert "lora_B" in name and f.sum() > 0


# ------------------------------------------------------------------ NEFTune


class CaptureEmbeddings(TrainerCallback):
    """Records (embedding output - plain lookup) of the first training forward."""

    def __init__(self):
        self.noise = None
        self.shape = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.noise is not None:
            return
        emb = model.get_input_embeddings()

        def hook(module, inputs, output):
            if self.noise is None:
                self.noise = (output - torch.nn.functional.embedding(inputs[0], module.weight)).detach()
                self.shape = output.shape
            handle.remove()

        handle = emb.register_forward_hook(hook)


def test_neftune_adds_bounded_uniform_noise_while_training_only(tiny_gpt2, memo_data, tmp_path):
    from forgetless.trainer import ForgetlessTrainer

    alpha = 5.0
    captured = CaptureEmbeddings()
    orig_init = ForgetlessTrainer.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        self.add_callback(captured)

    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "n", max_steps=2, batch_size=4, learning_rate=1e-2)
    cfg = with_method(cfg, [{"neftune": {"alpha": alpha}}])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ForgetlessTrainer, "__init__", init)
        train(cfg)
    noise, (_, length, dim) = captured.noise, captured.shape
    bound = alpha / (length * dim) ** 0.5
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() > 0.5 * bound  # uniform over [-bound, bound]: the extremes are reached
    assert abs(noise.mean().item()) < 0.1 * bound
    # the hook is gone after training: the saved model computes the plain lookup, even in train mode
    model = load_trained(tmp_path / "n")[0].train()
    emb = model.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(emb(ids), torch.nn.functional.embedding(ids, emb.weight))


# ------------------------------------------------------------------ WiSE-FT


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_wise_ft_is_the_exact_weight_interpolation(tiny_llama, memo_data, tmp_path, finetune):
    from transformers import AutoModelForCausalLM

    alpha = 0.3
    weights = {}
    for name, regs in [("sft", []), ("wise", [{"wise_ft": {"alpha": alpha}}])]:
        cfg = tiny_config(tiny_llama, memo_data, tmp_path / name, max_steps=3, batch_size=4, learning_rate=3e-2)
        cfg.model.finetune = finetune
        cfg = with_method(cfg, regs)
        train(cfg)
        model = load_trained(tmp_path / name)[0]
        model = model.merge_and_unload() if finetune == "lora" else model
        weights[name] = {n: p.detach() for n, p in model.named_parameters()}
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_llama).named_parameters())
    moved = 0
    for n, w0 in base.items():
        expected = w0 + alpha * (weights["sft"][n] - w0)
        torch.testing.assert_close(weights["wise"][n], expected, rtol=1e-5, atol=1e-6)
        moved += int(not torch.allclose(weights["sft"][n], w0))
    assert moved > 0
    summary = json.loads((tmp_path / "wise" / "train_summary.json").read_text())
    assert summary["wise_ft_alpha"] == alpha


@pytest.mark.parametrize("method", ["neftune", "l2sp", "ewc", "wise-ft"])
def test_baseline_presets_validate_and_build(method):
    from forgetless.config import load_config

    cfg = load_config(None, [f"method={method}"])
    regs = [build(options) for options in cfg.regularizers]
    assert [r.name for r in regs] == [method.replace("-", "_")]


def test_the_readme_regularizer_example_trains_and_its_penalty_is_exact(tiny_llama, memo_data, tmp_path,
                                                                        clean_registry):
    """The README's "Writing a regularizer" code, run as written: it registers, its option is checked when
    the config is parsed, and in a training step its term is coef * sum of squares of the trainable weights."""
    import re
    from pathlib import Path

    from forgetless.config import load_config
    from forgetless.errors import ConfigError

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Writing a regularizer"):readme.index("## How the training step works")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) < 60
    # the file as the README says to save it, imported as forgetless/methods.py would import it
    (tmp_path / "mine.py").write_text(code)
    spec = importlib.util.spec_from_file_location("forgetless_readme_mine", tmp_path / "mine.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    with pytest.raises(ConfigError, match=r"regularizers\[0\]\.mine\.coef: must be >= 0"):
        load_config(None, ["regularizers=[{mine: {coef: -1}}]"])
    # its preset and its strength are known to the config and the budget
    assert load_config(None, ["method=mine"]).regularizers[0].coef == 0.1
    load_config(None, ["budget.knob=mine", "budget.max_general_drop=0.1"])

    trainer = make_trainer(tiny_llama, tmp_path, "lora", [{"mine": {"coef": 0.5}}])
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    squares = sum(p.detach().pow(2).sum().item() for p in params)
    loss = trainer.training_step(trainer.model, dict(batch))
    assert trainer.pending_metrics()["mine"][-1] == pytest.approx(squares, rel=1e-9)
    assert loss.item() - trainer.pending_metrics()["l_sft"][-1] == pytest.approx(0.5 * squares, rel=1e-6)
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "o", max_steps=2, batch_size=4)
    cfg = with_method(cfg, [{"mine": {"coef": 0.5}}])
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert any("mine" in r for r in rows)

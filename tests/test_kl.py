"""KL to the initial model: the divergence by hand, the regularizer in a training step, its reference cache."""

import gc
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, TrainingArguments

from forgetless.config import DataConfig, ModelConfig
from forgetless.data import collator, load_records, tokenize_records
from forgetless.errors import ConfigError
from forgetless.losses import token_kl
from forgetless.model import apply_finetune, load_tokenizer
from forgetless.registry import build, parse_entries
from forgetless.regularizers.kl import KLConfig
from forgetless.trainer import ForgetlessTrainer

from conftest import make_batch, make_trainer, memorisation_rows, step_trainer, write_jsonl


# ------------------------------------------------------------------ the divergence itself

def test_token_kl_matches_a_hand_computation_in_both_directions():
    torch.manual_seed(0)
    logits, ref = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    fwd, rev = token_kl(logits, ref, "forward"), token_kl(logits, ref, "reverse")
    for i in range(5):
        p = [math.exp(x) for x in torch.log_softmax(logits[i], -1).tolist()]   # current model
        r = [math.exp(x) for x in torch.log_softmax(ref[i], -1).tolist()]      # initial model
        assert fwd[i].item() == pytest.approx(sum(ri * math.log(ri / pi) for ri, pi in zip(r, p)), rel=1e-6)
        assert rev[i].item() == pytest.approx(sum(pi * math.log(pi / ri) for ri, pi in zip(r, p)), rel=1e-6)
    # F.kl_div(input, target) is KL(target || input): forward = kl_div(log p_theta, log p_ref)
    expected = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ref, -1), log_target=True,
                        reduction="none").sum(-1)
    torch.testing.assert_close(fwd, expected)
    assert not torch.allclose(fwd, rev)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_exact_kl_gradient_equals_autograd_of_the_formula_across_chunks(direction, monkeypatch):
    # the exact KL computes its gradient in closed form, chunk by chunk: check it against autograd
    # through the textbook formula, with chunks of 3 rows (10 rows: the last chunk is partial)
    from forgetless import losses

    monkeypatch.setattr(losses, "KL_CHUNK_ELEMENTS", 3 * 7)
    torch.manual_seed(2)
    logits = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    ref, weights = 2 * torch.randn(10, 7, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    ours = token_kl(logits, ref, direction)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    logp, logr = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    textbook = ((logr.exp() * (logr - logp)) if direction == "forward" else (logp.exp() * (logp - logr))).sum(-1)
    (expected,) = torch.autograd.grad((textbook * weights).sum(), logits)
    torch.testing.assert_close(ours, textbook, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    assert grad.abs().max() > 1e-3  # a real gradient, not zeros matching zeros


def test_topk_kl_is_a_lower_bound_that_becomes_exact():
    torch.manual_seed(1)
    logits, ref = torch.randn(6, 50), 3 * torch.randn(6, 50)
    exact = token_kl(logits, ref)
    for k in [1, 8, 32]:
        approx = token_kl(logits, ref, topk=k)
        assert (approx >= -1e-6).all() and (approx <= exact + 1e-5).all()
    torch.testing.assert_close(token_kl(logits, ref, topk=49), exact, rtol=1e-4, atol=1e-5)
    assert (token_kl(logits, ref, topk=32) - exact).abs().max() < (token_kl(logits, ref, topk=1) - exact).abs().max()


# ------------------------------------------------------------------ the regularizer in a training step

@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_is_zero_before_the_first_update_and_matches_by_hand_after(tiny_llama, tmp_path, finetune, direction):
    coef = 0.7
    trainer = make_trainer(tiny_llama, tmp_path, finetune, [{"kl": {"coef": coef, "direction": direction}}])
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    model = trainer.model
    trainer.training_step(model, dict(batch))
    assert trainer.pending_metrics()["kl"][-1] == 0.0  # exactly: the reference is the model as it starts
    trainer.optimizer.step()
    model.zero_grad()

    loss = trainer.training_step(model, dict(batch))
    # by hand: initial model from disk vs the updated model, mean over response tokens
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    model.eval()
    with torch.no_grad():
        cur = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = initial(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count, nll = 0.0, 0, 0.0
    labels = batch["labels"]
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            lp, lr = torch.log_softmax(cur[b, t], -1), torch.log_softmax(ref[b, t], -1)
            if direction == "forward":
                total += (lr.exp() * (lr - lp)).sum().item()
            else:
                total += (lp.exp() * (lp - lr)).sum().item()
            nll -= lp[labels[b, t + 1]].item()
            count += 1
    assert total / count > 1e-6
    assert trainer.pending_metrics()["kl"][-1] == pytest.approx(total / count, rel=1e-6)
    assert loss.item() == pytest.approx(nll / count + coef * total / count, rel=1e-6)


def _tensor_elements() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_lora_kl_keeps_no_second_copy_of_the_weights_full_finetuning_does(tiny_llama, tmp_path):
    model_bytes = sum(p.numel() * 8 for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    grown = {}
    for finetune in ["lora", "full"]:
        trainer = make_trainer(tiny_llama, tmp_path, finetune, [])
        before = _tensor_elements()
        kl = build(KLConfig())
        kl.setup(trainer.run_info)
        grown[finetune] = _tensor_elements() - before
        assert (kl.reference is None) == (finetune == "lora")
        del trainer, kl
    assert grown["lora"] == 0
    assert grown["full"] >= 0.9 * model_bytes


def test_lora_init_that_rewrites_the_base_is_refused(tiny_llama, tmp_path):
    trainer = make_trainer(tiny_llama, tmp_path, "lora", [])
    trainer.model.peft_config["default"].init_lora_weights = "pissa"
    with pytest.raises(ConfigError, match="rewrites the base weights"):
        build(KLConfig()).setup(trainer.run_info)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_kl_reference_runs_without_dropout(tmp_path, finetune):
    """With dropout in the model (and in LoRA), the KL reference is the initial model in eval mode:
    deterministic, equal to its eval-mode logits, while the trained model stays in train mode."""
    import copy

    from transformers import GPT2LMHeadModel

    from conftest import save_tiny
    from forgetless.config import LoraSettings

    model_dir = save_tiny(tmp_path / "m", "gpt2", chat=False)
    model = GPT2LMHeadModel.from_pretrained(model_dir, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    batch = make_batch(model_dir, tmp_path, memorisation_rows(3))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(input_ids=ids, attention_mask=mask).logits
    model = apply_finetune(model, ModelConfig(finetune=finetune, lora=LoraSettings(dropout=0.3)))
    model.train()  # as during training, also when the reference is set up
    trainer = step_trainer(model, tmp_path, [{"kl": {}}])
    kl = trainer.regularizers[0]
    model.train()
    torch.testing.assert_close(kl.reference_logits(trainer.model, ids, mask), expected, rtol=0, atol=0)
    assert model.training
    # dropout really is on in the trained model
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)


# ------------------------------------------------------------------ the cached reference

def test_cached_reference_matches_the_topk_kl_and_is_reused(tiny_llama, tmp_path, monkeypatch):
    import datasets

    from forgetless.regularizers.kl import KL

    tok = load_tokenizer(tiny_llama)
    path = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(6))
    examples, _ = tokenize_records(load_records(str(path), DataConfig()), tok, DataConfig(max_length=64))
    for i, ex in enumerate(examples):
        ex["example_id"] = i
    ds = datasets.Dataset.from_list(examples)
    k = 5
    regs = [{"kl": {"coef": 1.0, "topk": k, "cache": "topk"}}]

    def trainer_with(regs):
        model = apply_finetune(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64), ModelConfig())
        args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), report_to="none", use_cpu=True,
                                 learning_rate=0.5, optim="sgd", per_device_eval_batch_size=4, disable_tqdm=True)
        return ForgetlessTrainer(model=model, args=args, regularizers=[build(o) for o in parse_entries(regs)], train_dataset=ds,
                                 processing_class=tok)

    trainer = trainer_with(regs)
    assert (tmp_path / "ckpt" / "kl_cache.safetensors").exists()
    kl = trainer.regularizers[0]
    batch = collator(tok)([dict(ds[i]) for i in [4, 1, 2]])  # any order, any subset
    # move the model away from the reference: perturb the LoRA B matrices
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != -100
    rows = logits[:, :-1][keep]
    cached_sum, n = kl._cached_kl_sum(rows, batch)
    ref = kl.reference_logits(trainer.model, batch["input_ids"], batch["attention_mask"])
    expected = token_kl(rows, ref[:, :-1][keep], "forward", topk=k)
    exact = token_kl(rows, ref[:, :-1][keep], "forward")
    assert n == int(keep.sum()) and cached_sum.item() > 0
    assert cached_sum.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert cached_sum.item() <= exact.sum().item() + 1e-9

    # a second run (e.g. a resume) reuses the stored cache instead of recomputing it
    monkeypatch.setattr(KL, "_build_cache", lambda *a: pytest.fail("the cache was rebuilt"))
    trainer_with(regs)


def test_full_finetune_cache_needs_no_reference_copy_and_starts_at_zero(tiny_llama, tmp_path):
    import datasets

    tok = load_tokenizer(tiny_llama)
    path = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(4))
    examples, _ = tokenize_records(load_records(str(path), DataConfig()), tok, DataConfig(max_length=64))
    for i, ex in enumerate(examples):
        ex["example_id"] = i
    model = apply_finetune(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64),
                           ModelConfig(finetune="full"))
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = ForgetlessTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(examples),
                                regularizers=[build(KLConfig(cache="topk", topk=5))],
                                processing_class=tok)
    kl = trainer.regularizers[0]
    assert kl.reference is None and kl.cache is not None
    batch = collator(tok)([dict(examples[i]) for i in range(4)])
    trainer.training_step(model, batch)
    # the cache holds the model as it started (stored in fp32, so zero up to fp32 rounding)
    assert abs(trainer.pending_metrics()["kl"][-1]) < 1e-6

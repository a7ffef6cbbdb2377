"""train.loss_chunk: the SFT NLL from the LM head a few rows at a time (losses.chunked_head_nll), never the whole
logits — the same loss and gradient as the plain head + cross-entropy, in float64, for every step kind."""

import pytest
import torch
import torch.nn.functional as F

from forgetless.config import load_config
from forgetless.errors import ConfigError
from forgetless.losses import chunked_head_nll

from conftest import make_batch, make_trainer, memorisation_rows


@pytest.mark.parametrize("n, chunk", [(11, 4), (11, 11), (11, 64), (0, 4)])
def test_chunked_head_nll_is_cross_entropy_of_the_head(n, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (n,))
    upstream = torch.rand(n, dtype=torch.float64)  # a weighted sum, as token_scale and DFT weigh the rows
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    expected = torch.autograd.grad((plain * upstream).sum(), [hidden, weight])
    chunked = chunked_head_nll(hidden, weight, targets, chunk)
    got = torch.autograd.grad((chunked * upstream).sum(), [hidden, weight])
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    if n:
        assert torch.autograd.gradcheck(lambda h, w: chunked_head_nll(h, w, targets, 3), (hidden, weight))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("regs, replay", [
    ([], None),
    ([{"dft": {}}], None),
    ([], {"ratio": 1.0, "max_length": 8, "weight": 2.0, "forward": "auto"}),  # replay rows joined to the forward
    ([{"lfu": {}}], None),  # the perturbing step's clean pass
])
def test_chunked_step_equals_the_plain_step(tiny_llama, tmp_path, finetune, regs, replay):
    """One training step with loss_chunk 3 against the plain head: the same loss and gradient (full fine-tuning
    included, where the tied head/embedding weight is trained through both the lookup and the chunked head)."""
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    out = {}
    for chunk in (0, 3):
        torch.manual_seed(0)  # the same LoRA initialisation for both
        trainer = make_trainer(tiny_llama, tmp_path, finetune, regs, replay=replay, loss_chunk=chunk,
                               per_device_train_batch_size=3)
        loss = trainer.training_step(trainer.model, dict(batch))
        out[chunk] = loss.item(), grads(trainer.model), trainer.pending_metrics()
    (plain_loss, plain, plain_metrics), (loss, chunked, metrics) = out[0], out[3]
    assert loss == pytest.approx(plain_loss, rel=1e-10)
    assert plain.keys() == chunked.keys() and plain
    for name, g in plain.items():
        torch.testing.assert_close(chunked[name], g, rtol=1e-9, atol=1e-12 * max(g.abs().max().item(), 1.0), msg=name)
    for key in ("l_sft", "l_replay", "l_dft", "l_cons"):
        if key in plain_metrics:
            assert metrics[key] == pytest.approx(plain_metrics[key], rel=1e-9), key


def test_chunked_loss_is_refused_beside_a_term_that_reads_the_logits(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="train.loss_chunk: kl reads the model's logits"):
        make_trainer(tiny_llama, tmp_path, "lora", [{"kl": {}}], loss_chunk=4)
    with pytest.raises(ConfigError, match="train.loss_chunk"):
        load_config(None, ["train.loss_chunk=-1"])


def test_a_head_the_chunked_loss_cannot_stand_for_is_named():
    """Gemma 2 soft-caps its logits after the head (the chunked loss would silently drop the cap); a PEFT adapter on
    the head makes its weight not the head's function. A plain bias-free head passes."""
    import peft
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from forgetless.trainer import chunked_head_problem

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=30.0))
    assert "final_logit_softcapping" in chunked_head_problem(gemma)
    llama = LlamaForCausalLM(LlamaConfig(**small, tie_word_embeddings=False))
    assert chunked_head_problem(llama) is None
    adapted = peft.get_peft_model(llama, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    assert "not a plain linear layer" in chunked_head_problem(adapted)

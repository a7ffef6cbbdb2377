"""LfU against a by-hand computation in float64, and its guarantees (lam=0, accumulation, logs, memory, precision)."""

import copy
import json
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from forgetless.config import ModelConfig
from forgetless.errors import ConfigError
from forgetless.model import apply_finetune
from forgetless.registry import build, parse_entries
from forgetless.regularizers.lfu import find_decoder_layers, select_layers
from forgetless.train import train
from forgetless.trainer import ForgetlessTrainer

from conftest import make_batch, memorisation_rows, step_trainer, tiny_config, trained_weights, with_method

LAM, ALPHA = 5.0, 0.1


def make_model(model_dir, finetune):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    torch.manual_seed(1)
    model = apply_finetune(model, ModelConfig(finetune=finetune, lora=ModelConfig().lora))
    if finetune == "lora":
        # LoRA's B starts at zero, which would make A's gradient zero: give B a value so every tensor is tested
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model


def layer_outputs(model, batch, indices, steering=None):
    """Explicit reference: run the model, collect decoder-layer outputs at response tokens."""
    layers = find_decoder_layers(model)
    mask = batch["labels"] != -100
    got = {}

    def hook(i):
        def fn(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            if steering is not None:
                h = h + steering[i]
                out = (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            got[i] = h[mask]
            return out
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for h in handles:
            h.remove()
    return logits, [got[i] for i in indices]


def mean_nll(logits, labels):
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100:
                total = total - torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
                count += 1
    return total / count


def hand_lfu_grads(model, batch, variant, layers_spec):
    """The spec's equations, step by step, on a deep copy: returns (loss, {name: grad})."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_layers = len(find_decoder_layers(model))
    indices = select_layers(layers_spec, n_layers)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    if variant == "lora":
        logits, clean = layer_outputs(model, batch, indices)
        l_sft = mean_nll(logits, batch["labels"])
        g = torch.autograd.grad(l_sft, list(params.values()))
        norm = torch.sqrt(sum((x ** 2).sum() for x in g))
        perturbed = copy.deepcopy(model)
        with torch.no_grad():
            grad_of = dict(zip(params, g))
            for name, p in perturbed.named_parameters():
                if name in grad_of:
                    p.add_(ALPHA * grad_of[name] / norm)
        _, pert = layer_outputs(perturbed, batch, indices)
        l_cons = sum(((c.detach() - h) ** 2).mean() for c, h in zip(clean, pert)) / len(indices)
        cons_grads = torch.autograd.grad(l_cons, [p for n, p in perturbed.named_parameters() if n in params],
                                         allow_unused=True)  # e.g. the LM head: l_cons does not reach it
        grads = {n: gi + LAM * (0 if ci is None else ci) for n, gi, ci in zip(params, g, cons_grads)}
    else:
        zeros = [torch.zeros(hidden, dtype=torch.float64, requires_grad=True) for _ in range(n_layers)]
        logits, clean = layer_outputs(model, batch, indices, steering=zeros)
        l_sft = mean_nll(logits, batch["labels"])
        g_theta = torch.autograd.grad(l_sft, list(params.values()), retain_graph=True)
        g_d = torch.autograd.grad(l_sft, zeros)
        norm = torch.sqrt(sum((x ** 2).sum() for x in g_d))
        d = [ALPHA * x / norm for x in g_d]
        _, pert = layer_outputs(model, batch, indices, steering=d)
        l_cons = sum(((c.detach() - h) ** 2).mean() for c, h in zip(clean, pert)) / len(indices)
        cons_grads = torch.autograd.grad(l_cons, list(params.values()), allow_unused=True)
        grads = {n: gi + LAM * (0 if ci is None else ci) for n, gi, ci in zip(params, g_theta, cons_grads)}
    return (l_sft + LAM * l_cons).item(), grads


def library_step(model, batch, tmp_path, variant, layers_spec, lam=LAM):
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True)
    regs = [build(o) for o in parse_entries([{"lfu": {"variant": variant, "lam": lam, "alpha": ALPHA, "layers": layers_spec}}])]
    trainer = ForgetlessTrainer(model=model, args=args, regularizers=regs)
    loss = trainer.training_step(model, dict(batch))
    metrics = {k: v[-1] for k, v in trainer.pending_metrics().items()}
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, metrics


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("variant, finetune, layers", [
    ("lora", "lora", "all"), ("lora", "full", "all"), ("reps", "lora", "all"), ("reps", "full", [0]),
    ("lora", "lora", "late"),
])
def test_one_step_matches_the_hand_computation(model_fixture, variant, finetune, layers, tmp_path, request):
    model_dir = request.getfixturevalue(model_fixture)
    rows = memorisation_rows(3)
    batch = make_batch(model_dir, tmp_path, rows)
    model = make_model(model_dir, finetune)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_loss, expected = hand_lfu_grads(copy.deepcopy(model), batch, variant, layers)
    loss, grads, metrics = library_step(model, batch, tmp_path, variant, layers)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["l_cons"] > 0 and metrics["lfu_perturb_norm"] == pytest.approx(ALPHA, rel=1e-6)
    for name, g in expected.items():
        err = (grads[name] - g).norm() / g.norm()
        assert err < 1e-6, (name, err.item())
    # the perturbation is discarded: weights are untouched by the step (no optimizer here)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("alpha_scale, consistency", [("weights", "absolute"), ("absolute", "relative"),
                                                      ("weights", "relative")])
def test_scale_free_options_match_the_hand_computation(alpha_scale, consistency, tiny_llama, tmp_path):
    """||phi|| = alpha ||theta|| ("weights") and the consistency over the clean states' mean squared norm
    ("relative"), by hand in float64; and lfu_rel_shift = mean over layers of ||h' - h||_F / ||h||_F."""
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    model = make_model(tiny_llama, "lora")
    hand = copy.deepcopy(model)
    params = {n: p for n, p in hand.named_parameters() if p.requires_grad}
    indices = select_layers("all", len(find_decoder_layers(hand)))
    logits, clean = layer_outputs(hand, batch, indices)
    l_sft = mean_nll(logits, batch["labels"])
    g = torch.autograd.grad(l_sft, list(params.values()))
    size = ALPHA * torch.sqrt(sum((p.detach() ** 2).sum() for p in params.values())) if alpha_scale == "weights" else ALPHA
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    with torch.no_grad():
        for p, gi in zip(params.values(), g):
            p.add_(size * gi / norm)  # hand is now the perturbed model (theta + phi)
    _, pert = layer_outputs(hand, batch, indices)
    if consistency == "relative":  # per layer: mean_t ||dh||^2 / mean_t ||h||^2
        per_layer = [((c.detach() - h) ** 2).sum(-1).mean() / (c.detach() ** 2).sum(-1).mean() for c, h in zip(clean, pert)]
    else:
        per_layer = [((c.detach() - h) ** 2).mean() for c, h in zip(clean, pert)]
    l_cons = sum(per_layer) / len(indices)
    cons_grads = torch.autograd.grad(l_cons, list(params.values()), allow_unused=True)
    expected = {n: gi + LAM * (0 if ci is None else ci) for n, gi, ci in zip(params, g, cons_grads)}
    shift = sum(((c - h).norm() / c.norm()).item() for c, h in zip(clean, pert)) / len(indices)

    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True)
    regs = [build(o) for o in parse_entries([{"lfu": {"lam": LAM, "alpha": ALPHA, "alpha_scale": alpha_scale,
                                                      "consistency": consistency}}])]
    trainer = ForgetlessTrainer(model=model, args=args, regularizers=regs)
    loss = trainer.training_step(model, dict(batch)).item()
    metrics = {k: v[-1] for k, v in trainer.pending_metrics().items()}
    assert loss == pytest.approx((l_sft + LAM * l_cons).item(), rel=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad - expected[name]).norm() / expected[name].norm() < 1e-6, name
    assert metrics["lfu_perturb_norm"] == pytest.approx(float(size), rel=1e-5)
    assert metrics["lfu_rel_shift"] == pytest.approx(shift, rel=1e-4)
    if alpha_scale == "weights":
        assert float(size) != pytest.approx(ALPHA, rel=0.1)  # the option did change phi's size


def test_weights_scaled_alpha_is_refused_for_reps():
    with pytest.raises(ConfigError, match="alpha_scale: 'weights' scales phi"):
        parse_entries([{"lfu": {"variant": "reps", "alpha_scale": "weights"}}])


def test_ascent_gradient_never_leaks_into_the_accumulated_gradient(tiny_llama, tmp_path):
    """Two micro-batches: .grad must be the sum of each micro-batch's own LfU gradient."""
    rows = memorisation_rows(4)
    b1 = make_batch(tiny_llama, tmp_path, rows[:2])
    b2 = make_batch(tiny_llama, tmp_path, rows[2:])
    model = make_model(tiny_llama, "lora")
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in (b1, b2)]
    expected = {}
    for b, n in zip((b1, b2), tokens):
        _, g = hand_lfu_grads(copy.deepcopy(model), b, "lora", "all")
        for name, gi in g.items():  # per-micro mean -> weighted by its share of the step's tokens
            expected[name] = expected.get(name, 0) + gi * n / sum(tokens)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, gradient_accumulation_steps=2)
    regs = [build(o) for o in parse_entries([{"lfu": {"lam": LAM, "alpha": ALPHA}}])]
    trainer = ForgetlessTrainer(model=model, args=args, regularizers=regs)
    for b in (b1, b2):
        trainer.training_step(model, dict(b), num_items_in_batch=sum(tokens))
    for name, p in model.named_parameters():
        if p.requires_grad:
            err = (p.grad - expected[name]).norm() / expected[name].norm()
            assert err < 1e-6, (name, err.item())


def test_lam_zero_reproduces_plain_sft_exactly(tiny_llama, memo_data, tmp_path):
    steps = dict(max_steps=4, batch_size=4, learning_rate=1e-2)
    sft = trained_weights(tiny_llama, memo_data, tmp_path / "sft", [], **steps)
    lfu0 = trained_weights(tiny_llama, memo_data, tmp_path / "lfu0", [{"lfu": {"lam": 0.0}}], **steps)
    for n, p in sft.items():
        assert torch.equal(p, lfu0[n]), n


@pytest.mark.parametrize("variant", ["lora", "reps"])
def test_lfu_trains_and_logs_its_parts(tiny_gpt2, memo_data, tmp_path, variant):
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "o", max_steps=3, batch_size=4, learning_rate=1e-2)
    cfg = with_method(cfg, [{"lfu": {"variant": variant}}])
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    logged = [r for r in rows if "l_cons" in r]
    assert len(logged) == 3
    for r in logged:
        assert r["l_cons"] > 0 and r["lfu_ascent_grad_norm"] > 0
        assert r["lfu_perturb_norm"] == pytest.approx(0.1, rel=1e-4)
        assert r["loss"] == pytest.approx(r["l_sft"] + 5.0 * r["l_cons"], rel=1e-5)  # logged loss = all terms


def test_dropout_masks_are_shared_by_the_clean_and_perturbed_pass(tmp_path):
    """With alpha = 0 the perturbed model is the clean one: l_cons must be exactly 0 even with dropout."""
    from conftest import save_tiny
    from transformers import GPT2LMHeadModel

    model_dir = save_tiny(tmp_path / "m", "gpt2", chat=False)
    model = GPT2LMHeadModel.from_pretrained(model_dir, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    model = apply_finetune(model, ModelConfig(finetune="full"))
    batch = make_batch(model_dir, tmp_path, memorisation_rows(3))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True)
    regs = [build(o) for o in parse_entries([{"lfu": {"alpha": 0.0}}])]
    trainer = ForgetlessTrainer(model=model, args=args, regularizers=regs)
    trainer.training_step(model, dict(batch))
    assert trainer.pending_metrics()["l_cons"][-1] == 0.0
    # and dropout really is on: two clean forwards in train mode differ
    model.train()
    a = model(input_ids=batch["input_ids"]).logits
    b = model(input_ids=batch["input_ids"]).logits
    assert not torch.equal(a, b)


def test_bad_lfu_options_are_named():
    from forgetless.config import load_config
    from forgetless.errors import ConfigError

    with pytest.raises(ConfigError, match=r"regularizers\[0\].lfu.variant: must be one of 'lora' \| 'reps'"):
        load_config(None, ["regularizers=[{lfu: {variant: lorra}}]"])
    with pytest.raises(ConfigError, match=r"regularizers\[0\].lfu.lamda: unknown key \(did you mean"):
        load_config(None, ["regularizers=[{lfu: {lamda: 1}}]"])


# ---------------------------------------------------------------- memory and precision (issue #15)

@pytest.mark.parametrize("regularizers", [[{"kl": {"coef": 1.0}}, {"lfu": {}}], [{"lfu": {}}, {"kl": {"coef": 1.0}}]])
def test_lfu_frees_the_clean_pass_before_its_perturbed_pass(tiny_llama, tmp_path, regularizers):
    """LfU + KL: nothing of vocabulary width saved by the clean pass (KL's saved gradient, the SFT
    cross-entropy's logits) may still be alive when the perturbed forward starts."""
    from transformers import AutoModelForCausalLM

    model = apply_finetune(AutoModelForCausalLM.from_pretrained(tiny_llama), ModelConfig())
    vocab = model.config.vocab_size
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    trainer = step_trainer(model, tmp_path, regularizers)
    saved: list[weakref.ref] = []

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == vocab and t.is_floating_point():
            saved.append(weakref.ref(t))
        return t

    alive_at_perturbed_pass = []
    original = trainer.perturber.perturbed_backward

    def probe(ctx):
        alive_at_perturbed_pass.extend(ref() is not None for ref in saved)
        return original(ctx)

    trainer.perturber.perturbed_backward = probe
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.training_step(model, dict(batch))
    assert alive_at_perturbed_pass and saved  # the probe ran and saw the clean pass's tensors
    assert not any(alive_at_perturbed_pass), f"{sum(alive_at_perturbed_pass)} [N, V] tensors still alive"


def test_lfu_refuses_a_perturbation_that_half_precision_weights_round_away(tiny_llama, tmp_path):
    """Full fine-tuning in bfloat16: theta + phi rounds most of phi away; LfU must not train on that."""
    from transformers import AutoModelForCausalLM

    from forgetless.errors import TrainingError

    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    model = apply_finetune(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16),
                           ModelConfig(finetune="full"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = step_trainer(model, tmp_path, [{"lfu": {"alpha": 0.01}}])
    with pytest.raises(TrainingError, match=r"lfu: in bfloat16 the weights cannot hold the perturbation"):
        trainer.training_step(model, dict(batch))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # LoRA adapters stay float32 on a bfloat16 base (peft), so LoRA LfU is unaffected
    lora = apply_finetune(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16), ModelConfig())
    trainer = step_trainer(lora, tmp_path, [{"lfu": {"alpha": 0.01}}])
    trainer.training_step(lora, dict(batch))
    assert trainer.pending_metrics()["lfu_perturb_norm"][-1] == pytest.approx(0.01, rel=1e-4)


# ---------------------------------------------------------------- the cheap approximations (issue #18)

def lfu_trainer(model, tmp_path, **options):
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, seed=3)
    regs = [build(o) for o in parse_entries([{"lfu": {"lam": LAM, "alpha": ALPHA, **options}}])]
    return ForgetlessTrainer(model=model, args=args, regularizers=regs)


def step_grads(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    trainer.training_step(model, dict(batch))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def relative_error(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


@pytest.mark.parametrize("variant", ["lora", "reps"])
def test_no_op_rows_and_every_are_exact_lfu(tiny_llama, tmp_path, variant):
    """rows 1.0 and every 1 are the hand-computed exact step."""
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(4))
    model = make_model(tiny_llama, "lora")
    _, expected = hand_lfu_grads(copy.deepcopy(model), batch, variant, "all")
    trainer = lfu_trainer(model, tmp_path, variant=variant, rows=1.0, every=1)
    for _ in range(2):  # every micro-batch, not only the first
        assert relative_error(step_grads(trainer, model, batch), expected) < 1e-6


@pytest.mark.parametrize("variant", ["lora", "reps"])
def test_row_sample_is_an_unbiased_estimate_of_exact_lfu(tiny_llama, tmp_path, variant):
    """rows 0.5 of 4: each draw is one of the 6 row pairs, drawn uniformly; the mean of the 6 pairs' gradients
    is exact LfU's gradient (float64), though no single pair's is."""
    from collections import Counter

    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(4))
    model = make_model(tiny_llama, "lora")
    exact = step_grads(lfu_trainer(model, tmp_path, variant=variant), model, batch)
    trainer = lfu_trainer(model, tmp_path, variant=variant, rows=0.5)
    lfu = trainer.perturber
    by_pair, counts = {}, Counter()
    for _ in range(240):
        grads = step_grads(trainer, model, batch)
        pair = tuple(lfu_rows_of_last_draw(trainer))
        counts[pair] += 1
        by_pair.setdefault(pair, grads)
    assert sorted(counts) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert all(30 <= c <= 50 for c in counts.values()), counts  # 40 expected each
    mean = {n: sum(g[n] for g in by_pair.values()) / len(by_pair) for n in exact}
    assert relative_error(mean, exact) < 1e-6
    assert all(relative_error(g, exact) > 1e-3 for g in by_pair.values())
    assert lfu.rows is not None


def lfu_rows_of_last_draw(trainer):
    return trainer.perturber.rows.tolist()


def test_every_k_runs_the_pass_on_every_kth_micro_batch_scaled_by_k(tiny_llama, tmp_path):
    """every 3: micro-batches 0, 3, ... carry 3x the exact term and the others are plain SFT, so k micro-batches
    of the same batch accumulate k times the exact gradient."""
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    model = make_model(tiny_llama, "lora")
    exact = step_grads(lfu_trainer(model, tmp_path), model, batch)
    sft = step_grads(lfu_trainer(model, tmp_path, lam=0.0), model, batch)
    trainer = lfu_trainer(model, tmp_path, every=3)
    grads = [step_grads(trainer, model, batch) for _ in range(6)]
    for g in (grads[1], grads[2], grads[4], grads[5]):
        assert relative_error(g, sft) < 1e-9
    assert relative_error(grads[3], grads[0]) < 1e-9
    summed = {n: grads[0][n] + grads[1][n] + grads[2][n] for n in exact}
    assert relative_error(summed, {n: 3 * g for n, g in exact.items()}) < 1e-6
    assert len(trainer.pending_metrics()["l_cons"]) == 2


def test_lfu_fast_preset_trains_and_logs(tiny_gpt2, memo_data, tmp_path):
    from forgetless.config import as_preset as preset

    cfg = preset(tiny_config(tiny_gpt2, memo_data, tmp_path / "o", max_steps=4, batch_size=4, learning_rate=1e-2),
                 "lfu-fast")
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert sum("l_cons" in r for r in rows) >= 1


@pytest.mark.parametrize("option, value, message", [
    ("rows", 0, r"regularizers\[0\].lfu.rows: a fraction of the micro-batch in \(0, 1\], got 0"),
    ("rows", 1.5, r"lfu.rows: a fraction"), ("every", 0, r"lfu.every: a whole number of micro-batches >= 1, got 0"),
])
def test_bad_cheap_lfu_options_are_named(option, value, message):
    from forgetless.config import load_config
    from forgetless.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"regularizers=[{{lfu: {{{option}: {value}}}}}]"])

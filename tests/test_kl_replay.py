"""KL to the initial model and approximate replay: hand computations, storage, ratios, exact no-ops."""

import gc
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, TrainingArguments

from forgetless.config import DataConfig, ForgetlessConfig, ModelConfig, ReplayConfig, load_config, validate
from forgetless.data import collator, load_records, load_texts, pack_blocks, tokenize_records
from forgetless.errors import ConfigError, DataError
from forgetless.losses import token_kl
from forgetless.model import apply_finetune, load_tokenizer
from forgetless.registry import build, parse_entries
from forgetless.replay import ReplaySource
from forgetless.train import build_method, load_trained, train
from forgetless.regularizers.kl import KLConfig
from forgetless.trainer import ForgetlessTrainer

from conftest import trained_weights, memorisation_rows, tiny_config, with_method, write_jsonl


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

def make_trainer(model_dir, tmp_path, finetune, regs, dtype=torch.float64, replay=None, **args_kwargs):
    """A trainer with these `regularizers:` entries and `replay:` section (YAML form), checked as a config's are."""
    config = ForgetlessConfig(method="custom" if regs or replay is not None else "sft", regularizers=regs, replay=replay)
    validate(config)
    regularizers, replay_source = build_method(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = apply_finetune(model, ModelConfig(finetune=finetune))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, learning_rate=0.5,
                             optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", **args_kwargs)
    trainer = ForgetlessTrainer(model=model, args=args, regularizers=regularizers, replay=replay_source,
                                processing_class=load_tokenizer(model_dir))
    trainer.create_optimizer()
    return trainer


def make_batch(model_dir, tmp_path, rows):
    tok = load_tokenizer(model_dir)
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    examples, _ = tokenize_records(load_records(str(path), DataConfig()), tok, DataConfig(max_length=64))
    return collator(tok)(examples)


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


@pytest.mark.parametrize("forward,length", [("own", 8), ("with_sft", 8), ("with_sft", 40)])
def test_replay_pass_and_its_kl_give_the_gradient_of_the_whole_loss(tiny_llama, tmp_path, monkeypatch, forward,
                                                                    length):
    # The replay blocks either join the SFT forward (padded to one length: the blocks when shorter than
    # the SFT rows, the SFT rows when the blocks are longer) or run their own forward + backward before
    # it; the accumulated gradient must be that of the one loss the spec defines, computed here by autograd:
    #   mean SFT NLL + coef * mean KL (SFT tokens) + weight * mean replay NLL + coef * mean KL (replay tokens)

    coef, weight = 0.5, 2.0
    drawn = []
    original = ReplaySource.row_indices
    monkeypatch.setattr(ReplaySource, "row_indices",
                        lambda self, first, count, rank=None: drawn.append(original(self, first, count, rank)) or drawn[-1])
    trainer = make_trainer(tiny_llama, tmp_path, "full",
                           [{"kl": {"coef": coef, "on": "both"}}], per_device_train_batch_size=3,
                           replay={"ratio": 1.0, "max_length": length, "weight": weight, "forward": forward})
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    model = trainer.model
    trainer.training_step(model, dict(batch))  # a first update, so the model differs from the reference
    trainer.optimizer.step()
    model.zero_grad()
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    loss = trainer.training_step(model, dict(batch))
    hook.remove()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    blocks = trainer.replay.blocks[drawn[-1]]
    assert blocks.shape == (3, length)
    sft_length = batch["input_ids"].shape[1]
    assert 8 < sft_length < 40  # so both kinds of rows get padded across the cases
    if forward == "own":
        assert forwards == [(3, length), (3, sft_length)]
    else:  # one forward of SFT rows + blocks
        assert forwards == [(6, max(length, sft_length))]
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    model.eval()  # no dropout in the tiny model; eval() only so the hand pass matches the reference side

    def parts(ids, mask, labels):
        cur = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with torch.no_grad():
            ref = initial(input_ids=ids, attention_mask=mask).logits[:, :-1]
        keep = labels[:, 1:] != -100
        logp, logr = torch.log_softmax(cur[keep], -1), torch.log_softmax(ref[keep], -1)
        nll = -logp.gather(-1, labels[:, 1:][keep].unsqueeze(-1)).mean()
        return nll, (logr.exp() * (logr - logp)).sum(-1).mean()

    sft_nll, sft_kl = parts(batch["input_ids"], batch["attention_mask"], batch["labels"])
    rep_nll, rep_kl = parts(blocks, torch.ones_like(blocks), blocks)
    expected_loss = sft_nll + coef * sft_kl + weight * rep_nll + coef * rep_kl
    expected_loss.backward()
    assert sft_kl.item() > 1e-6 and rep_kl.item() > 1e-6
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-9)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-7, atol=1e-12, msg=n)


def test_replay_auto_joins_the_sft_forward_only_when_padding_is_small(tiny_llama, tmp_path):
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    sft_length = batch["input_ids"].shape[1]

    def forwards_of_one_step(replay, regs=()):
        trainer = make_trainer(tiny_llama, tmp_path, "lora", list(regs), replay=replay, per_device_train_batch_size=3)
        shapes = []
        trainer.model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                                with_kwargs=True)
        trainer.training_step(trainer.model, dict(batch))
        return shapes

    same = {"ratio": 1.0, "max_length": sft_length}
    assert forwards_of_one_step(same) == [(6, sft_length)]  # equal lengths: one forward
    long = {"ratio": 1.0, "max_length": 3 * sft_length}  # padding would add far more than 10%
    assert forwards_of_one_step(long) == [(3, 3 * sft_length), (3, sft_length)]
    # LfU's hooks read the SFT rows of the clean forward: replay runs apart (3 = LfU's perturbed pass)
    assert forwards_of_one_step(same, [{"lfu": {}}]) == [(3, sft_length)] * 3
    with pytest.raises(ConfigError, match="with_sft cannot be combined with lfu"):
        make_trainer(tiny_llama, tmp_path, "lora", [{"lfu": {}}], replay={"forward": "with_sft"})


def test_kl_on_replay_needs_replay(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="needs replay rows"):
        make_trainer(tiny_llama, tmp_path, "lora", [{"kl": {"on": "replay"}}])


def test_rules_between_regularizers_are_checked_when_the_config_is_parsed():
    """Before any model loads, naming the entry and its option; the order of the entries does not matter."""
    from forgetless.config import load_config

    with pytest.raises(ConfigError, match=r"regularizers\[0\].kl.on: 'both' needs replay rows: add a `replay:`"):
        load_config(None, ["regularizers=[{kl: {on: both}}]"])
    load_config(None, ["regularizers=[{kl: {on: both}}]", "replay={}"])  # with replay: fine
    with pytest.raises(ConfigError, match=r"replay.forward: with_sft cannot be combined with lfu"):
        load_config(None, ["regularizers=[{lfu: {}}]", "replay={forward: with_sft}"])
    with pytest.raises(ConfigError, match=r"regularizers\[0\].lfu: at most one perturbing regularizer"):
        load_config(None, ["regularizers=[{lfu: {}}, {lfu: {variant: reps}}]"])
    # and inside a compare run, before anything trains
    with pytest.raises(ConfigError, match=r"compare.runs.x: regularizers\[0\].kl.on: 'replay' needs replay rows"):
        load_config(None, ["compare.runs={x: {regularizers: [{kl: {on: replay}}]}}"])


# ------------------------------------------------------------------ replay

def test_replay_corpus_loading_and_packing(tiny_gpt2, tmp_path):
    tok = load_tokenizer(tiny_gpt2)
    texts = load_texts("builtin:replay/kjv.txt.gz")
    assert len(texts) > 200 and texts[0].startswith("In the beginning")
    blocks = pack_blocks(texts[:3], tok, 16)
    assert blocks.shape[1] == 16 and blocks.shape[0] > 10
    assert (blocks == tok.eos_token_id).sum() >= 2  # documents separated by eos
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "the quick brown fox"}, {"body": "x"}])
    with pytest.raises(DataError, match=r"c.jsonl:2: missing field 'text'"):
        load_texts(str(path))


def test_replay_mix_ratio_is_exact_deterministic_and_cycles(tiny_gpt2, tmp_path):
    trainer = make_trainer(tiny_gpt2, tmp_path, "lora", [])
    replay = ReplaySource(ReplayConfig(ratio=0.3, max_length=16))
    replay.setup(trainer.run_info)
    n_blocks = replay.blocks.shape[0]
    draws = replay.row_indices(0, 3 * n_blocks)
    for c in range(3):  # each cycle visits every block once, in a fresh order
        assert sorted(draws[c * n_blocks:(c + 1) * n_blocks]) == list(range(n_blocks))
    assert draws[:n_blocks] != draws[n_blocks:2 * n_blocks]
    again = ReplaySource(ReplayConfig(ratio=0.3, max_length=16))
    again.setup(trainer.run_info)
    assert again.row_indices(0, 50) == draws[:50]


def test_replay_fraction_over_a_run(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(9))  # full batches of 3 every epoch
    cfg = tiny_config(tiny_gpt2, data, tmp_path / "o", max_steps=20, batch_size=3, learning_rate=1e-3)
    cfg = with_method(cfg, replay={"ratio": 0.4, "max_length": 16})
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl") if '"replay_fraction"' in line]
    assert len(rows) == 20
    # 60 SFT examples -> exactly floor(0.4 * 60) = 24 replay blocks: fraction 24 / 84 overall
    counts = [round(r["replay_fraction"] * 3 / (1 - r["replay_fraction"])) for r in rows]
    assert sum(counts) == 24
    assert all(r["l_replay"] > 0 for r in rows if r["replay_fraction"] > 0)


def test_replay_with_accumulation_matches_one_big_batch(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(4))
    params = {}
    for batch, accum in [(4, 1), (1, 4)]:
        cfg = tiny_config(tiny_llama, data, tmp_path / f"o{batch}", max_steps=2, batch_size=batch, grad_accum=accum,
                          learning_rate=0.5, optim="sgd", max_grad_norm=0, seed=3)
        cfg.model.finetune = "full"
        cfg = with_method(cfg, [{"kl": {"coef": 0.5}}], replay={"ratio": 0.5, "max_length": 12, "weight": 2.0})
        train(cfg)
        params[batch] = dict(load_trained(tmp_path / f"o{batch}")[0].named_parameters())
    for name, p in params[4].items():
        torch.testing.assert_close(params[1][name], p, rtol=1e-5, atol=1e-6)


def test_zero_coef_and_zero_ratio_reproduce_plain_sft_exactly(tiny_llama, memo_data, tmp_path):
    steps = dict(max_steps=4, batch_size=4, learning_rate=1e-2)
    sft = trained_weights(tiny_llama, memo_data, tmp_path / "sft", [], **steps)
    noop = trained_weights(tiny_llama, memo_data, tmp_path / "noop", [{"kl": {"coef": 0.0}}], {"ratio": 0.0}, **steps)
    for n, p in sft.items():
        assert torch.equal(p, noop[n]), n


@pytest.mark.parametrize("method", ["arr", "kl", "replay"])
def test_presets_train_and_log(tiny_gpt2, memo_data, tmp_path, method):
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "o", max_steps=3, batch_size=4, learning_rate=1e-2)
    cfg = load_config(None, [f"method={method}", f"model.name_or_path={cfg.model.name_or_path}",
                             f"data.train={cfg.data.train}", f"output_dir={cfg.output_dir}", "train.max_steps=3",
                             "train.logging_steps=1", "train.progress_bar=false", "model.lora.target_modules=all-linear",
                             "regularizers=[]"] + (["regularizers=[{kl: {on: both}}]", "replay={max_length: 16}"]
                                                   if method == "arr" else []))
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    keys = set().union(*rows)
    expected = {"arr": {"kl", "kl_replay", "l_replay"}, "kl": {"kl"}, "replay": {"l_replay", "replay_fraction"}}[method]
    assert expected <= keys


def test_lfu_composes_with_kl_and_replay(tiny_gpt2, memo_data, tmp_path):
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "o", max_steps=3, batch_size=4, learning_rate=1e-2)
    cfg = with_method(cfg, [{"lfu": {}}, {"kl": {"coef": 0.1}}], replay={"max_length": 16, "ratio": 0.5})
    train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl") if '"l_cons"' in line]
    assert rows and all({"kl", "l_replay", "l_cons"} <= set(r) for r in rows)


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


def test_self_replay_blocks_are_generated_once_cached_and_seeded(tiny_llama, memo_data, tmp_path):
    """replay: {data: self}: the initial model writes full-length blocks from BOS (or from prompts) before
    training; they are cached with the run, reused with the same settings, and depend on the seed."""
    from accelerate import PartialState

    from forgetless.identity import digest
    from forgetless.model import load_tokenizer
    from forgetless.self_replay import CACHE_FILE, load_or_generate
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "o", max_steps=2, batch_size=4)
    cfg = with_method(cfg, replay={"data": "self", "self_blocks": 6, "max_length": 16, "ratio": 0.5})
    summary = train(cfg).summary
    assert summary["self_replay_blocks"] == 6 and summary["self_replay_generation_seconds"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert any(r.get("l_replay", 0) > 0 for r in rows)

    tok = load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    settings = {"blocks": 6, "length": 16, "temperature": 1.0, "top_p": 0.95, "prompts": None, "seed": 42,
                "inputs": digest(summary["inputs"])}  # keyed by the run's inputs, as the run keyed it
    state = PartialState()  # one process: it is the main one
    blocks, seconds = load_or_generate(model, tok, tmp_path / "o" / "checkpoints", settings, state)
    assert seconds == 0.0 and blocks.shape == (6, 16)  # the run's cache, reused
    assert (blocks[:, 0] == (tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)).all()
    fresh, seconds = load_or_generate(model, tok, tmp_path / "fresh", settings, state)
    assert seconds > 0 and torch.equal(fresh, blocks)  # the same seed writes the same text
    other, _ = load_or_generate(model, tok, tmp_path / "other", dict(settings, seed=7), state)
    assert not torch.equal(other, blocks)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe lazy dog\n")
    prompted, _ = load_or_generate(model, tok, tmp_path / "p", dict(settings, prompts=str(prompts)), state)
    first = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True)
    n = len(tok(first, add_special_tokens=False)["input_ids"])
    assert prompted[0, :n].tolist() == tok(first, add_special_tokens=False)["input_ids"]
    assert (tmp_path / "p" / CACHE_FILE).exists()


def test_chat_replay_rows_are_trained_like_sft_rows(tiny_llama, tmp_path):
    """A replay source of prompt/response rows (format auto): rows are rendered and masked like SFT rows
    (prompt not trained), padded, and their term is weight x the mean NLL over their trained tokens."""
    weight = 1.5
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": f"say {w} please", "response": f"{w} {w} {w}"}
                                                  for w in ["red", "green and blue", "a long yellow word", "x"]])
    trainer = make_trainer(tiny_llama, tmp_path, "full", [], per_device_train_batch_size=3,
                           replay={"data": str(chats), "ratio": 1.0, "max_length": 32, "weight": weight})
    replay = trainer.replay
    assert replay.examples is not None and replay.blocks is None and len(replay) == 4
    expected_rows, _ = tokenize_records(load_records(str(chats), DataConfig()), load_tokenizer(tiny_llama),
                                        DataConfig(max_length=32))
    assert [ex["labels"] for ex in replay.examples] == [ex["labels"] for ex in expected_rows]
    assert all(ex["labels"][0] == -100 for ex in replay.examples)  # the prompt is not trained

    drawn = replay.draw(0, 1, torch.device("cpu"))
    assert drawn.batch["input_ids"].shape[0] == 3
    trained = int((drawn.batch["labels"][:, 1:] != -100).sum())
    assert drawn.scale == pytest.approx(1 / trained)  # one micro-batch per step, one process
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    model = trainer.model
    loss = trainer.training_step(model, dict(batch))
    with torch.no_grad():
        def mean_nll(ids, mask, labels):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            keep = labels[:, 1:] != -100
            return F.cross_entropy(logits[keep], labels[:, 1:][keep]).item()

        expected = mean_nll(batch["input_ids"], batch["attention_mask"], batch["labels"]) + weight * mean_nll(
            drawn.batch["input_ids"], drawn.batch["attention_mask"], drawn.batch["labels"])
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_replay_scale_is_the_mean_over_every_process_rows_of_the_step(tiny_llama, tmp_path):
    """Across 2 processes and 2 accumulation steps, rows of unequal length: the scale is the same on every
    process and micro-batch of a step, and sum(tokens * scale) over all of them is the world size (DDP's
    average then gives the mean over the step's replay tokens)."""
    from types import SimpleNamespace

    chats = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "q " * (i + 1), "response": "a " * (2 * i + 1)}
                                                  for i in range(7)])
    tok = load_tokenizer(tiny_llama)
    sources = []
    for rank in range(2):
        source = ReplaySource(ReplayConfig(data=str(chats), ratio=0.75, max_length=64))
        run = SimpleNamespace(seed=5, accelerator=SimpleNamespace(num_processes=2, process_index=rank),
                              grad_accum=2, batch_size=2, tokenizer=tok)
        source.setup(run)
        sources.append(source)
    assert len(set(sources[0].trained)) > 3  # rows of unequal length
    for step in range(6):
        scales, weighted, seen = set(), 0.0, []
        for micro in (2 * step, 2 * step + 1):
            for source in sources:
                rows = source.draw(micro, 2, torch.device("cpu"))
                if rows is not None:
                    scales.add(rows.scale)
                    weighted += rows.tokens * rows.scale
                    seen.append(rows.batch["input_ids"][:, :4])
        assert len(scales) == 1 and weighted == pytest.approx(2.0), step
    # the processes draw disjoint rows: in one cycle through the source, each row once
    first = [i for rank in range(2) for i in sources[rank].row_indices(0, 3, rank)]
    assert sorted(first[:6]) == sorted(set(first[:6]))


def test_replay_source_errors_name_the_file_line_and_option(tiny_llama, tmp_path):
    bad = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "hi", "response": "there"}, {"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=r"chat.jsonl:2"):
        make_trainer(tiny_llama, tmp_path, "lora", [], replay={"data": str(bad)})
    text = write_jsonl(tmp_path / "text.jsonl", [{"body": "no text field here"}])
    with pytest.raises(DataError, match=r"text.jsonl:1: missing field 'text'"):
        make_trainer(tiny_llama, tmp_path, "lora", [], replay={"data": str(text), "format": "text"})
    with pytest.raises(ConfigError, match=r"replay.ratio: must be >= 0"):
        load_config(None, ["replay={ratio: -1}"])

"""Approximate replay: its sources (corpus, chat rows, self-replay), draws, ratios and weights, and replay with KL in a step."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from forgetless.config import DataConfig, ReplayConfig, load_config
from forgetless.data import load_records, load_texts, pack_blocks, tokenize_records
from forgetless.errors import ConfigError, DataError
from forgetless.model import load_tokenizer
from forgetless.replay import ReplaySource, self_replay_settings
from forgetless.train import load_trained, train

from conftest import make_batch, make_trainer, memorisation_rows, tiny_config, with_method, write_jsonl


# ------------------------------------------------------------------ sources

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


def test_chat_replay_rows_are_trained_like_sft_rows(tiny_llama, tmp_path):
    """A replay source of prompt/response rows (format auto): rows are rendered and masked like SFT rows
    (prompt not trained), padded, and their term is weight x their NLL summed over their trained tokens and
    divided by the SFT tokens of the step (rows mixed into the batch)."""
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
        def nll_sum(ids, mask, labels):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            keep = labels[:, 1:] != -100
            return F.cross_entropy(logits[keep], labels[:, 1:][keep], reduction="sum").item()

        sft_tokens = int((batch["labels"][:, 1:] != -100).sum())
        expected = (nll_sum(batch["input_ids"], batch["attention_mask"], batch["labels"]) + weight * nll_sum(
            drawn.batch["input_ids"], drawn.batch["attention_mask"], drawn.batch["labels"])) / sft_tokens
    assert loss.item() == pytest.approx(expected, rel=1e-9)



def eos_prone(model_dir, bias: float = 4.0):
    """The tiny model with an untied LM head whose bias favours end-of-sequence (in memory only): its sampled
    answers end after a few tokens, as a real instruct model's do."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[load_tokenizer(model_dir).eos_token_id] = bias
    model.lm_head = head
    return model


def test_self_replay_pairs_are_written_in_context_answered_and_cached(tiny_llama, tmp_path, monkeypatch):
    """SSR's rows: instructions the model writes after `shots` real training prompts (new ones: no copy of a
    prompt, no repeat), answered by the initial model with end-of-sequence allowed (answers that do not end
    are dropped), cached with their settings and reused; the same seed writes the same pairs."""
    from accelerate import PartialState

    from forgetless.self_replay import CACHE_FILE, load_or_generate_pairs, sample_completions, write_instructions

    tok, model = load_tokenizer(tiny_llama), eos_prone(tiny_llama)
    torch.manual_seed(0)
    completions = sample_completions(model, tok, ["<|user|>hello<eos><|assistant|>"] * 8, 40, 1.0, 1.0)
    assert sum(ended for _, ended in completions) >= 4 and len({text for text, _ in completions}) > 1

    demos = [f"Calculate {i} + {i}." for i in range(10)]
    import random
    random.seed(0)
    written = write_instructions(model, tok, demos, 5, 3, 1.0, 1.0)
    assert 0 < len(written) <= 5 and len(set(written)) == len(written) and not set(written) & set(demos)
    assert all("\n\n" not in w and w == w.strip() for w in written)

    settings = {"mode": "pairs", "blocks": 6, "length": 48, "temperature": 1.0, "top_p": 1.0, "prompts": None,
                "seed": 3, "inputs": "x", "shots": 3, "system": None}
    state = PartialState()

    def render(instruction):
        return tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                       add_generation_prompt=True)

    instructions, answers, seconds = load_or_generate_pairs(model, tok, tmp_path / "a", settings, state, demos, render)
    assert seconds > 0 and 0 < len(answers) == len(instructions) <= 6 and all(a.strip() for a in answers)
    assert all(len(tok(render(i) + a, add_special_tokens=False)["input_ids"]) < 48 for i, a in zip(instructions, answers))
    again = load_or_generate_pairs(model, tok, tmp_path / "a", settings, state, demos, render)
    assert again == (instructions, answers, 0.0)  # reused from the cache
    assert (tmp_path / "a" / CACHE_FILE).exists()
    fresh = load_or_generate_pairs(model, tok, tmp_path / "b", settings, state, demos, render)
    assert fresh[:2] == (instructions, answers)  # seeded
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("say hello\nname a colour\n")
    given, _, _ = load_or_generate_pairs(model, tok, tmp_path / "c", dict(settings, prompts=str(prompts)), state, demos,
                                         render)
    assert set(given) <= {"say hello", "name a colour"}
    # rows per generate call (replay.self_batch_size, "batch" in the settings): writing the instructions and
    # answering them alike
    import forgetless.self_replay as self_replay

    batches = []
    complete = self_replay.complete
    monkeypatch.setattr(self_replay, "complete", lambda *a, **k: batches.append(a[4]) or complete(*a, **k))
    load_or_generate_pairs(model, tok, tmp_path / "d", dict(settings, batch=2), state, demos, render)
    assert len(batches) >= 2 and set(batches) == {2}


def test_self_replay_pairs_train_as_chat_rows_on_the_answers(tiny_llama, tmp_path, monkeypatch):
    """In a run, the pairs become SFT-like rows (prompt masked, the answer and its end of turn trained); the
    in-context demonstrations are the run's training prompts less what budget holds out."""
    import forgetless.self_replay as self_replay

    seen = {}

    def fake_instructions(model, tokenizer, demos, count, shots, temperature, top_p, batch_size=16):
        seen["demos"] = list(demos)
        return [f"new question {i}" for i in range(count)]

    def fake_completions(model, tokenizer, texts, max_new_tokens, temperature, top_p, batch_size=16):
        return [(f"answer {i}", i % 3 != 2) for i in range(len(texts))]  # every third one is cut: dropped

    monkeypatch.setattr(self_replay, "write_instructions", fake_instructions)
    monkeypatch.setattr(self_replay, "sample_completions", fake_completions)
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(12))
    cfg = tiny_config(tiny_llama, data, tmp_path / "o", max_steps=2, batch_size=4)
    cfg = with_method(cfg, replay={"data": "self", "self_blocks": 6, "max_length": 48, "ratio": 0.5})
    summary = train(cfg, holdout=2).summary
    assert summary["self_replay_rows"] == 4  # 6 answered, 2 cut
    prompts = [row["prompt"] for row in map(json.loads, open(data))]
    assert seen["demos"] == prompts[:-2]  # the held-out examples are never shown to the model
    trainer = make_trainer(tiny_llama, tmp_path, "lora", [], replay={"data": "self", "self_blocks": 3, "max_length": 48})
    examples = trainer.replay.examples
    tok = load_tokenizer(tiny_llama)
    for k, example in enumerate(examples):
        trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
        assert tok.decode(trained) == f"answer {k}<eos>"  # the answer and its end of turn, nothing of the prompt
    # data.system_prompt: in what the model answers and in the rows trained, as in every SFT row
    from dataclasses import replace
    from types import SimpleNamespace

    source = ReplaySource(ReplayConfig(data="self", self_blocks=3, max_length=64),
                          replace(DataConfig(train=str(data)), system_prompt="Be brief."))
    run = SimpleNamespace(seed=1, accelerator=trainer.accelerator, grad_accum=1, batch_size=4, tokenizer=tok,
                          model=trainer.model, output_dir=tmp_path / "sys", inputs_key="k", train_dataset=None)
    source.setup(run)
    assert source.examples and all(tok.decode(ex["input_ids"]).startswith("<|system|>Be brief.<eos><|user|>new question")
                                   for ex in source.examples)

def test_replay_source_errors_name_the_file_line_and_option(tiny_llama, tmp_path):
    bad = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "hi", "response": "there"}, {"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=r"chat.jsonl:2"):
        make_trainer(tiny_llama, tmp_path, "lora", [], replay={"data": str(bad)})
    text = write_jsonl(tmp_path / "text.jsonl", [{"body": "no text field here"}])
    with pytest.raises(DataError, match=r"text.jsonl:1: missing field 'text'"):
        make_trainer(tiny_llama, tmp_path, "lora", [], replay={"data": str(text), "format": "text"})
    with pytest.raises(ConfigError, match=r"replay.ratio: must be >= 0"):
        load_config(None, ["replay={ratio: -1}"])


def test_self_replay_blocks_are_generated_once_cached_and_seeded(tiny_llama, memo_data, tmp_path):
    """replay: {data: self}: the initial model writes full-length blocks from BOS (or from prompts) before
    training; they are cached with the run, reused with the same settings, and depend on the seed."""
    from accelerate import PartialState

    from forgetless.identity import digest
    from forgetless.model import load_tokenizer
    from forgetless.self_replay import CACHE_FILE, load_or_generate
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "o", max_steps=2, batch_size=4)
    cfg = with_method(cfg, replay={"data": "self", "self_mode": "text", "self_blocks": 6, "max_length": 16,
                                   "ratio": 0.5, "self_top_p": 0.95})
    summary = train(cfg).summary
    assert summary["self_replay_rows"] == 6 and summary["self_replay_generation_seconds"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert any(r.get("l_replay", 0) > 0 for r in rows)

    tok = load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    settings = {"mode": "text", "blocks": 6, "length": 16, "temperature": 1.0, "top_p": 0.95, "prompts": None,
                "seed": 42, "inputs": digest(summary["inputs"])}  # keyed by the run's inputs, as the run keyed it
    state = PartialState()  # one process: it is the main one
    blocks, seconds = load_or_generate(model, tok, tmp_path / "o" / "checkpoints", settings, state)
    assert seconds == 0.0 and blocks.shape == (6, 16)  # the run's cache, reused
    assert (blocks[:, 0] == (tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)).all()
    fresh, seconds = load_or_generate(model, tok, tmp_path / "fresh", settings, state)
    assert seconds > 0 and torch.equal(fresh, blocks)  # the same seed writes the same text
    other, _ = load_or_generate(model, tok, tmp_path / "other", dict(settings, seed=7), state)
    assert not torch.equal(other, blocks)
    # rows per generate call: the default's key is as before the option (the run's cache above was found with it);
    # another value is another cache entry, written afresh, and other text
    assert self_replay_settings(ReplayConfig(data="self", self_blocks=6, max_length=16, self_top_p=0.95, self_mode="text"),
                                42, settings["inputs"]) == settings
    in_fours = self_replay_settings(ReplayConfig(data="self", self_blocks=6, max_length=16, self_top_p=0.95,
                                                 self_mode="text", self_batch_size=4), 42, settings["inputs"])
    assert in_fours == dict(settings, batch=4)
    batched, seconds = load_or_generate(model, tok, tmp_path / "o" / "checkpoints", in_fours, state)
    assert seconds > 0 and batched.shape == blocks.shape and not torch.equal(batched, blocks)
    assert torch.equal(load_or_generate(model, tok, tmp_path / "o" / "checkpoints", in_fours, state)[0], batched)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe lazy dog\n")
    prompted, _ = load_or_generate(model, tok, tmp_path / "p", dict(settings, prompts=str(prompts)), state)
    first = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True)
    n = len(tok(first, add_special_tokens=False)["input_ids"])
    assert prompted[0, :n].tolist() == tok(first, add_special_tokens=False)["input_ids"]
    assert (tmp_path / "p" / CACHE_FILE).exists()


# ------------------------------------------------------------------ draws, ratios and weights

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


def test_replay_weighting_is_exact_in_every_step_and_resumable(tiny_gpt2, tmp_path, monkeypatch):
    """10 examples, batch 4, accumulation 2: every epoch ends with a one-micro-batch step of 2 rows.
    In every optimizer step the replay blocks' weights sum to one mean (was 0.5x in ~10% of steps after
    an uneven epoch end), and the blocks of a step do not depend on the steps before it (resume)."""
    from forgetless.data import load_texts, pack_blocks
    from forgetless.model import load_tokenizer
    from forgetless.replay import ReplayConfig, ReplaySource
    from forgetless.train import train

    from conftest import tiny_config, with_method, write_jsonl

    seen = []  # (optimizer step, the micro-batch's blocks, their scale)
    draw = ReplaySource.draw

    def record(self, micro, in_step, device):
        rows = draw(self, micro, in_step, device)
        if rows is not None:
            seen.append((micro // self.accum, rows.batch["input_ids"].clone(), rows.scale))
        return rows

    monkeypatch.setattr(ReplaySource, "draw", record)
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(10))
    corpus = tmp_path / "c.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog " * 8 + "\n\n") * 30)
    options = dict(data=str(corpus), ratio=0.3, max_length=16)
    cfg = tiny_config(tiny_gpt2, data, tmp_path / "o", max_steps=6, batch_size=4, grad_accum=2)
    cfg = with_method(cfg, replay=options)
    train(cfg)
    steps = sorted({step for step, _, _ in seen})
    assert steps == list(range(6))
    for step in steps:
        parts = [(blocks.shape[0], scale) for s, blocks, scale in seen if s == step]
        assert len({scale for _, scale in parts}) == 1, step
        assert sum(count for count, _ in parts) * parts[0][1] * (16 - 1) == pytest.approx(1.0), (step, parts)

    # a fresh source, as after a resume at step 4, draws what the run drew there
    replay = ReplaySource(ReplayConfig(**options))
    replay.blocks = pack_blocks(load_texts(str(corpus)), load_tokenizer(tiny_gpt2), 16)
    replay.trained = [15] * replay.blocks.shape[0]
    replay.seed, replay.world, replay.rank, replay.accum, replay.batch_size = cfg.train.seed, 1, 0, 2, 4
    in_run = [blocks for step, blocks, _ in seen if step == 4]
    fresh = [rows.batch["input_ids"] for micro in (8, 9) if (rows := draw(replay, micro, 2, "cpu")) is not None]
    assert len(fresh) == len(in_run) > 0
    for blocks, again in zip(in_run, fresh):
        assert torch.equal(again, blocks)


# ------------------------------------------------------------------ in a training step, with KL

def nll_and_kl(model, initial, ids, mask, labels):
    """By hand: the mean NLL of the trained tokens and the mean KL(p_initial || p_model) at their positions."""
    cur = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        ref = initial(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = labels[:, 1:] != -100
    logp, logr = torch.log_softmax(cur[keep], -1), torch.log_softmax(ref[keep], -1)
    nll = -logp.gather(-1, labels[:, 1:][keep].unsqueeze(-1)).mean()
    return nll, (logr.exp() * (logr - logp)).sum(-1).mean()


@pytest.mark.parametrize("forward,length", [("own", 8), ("with_sft", 8), ("with_sft", 40)])
def test_replay_pass_and_its_kl_give_the_gradient_of_the_whole_loss(tiny_llama, tmp_path, monkeypatch, forward,
                                                                    length):
    # The replay blocks either join the SFT forward (padded to one length: the blocks when shorter than
    # the SFT rows, the SFT rows when the blocks are longer) or run their own forward + backward before
    # it; the accumulated gradient must be that of the one loss the spec defines, computed here by autograd:
    #   mean SFT NLL + coef * mean KL (SFT tokens) + weight * (R / S) * mean replay NLL + coef * mean KL (replay
    #   tokens), R / S the replay tokens per SFT token of the step (replay weighs as rows mixed into the batch)

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

    sft_nll, sft_kl = nll_and_kl(model, initial, batch["input_ids"], batch["attention_mask"], batch["labels"])
    rep_nll, rep_kl = nll_and_kl(model, initial, blocks, torch.ones_like(blocks), blocks)
    share = blocks[:, 1:].numel() / int((batch["labels"][:, 1:] != -100).sum())
    assert share != 1
    expected_loss = sft_nll + coef * sft_kl + weight * share * rep_nll + coef * rep_kl
    expected_loss.backward()
    assert sft_kl.item() > 1e-6 and rep_kl.item() > 1e-6
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-9)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-7, atol=1e-12, msg=n)



@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_replay_term_follows_ratio_under_accumulation(tiny_llama, tmp_path, monkeypatch, ratio):
    """Two micro-batches of one optimizer step (accumulation 2), replay in its own pass: the accumulated
    gradient is that of (sum of SFT NLL + weight * sum of replay NLL) / (SFT tokens of the whole step), by
    autograd in float64 — replay weighs as rows mixed into the batch, so doubling `ratio` doubles the replay
    tokens and the term's share; `replay_token_ratio` logs R / S."""
    weight = 0.5
    drawn = []  # the blocks each micro-batch drew
    draw = ReplaySource.draw
    monkeypatch.setattr(ReplaySource, "draw", lambda self, *a: (rows := draw(self, *a)) and drawn.append(rows) or rows)
    trainer = make_trainer(tiny_llama, tmp_path, "full", [], per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           replay={"ratio": ratio, "max_length": 8, "weight": weight, "forward": "own"})
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(4))
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    sft_tokens = int((batch["labels"][:, 1:] != -100).sum())
    model = trainer.model
    for half in halves:
        trainer.training_step(model, dict(half), num_items_in_batch=sft_tokens)
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    blocks = torch.cat([rows.batch["input_ids"] for rows in drawn])
    assert blocks.shape[0] == int(ratio * 4)

    def nll_sum(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        keep = labels[:, 1:] != -100
        return F.cross_entropy(logits[keep], labels[:, 1:][keep], reduction="sum")

    expected = (nll_sum(batch["input_ids"], batch["attention_mask"], batch["labels"])
                + weight * nll_sum(blocks, torch.ones_like(blocks), blocks)) / sft_tokens
    expected.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-7, atol=1e-12, msg=n)
    logged = trainer.pending_metrics()["replay_token_ratio"]
    assert sum(logged) / len(logged) == pytest.approx(blocks[:, 1:].numel() / sft_tokens)


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


@pytest.mark.parametrize("preset", ["replay-kl", "kl+replay-kl"])
def test_distillation_replay_presets_train_the_kl_on_replay_rows_and_no_nll(tiny_llama, tmp_path, monkeypatch, preset):
    """replay-kl: the replay rows are inputs only: the term is coef * mean KL(p_init || p_theta) over their
    tokens, with no NLL on them (weight 0); kl+replay-kl adds the KL anchor on the SFT rows. Checked by
    autograd on the loss written out by hand."""
    from forgetless.registry import PRESETS

    spec = PRESETS[preset]
    kl_entries = [entry["kl"] for entry in spec["regularizers"]]
    sft_coef = sum(e.get("coef", 0.01) for e in kl_entries if e.get("on", "sft") in ("sft", "both"))
    rep_coef = sum(e["coef"] for e in kl_entries if e.get("on") in ("replay", "both"))
    assert spec["replay"]["weight"] == 0.0 and rep_coef == 1.0
    drawn = []
    original = ReplaySource.row_indices
    monkeypatch.setattr(ReplaySource, "row_indices",
                        lambda self, first, count, rank=None: drawn.append(original(self, first, count, rank)) or drawn[-1])
    trainer = make_trainer(tiny_llama, tmp_path, "full", spec["regularizers"], per_device_train_batch_size=3,
                           replay=dict(spec["replay"], ratio=1.0, max_length=8))
    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    model = trainer.model
    trainer.training_step(model, dict(batch))  # a first update, so the model differs from the reference
    trainer.optimizer.step()
    model.zero_grad()
    loss = trainer.training_step(model, dict(batch))
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert "kl_replay" in trainer.pending_metrics()

    blocks = trainer.replay.blocks[drawn[-1]]
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    model.eval()

    sft_nll, sft_kl = nll_and_kl(model, initial, batch["input_ids"], batch["attention_mask"], batch["labels"])
    _, rep_kl = nll_and_kl(model, initial, blocks, torch.ones_like(blocks), blocks)
    expected = sft_nll + sft_coef * sft_kl + rep_coef * rep_kl
    expected.backward()
    assert rep_kl.item() > 1e-6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-7, atol=1e-12, msg=n)

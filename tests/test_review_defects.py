"""The defects a code review found (issue #15), each with a test that failed before its fix."""

import weakref

import pytest
import torch
from transformers import TrainingArguments

from forgetless.model import apply_finetune
from forgetless.config import ModelConfig
from forgetless.registry import build, parse_entries
from forgetless.trainer import ForgetlessTrainer

from test_lfu import make_batch

from conftest import memorisation_rows


def step_trainer(model, tmp_path, regularizers, **args):
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, **args)
    return ForgetlessTrainer(model=model, args=args, regularizers=[build(o) for o in parse_entries(regularizers)])


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


def test_a_nonfinite_lfu_term_is_skipped_and_the_clean_gradient_kept(tiny_llama, tmp_path):
    """An infinite ascent step makes l_cons NaN: it must not reach .grad (which then equals plain SFT's)."""
    from transformers import AutoModelForCausalLM

    batch = make_batch(tiny_llama, tmp_path, memorisation_rows(3))
    grads = {}
    for name, regs in [("sft", []), ("lfu", [{"lfu": {}}])]:
        torch.manual_seed(0)
        model = apply_finetune(AutoModelForCausalLM.from_pretrained(tiny_llama), ModelConfig())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = step_trainer(model, tmp_path, regs)
        for reg in trainer.regularizers:  # a config refuses alpha = inf; set on the built regularizer
            reg.cfg.alpha = float("inf")
        loss = trainer.training_step(model, dict(batch))
        assert torch.isfinite(loss)
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        for n, p in model.named_parameters():  # the perturbation was undone
            assert torch.equal(p, before[n]), n
    assert trainer.pending_metrics()["lfu_nonfinite_skipped"] == [1.0]
    for n, g in grads["sft"].items():
        torch.testing.assert_close(grads["lfu"][n], g, rtol=0, atol=0)


NAN_ON_ONE_RANK = '''
import sys
from dataclasses import dataclass

import torch

from forgetless.cli import main
from forgetless.registry import register
from forgetless.regularizers import Regularizer


@dataclass
class NanOnceConfig:
    rank: int = 1
    call: int = 2


class NanOnce(Regularizer):
    """A term that is NaN on one process, once: only that process sees a non-finite loss."""
    name = "nan_once"

    def __init__(self, cfg):
        self.cfg, self.calls = cfg, 0

    def setup(self, trainer):
        self.rank = trainer.accelerator.process_index

    def loss(self, ctx):
        self.calls += 1
        bad = self.rank == self.cfg.rank and self.calls == self.cfg.call
        return ctx.sft_loss * (float("nan") if bad else 0.0), {}


register("nan_once", NanOnceConfig, NanOnce)
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_a_nonfinite_micro_batch_on_one_process_is_skipped_by_all(tiny_llama, tmp_path):
    """DDP, 2 processes: one process's NaN micro-batch is skipped by both (else their all-reduces go out
    of step: a hang, or gradients of different micro-batches averaged)."""
    import json
    import subprocess
    import sys

    from test_distributed import ACCELERATE_CPU
    from conftest import write_jsonl

    script = tmp_path / "run.py"
    script.write_text(NAN_ON_ONE_RANK)
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(8))
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU),
                          str(script), "train", "default", f"model.name_or_path={tiny_llama}", f"data.train={data}",
                          f"output_dir={tmp_path / 'o'}", "data.max_length=64", "train.max_steps=4",
                          "train.batch_size=2", "train.grad_accum=1", "train.logging_steps=1", "train.progress_bar=false",
                          "regularizers=[{nan_once: {}}]"], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert sum(r.get("nonfinite_skipped", 0) > 0 for r in rows) == 1
    assert (tmp_path / "o" / "train_summary.json").exists()


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

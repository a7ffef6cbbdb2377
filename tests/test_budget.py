"""Forgetting budget: the search meets the stated bound on held-out text and keeps what gain it can."""

import json
import random

import pytest
import torch

from forgetless.cli import main
from forgetless.errors import TrainingError

from conftest import CORPUS, build_tokenizer, build_model, write_jsonl


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Llama that has learnt some 'general text' (so fine-tuning can make it forget), with the
    text split into the evaluation's test blocks and the rest."""
    root = tmp_path_factory.mktemp("budget")
    rng = random.Random(0)
    sentences = [s for s in CORPUS if "<|" not in s and "###" not in s]
    text = " ".join(rng.choice(sentences) for _ in range(700))
    (root / "general.txt").write_text(text)
    tokenizer = build_tokenizer(chat=True)
    model = build_model("llama", len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    blocks = ids[: len(ids) // 32 * 32].view(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        batch = blocks[torch.randint(0, len(blocks), (8,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"prompt": f"Calculate {i} + {j}.", "response": f"{i + j} is the answer {i}{j}"}
            for i in range(8) for j in range(8)]
    write_jsonl(root / "task.jsonl", rows)
    (root / "run.yaml").write_text("method: sft\n")
    return root


def budget_args(root, out, *extra):
    return ["train", str(root / "run.yaml"), f"model.name_or_path={root / 'model'}", f"data.train={root / 'task.jsonl'}", f"output_dir={out}",
            "data.max_length=64", "train.progress_bar=false", "train.warmup_ratio=0", "train.lr_scheduler=constant",
            "model.lora.target_modules=all-linear", "train.max_steps=12", "train.batch_size=8",
            "train.learning_rate=3e-3", "evaluation.task=null", "evaluation.mc=null",
            f"evaluation.general_text={root / 'general.txt'}", "evaluation.general_blocks=24",
            "evaluation.block_length=32", "budget.validation_examples=16", *extra]


def test_wise_ft_budget_meets_the_bound_on_held_out_text(pretrained, tmp_path, capsys):
    bound = 0.05
    assert main(budget_args(pretrained, tmp_path / "b", f"budget.max_general_drop={bound}")) == 0
    report = json.loads((tmp_path / "b" / "budget.json").read_text())
    full = [t for t in report["trials"] if t["alpha"] == 1.0][0]
    assert full["general_drop"] > 2 * bound  # plain fine-tuning breaks the budget ...
    chosen = report["chosen"]
    assert 0 < chosen["alpha"] < 1 and chosen["passes"]
    assert chosen["general_drop"] <= (1 - report["margin"]) * bound
    assert report["held_out"]["general_drop"] <= bound and report["held_out"]["within_bound"]  # ... on unseen blocks too
    assert chosen["target_nll"] < report["base"]["target_nll"]  # and some target gain is kept
    assert 0 < report["target_gain_kept"] < 1
    # the validation search never saw the test blocks, nor trained on the validation examples
    assert report["validation_blocks"] >= 4 and report["held_out"]["blocks"] == 24
    assert sum(1 for _ in open(tmp_path / "b" / "budget" / "train.jsonl")) == 64 - 16
    # the output folder is a normal run: loads, and is the chosen mix
    from forgetless.train import load_trained

    model, _ = load_trained(tmp_path / "b")
    summary = json.loads((tmp_path / "b" / "train_summary.json").read_text())
    assert summary["budget"]["chosen"]["alpha"] == chosen["alpha"]
    assert "held-out general text" in capsys.readouterr().out


def test_retraining_knob_stops_at_the_first_passing_strength(pretrained, tmp_path):
    out = tmp_path / "kl"
    assert main(budget_args(pretrained, out, "budget.max_general_drop=0.05", "budget.knob=l2sp",
                            "budget.grid=[0.0, 1000.0, 2000.0]")) == 0
    report = json.loads((out / "budget.json").read_text())
    values = [t["coef"] for t in report["trials"]]
    assert values == [0.0, 1000.0]  # 0 (plain SFT) fails, the strong pull passes, the third is never trained
    assert not report["trials"][0]["passes"] and report["chosen"]["coef"] == 1000.0
    assert (out / "adapter_model.safetensors").exists()
    assert not (out / "budget" / "l2sp-2000").exists()


def test_unreachable_budget_fails_clearly(pretrained, tmp_path):
    with pytest.raises(TrainingError, match="no l2sp.coef"):
        from forgetless.budget import train_with_budget
        from forgetless.config import load_config

        cfg = load_config(None, budget_args(pretrained, tmp_path / "x", "budget.max_general_drop=0.0001",
                                            "budget.knob=l2sp", "budget.grid=[0.0]")[2:])
        train_with_budget(cfg)
    assert json.loads((tmp_path / "x" / "budget.json").read_text())["trials"]
    assert not (tmp_path / "x" / "train_summary.json").exists()  # no finished run claimed


def test_wise_ft_budget_with_full_finetuning_saves_the_exact_mix(pretrained, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert main(budget_args(pretrained, out, "budget.max_general_drop=0.05", "model.finetune=full",
                            "train.learning_rate=1e-3", "budget.refine=1")) == 0
    alpha = json.loads((out / "budget.json").read_text())["chosen"]["alpha"]
    base = dict(AutoModelForCausalLM.from_pretrained(pretrained / "model").named_parameters())
    tuned = dict(AutoModelForCausalLM.from_pretrained(out / "budget" / "tuned").named_parameters())
    saved = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    for name, w0 in base.items():
        torch.testing.assert_close(saved[name], w0 + alpha * (tuned[name] - w0), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(saved[n], base[n]) for n in base) or alpha == 0

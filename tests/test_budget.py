"""Forgetting budget: the search meets the stated bound on held-out text and keeps what gain it can."""

import json
from pathlib import Path

import pytest
import torch

from forgetless.cli import main
from forgetless.errors import TrainingError

from conftest import budget_args, write_jsonl


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
    trial = json.loads((tmp_path / "b" / "budget" / "tuned" / "train_summary.json").read_text())
    assert trial["train_examples"] == 64 - 16 and trial["inputs"]["holdout"] == 16  # in memory: no split written
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


def test_trials_train_in_memory_on_the_mixture_with_its_formats_and_tags(pretrained, tmp_path, monkeypatch):
    """The split stays in memory: each trial trains on data.train's mixture less the validation examples, in
    the mixture's order, every row tagged with its source and read in its own format; no split is written as
    JSONL, the trial's config names the real sources, and its inputs record the count held out (so a trial
    with another split is never reused). Data in other formats (data.eval, the forgetting curve's task) reads
    as the user's config says (budget used to force data.format: messages on the trials)."""
    import yaml

    from forgetless import data as data_mod
    from forgetless.budget import train_with_budget
    from forgetless.config import load_config
    from forgetless.data import training_records

    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Add {i} and {j}.", "output": f"{i + j}"}
                                             for i in range(3) for j in range(4)])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"Calculate {i} + 9.", "response": f"{i + 9}"} for i in range(4)])
    sources = [{"path": str(pretrained / "task.jsonl")}, {"path": str(tmp_path / "alpaca.jsonl"), "weight": 2.0}]
    out = tmp_path / "mix"
    args = budget_args(pretrained, out, "budget.max_general_drop=10", "budget.grid=[1.0]", "budget.refine=0",
                       "train.max_steps=2", f"data.train={json.dumps(sources)}", f"data.eval={tmp_path / 'test.jsonl'}",
                       f"evaluation.task={tmp_path / 'test.jsonl'}", "evaluation.every_steps=1",
                       "evaluation.curve_examples=2", "evaluation.curve_blocks=2")
    cfg = load_config(None, args[2:])
    built = []
    real = data_mod.build_training_dataset

    def recorded(*a, **k):
        built.append(real(*a, **k))
        return built[-1]

    monkeypatch.setattr(data_mod, "build_training_dataset", recorded)
    train_with_budget(cfg)

    mixture = training_records(cfg.data, cfg.train.seed)  # 64 prompt/response rows, then the alpaca rows twice
    assert len(mixture) == 64 + 24 and len(built) == 1
    assert built[0]["source"] == [tag for _, tag in mixture[:-16]] and set(built[0]["source"]) == {0, 1}
    assert built[0]["example_id"] == list(range(64 + 24 - 16))
    assert {p.name for p in (out / "budget").rglob("*.jsonl")} == {"metrics.jsonl"}  # the trial's log, no split
    trial = out / "budget" / "tuned"
    saved = yaml.safe_load((trial / "config.yaml").read_text())
    assert saved["data"] == yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["data"]  # the real sources and format
    summary = json.loads((trial / "train_summary.json").read_text())
    assert summary["train_examples"] == 64 + 24 - 16 and summary["inputs"]["holdout"] == 16
    assert "eval_loss" in summary  # data.eval in its own format
    curve = [json.loads(line) for line in open(out / "metrics.jsonl") if "curve_target_nll" in line]
    assert curve  # the curve's task in its own format; the chosen run carries the trial's metrics


def test_the_chosen_run_is_written_only_by_the_run_folder_writer(pretrained, tmp_path, monkeypatch):
    """budget writes the chosen model's folder through run_folder.write_run, train's own writer, and nothing
    else: with that writer held back for the output folder, the folder holds its marker and the trials only."""
    from forgetless import budget, run_folder
    from forgetless import train as train_mod
    from forgetless.budget import train_with_budget
    from forgetless.config import load_config

    out = tmp_path / "only"
    real, calls = run_folder.write_run, []

    def held_back(output_dir, *args, **kwargs):
        calls.append(Path(output_dir))
        if Path(output_dir) != out:
            real(output_dir, *args, **kwargs)

    monkeypatch.setattr(budget, "write_run", held_back)
    monkeypatch.setattr(train_mod, "write_run", held_back)
    cfg = load_config(None, budget_args(pretrained, out, "budget.max_general_drop=10", "budget.knob=l2sp",
                                        "budget.grid=[0.0]", "train.max_steps=2")[2:])
    report = train_with_budget(cfg)
    assert report["chosen"]["coef"] == 0.0
    assert calls == [out / "budget" / "l2sp-0", out]  # one write of each finished folder
    assert sorted(p.name for p in out.iterdir()) == sorted([run_folder.MARKER, "budget"])


def test_budget_never_validates_on_the_reported_text_or_the_replay_corpus():
    from forgetless.budget import check_validation_text
    from forgetless.config import load_config
    from forgetless.errors import DataError

    with pytest.raises(DataError, match=r"budget.general_text .*shares \d+ paragraphs with evaluation.general_text "
                                        r"\(fiction"):
        check_validation_text(load_config(None, ["budget.general_text=builtin:general/verne_2889.txt"]))
    with pytest.raises(DataError, match=r"shares \d+ paragraphs with the replay corpus builtin:replay/kjv.txt.gz"):
        check_validation_text(load_config(None, ["budget.general_text=builtin:replay/kjv.txt.gz", "method=kl+replay"]))
    check_validation_text(load_config(None, ["budget.general_text=builtin:replay/kjv.txt.gz"]))  # no replay: fine

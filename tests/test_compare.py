"""`compare` beyond presets: user-defined runs, several seeds, paired differences with intervals."""

import json
import math
from pathlib import Path

import pytest
import torch

from forgetless.compare import run_compare
from forgetless.config import load_config
from forgetless.errors import ConfigError
from forgetless.identity import file_digest, model_identity
from forgetless.stats import difference

from conftest import write_jsonl


def test_paired_difference_by_hand():
    same = difference([[1.0, 2.0, 3.0]], [[0.0, 1.0, 2.0]], "mean", "nats")
    assert same["mean"] == 1.0 and same["ci95"] == [1.0, 1.0] and same["excludes_zero"] and same["p"] == 0.0
    # items vary a lot between themselves, the run beats the reference on each by a little: unpaired
    # intervals of the two means would overlap, the paired one excludes zero
    g = torch.Generator().manual_seed(0)
    ref = (5 * torch.randn(200, generator=g)).tolist()
    run = [r - 0.1 + 0.01 * float(torch.randn(1, generator=g)) for r in ref]
    paired = difference([run], [ref], "mean", "nats")
    assert paired["excludes_zero"] and paired["ci95"][1] < 0 and paired["p"] < 1e-10
    assert paired["mean"] == pytest.approx(sum(a - b for a, b in zip(run, ref)) / 200)
    assert paired["covers"] == "items only" and paired["df"] == 199
    # a mean NLL difference is shown as the perplexity change it is
    pct = difference([[0.6, 0.6]], [[0.5, 0.5]], "mean", "percent")
    assert pct["mean"] == pytest.approx(100 * (math.exp(0.1) - 1))
    # two seeds, each paired with its own reference seed: per-seed differences 1 and 2. The interval covers
    # training randomness, so it is wider than the span of the two (a bootstrap over 2 seeds was not)
    two = difference([[1.0, 1.0], [3.0, 3.0]], [[0.0, 0.0], [1.0, 1.0]], "mean", "nats")
    assert two["mean"] == 1.5 and two["seeds"] == 2 and two["covers"] == "seeds and items"
    assert two["ci95"][0] < 1.0 and two["ci95"][1] > 2.0


def test_paired_robustness_std_by_hand():
    """Items are per question, correct under each of 2 templates: template accuracies 2/3 and 1/3 have
    std sqrt(2) / 6 (ddof 1); the reference answers alike under both (std 0)."""
    run = [[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]
    ref = [[[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]]
    d = difference(run, ref, "template_std", "points")
    assert d["mean"] == pytest.approx(100 * math.sqrt(2) / 6)
    assert d["ci95"][0] <= 0 <= d["mean"] <= d["ci95"][1]  # three questions: the interval is wide
    same = difference(ref, ref, "template_std", "points")
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0] and same["p"] == 1.0


def test_compare_runs_are_checked_before_anything_trains():
    with pytest.raises(ConfigError, match=r"compare.runs.kl-0.1: regularizers\[0\].kl.cof: unknown key"):
        load_config(None, ["compare.runs={kl-0.1: {regularizers: [{kl: {cof: 0.1}}]}}"])
    with pytest.raises(ConfigError, match=r"compare.runs.x: train.learnig_rate: unknown key \(did you mean"):
        load_config(None, ["compare.runs={x: {train: {learnig_rate: 0.1}}}"])
    with pytest.raises(ConfigError, match="compare.runs.sft: the name is taken"):
        load_config(None, ["compare.runs={sft: {method: lfu}}"])
    with pytest.raises(ConfigError, match="compare.runs.x: a run may change how it trains, not the comparison"):
        load_config(None, ["compare.runs={x: {evaluation: {task: null}}}"])
    with pytest.raises(ConfigError, match="compare.methods\\[0\\]: unknown method 'kl-0.1'.*or define it under compare.runs"):
        load_config(None, ["compare.methods=[kl-0.1]"])
    with pytest.raises(ConfigError, match=r"compare.paired_with\[1\]: 'lfu-fast' is not a compared run"):
        load_config(None, ["compare.methods=[sft, lfu]", "compare.paired_with=[sft, lfu-fast]"])


def tiny_compare(model_dir, suite, tmp_path, *overrides: str):
    """`compare` of the tiny model on a small arithmetic file, with the small evaluation suite."""
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Calculate {i} + 2.", "response": str(i + 2)}
                                                        for i in range(8)])
    config = load_config(None, [
        f"model.name_or_path={model_dir}", f"data.train={train_file}", f"output_dir={tmp_path / 'cmp'}",
        "data.max_length=64", "train.batch_size=4", "train.progress_bar=false", "train.warmup_ratio=0", *overrides])
    config.evaluation = suite
    return config


def test_compare_runs_and_seeds_end_to_end(tiny_llama, suite, tmp_path):
    from forgetless.regularizers.lfu import LfUConfig

    config = tiny_compare(tiny_llama, suite, tmp_path, "train.max_steps=3", "train.learning_rate=1e-2",
                          "compare.methods=[sft]", "compare.seeds=[1, 2]", "compare.paired_with=[sft, lfu-lr]",
                          "compare.runs={kl-strong: {regularizers: [{kl: {coef: 10.0}}]}, "
                          "lfu-lr: {method: lfu, train: {learning_rate: 0.02}}}")
    report = run_compare(config)
    root = tmp_path / "cmp"
    assert report["methods"] == ["sft", "kl-strong", "lfu-lr"]
    for name in report["methods"]:
        for seed in (1, 2):
            assert (root / name / f"seed-{seed}" / "train_summary.json").exists()
        drift = report["results"][name]["general_drift_kl"]
        assert drift["seeds"] == 2 and drift["seed_std"] > 0
        assert report["paired"][name]["general_drift_kl"]["vs_base"]["seeds"] == 2
    lr = load_config(root / "lfu-lr" / "seed-1" / "config.yaml")
    assert lr.train.learning_rate == 0.02 and lr.regularizers == [LfUConfig(variant="lora")]
    assert "vs_sft" in report["paired"]["kl-strong"]["target_nll"] and "vs_sft" not in report["paired"]["sft"]["target_nll"]
    # a strong KL drifts less than plain SFT on every seed's general text
    assert report["paired"]["kl-strong"]["general_drift_kl"]["vs_sft"]["mean"] < 0
    # and against another compared run, robustness std included (per question x template items)
    vs_lfu = report["paired"]["kl-strong"]["robust_acc_std"]["vs_lfu-lr"]
    assert vs_lfu["seeds"] == 2 and vs_lfu["n"] == 6 and "vs_lfu-lr" not in report["paired"]["lfu-lr"]["target_nll"]
    table = (root / "report.md").read_text()
    assert "## Paired differences" in table and "seeds 1, 2, " in table
    assert "value [95% interval over seeds and items" in table and "survives Holm correction over" in table
    assert "Against `lfu-lr`" in table and "| Δ robust std vs lfu-lr |" in table
    # every option of each run's method, written out
    assert '**kl-strong**: regularizers `[{"kl": {"coef": 10.0, "direction": "forward", "on": "sft"' in table
    assert '**lfu-lr**: regularizers `[{"lfu": {"variant": "lora", "lam": 5.0,' in table
    assert "`; overrides `" in table.split("**lfu-lr**")[1].splitlines()[0]
    # the shared config in full (a later report joins this one only when equal); a run's overrides stay its own
    stored = json.loads((root / "report.json").read_text())
    assert stored["training"]["train"]["learning_rate"] == 1e-2 and "progress_bar" not in stored["training"]["train"]
    assert stored["training"]["model"]["finetune"] == config.model.finetune
    assert stored["evaluation"] == json.loads(json.dumps(config.to_dict()["evaluation"]))
    assert stored["inputs"]["model_files"] == model_identity(config.model)["files"]
    assert list(stored["inputs"]["train_data"].values()) == [file_digest(Path(config.data.train))]
    assert config.evaluation.mc and stored["inputs"]["mc_contexts"] == "shared"  # a join checks it


def test_forgetting_curve_is_logged_during_training_and_plotted(tiny_llama, suite, tmp_path):
    config = tiny_compare(tiny_llama, suite, tmp_path, "train.max_steps=4", "train.learning_rate=5e-2",
                          "compare.methods=[sft, kl]")
    config.evaluation.every_steps, config.evaluation.curve_blocks, config.evaluation.curve_examples = 2, 2, 3
    report = run_compare(config)
    curve = report["curves"]["sft"]
    assert [p["step"] for p in curve] == [0, 2, 4]
    assert curve[0]["curve_drift_kl"] < 1e-3 < curve[-1]["curve_drift_kl"]  # the base, then a moved model
    assert curve[-1]["curve_target_nll"] != curve[0]["curve_target_nll"]
    summary = json.loads((tmp_path / "cmp" / "sft" / "train_summary.json").read_text())
    assert 0 < summary["curve_seconds"] < summary["train_seconds"]
    assert (tmp_path / "cmp" / "curve.png").stat().st_size > 0
    assert (tmp_path / "cmp" / "sft" / "checkpoints" / "curve_reference.safetensors").exists()


def test_report_gives_each_general_domain(tiny_llama, suite, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(("hello world over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - = .\n\n") * 12)
    config = tiny_compare(tiny_llama, suite, tmp_path, "train.max_steps=2", "train.learning_rate=5e-2",
                          "compare.methods=[sft]")
    config.evaluation.general_text = {"fox": suite.general_text, "numbers": str(other)}
    config.evaluation.general_blocks = 2
    report = run_compare(config)
    assert set(report["results"]["sft"]["general_by_domain"]) == {"fox", "numbers"}
    ppl = report["paired"]["sft"]["general_ppl@numbers"]["vs_base"]
    assert ppl["unit"] == "percent" and ppl["n"] == 2
    table = (tmp_path / "cmp" / "report.md").read_text()
    assert "## General yardstick by domain" in table and "| method | fox ppl | fox drift | numbers ppl |" in table


def test_compare_in_worker_processes_then_reused_without_training_or_evaluating(tiny_llama, suite, tmp_path,
                                                                                monkeypatch):
    """`jobs: 2` trains and evaluates in two spawned workers, seed by seed, and evaluates the base there too
    (never in this process, which would leave the workers idle meanwhile); its figures are those of the
    same comparison run in this process (1 thread each instead of the default count: rounding only). A
    second call finds every run and every evaluation finished and only writes the report."""
    import forgetless.compare as compare_mod

    def not_here(*args, **kwargs):
        raise AssertionError("the base was evaluated in the parent process")

    overrides = ("train.max_steps=2", "train.learning_rate=5e-2", "compare.methods=[sft, kl]", "compare.seeds=[1, 2]")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with monkeypatch.context() as patched:  # the spawned workers import their own, unpatched
        patched.setattr(compare_mod, "evaluate", not_here)
        parallel = run_compare(tiny_compare(tiny_llama, suite, tmp_path / "a", *overrides), jobs=2)
    inline = run_compare(tiny_compare(tiny_llama, suite, tmp_path / "b", *overrides))
    assert parallel["settings"]["runs_at_a_time"] == 2 and inline["settings"]["runs_at_a_time"] == 1
    for name in ("sft", "kl"):
        for seed in ("1", "2"):
            a = json.loads(json.dumps(parallel["per_seed"][name]))[seed]
            b = json.loads(json.dumps(inline["per_seed"][name]))[seed]
            for key in ("target_nll", "general_ppl", "general_drift_kl"):
                assert a[key]["value"] == pytest.approx(b[key]["value"], rel=1e-4), (name, seed, key)
    assert "Runs trained up to 2 at a time" in (tmp_path / "a" / "cmp" / "report.md").read_text()
    assert (tmp_path / "a" / "cmp" / "base_eval.json").exists()
    assert (tmp_path / "a" / "cmp" / "kl" / "seed-2" / "compare_eval.json").exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run or evaluation was redone")

    monkeypatch.setattr(compare_mod, "train", must_not_run)
    monkeypatch.setattr(compare_mod, "evaluate", must_not_run)
    monkeypatch.setattr(compare_mod, "evaluate_run", must_not_run)
    again = run_compare(tiny_compare(tiny_llama, suite, tmp_path / "b", *overrides))
    for key in ("paired", "results"):  # as JSON: tuples read back as lists, NaN as itself
        assert json.dumps(again[key], sort_keys=True) == json.dumps(inline[key], sort_keys=True)
    # a changed suite is measured again (and only the suite: the runs are reused)
    monkeypatch.setattr(compare_mod, "evaluate", lambda *a, **k: {"changed": True})
    changed = tiny_compare(tiny_llama, suite, tmp_path / "b", *overrides)
    changed.evaluation.seed += 1
    with pytest.raises(AssertionError, match="redone"):
        run_compare(changed)


def test_the_base_answers_are_generated_once_and_reused_by_a_fresh_process(tiny_llama, suite, tmp_path,
                                                                            monkeypatch):
    """The base's greedy instruction answers are stored beside its evaluation (keyed like it): an evaluation
    that loads the base afresh (a --jobs worker, a later comparison) reuses them instead of generating them
    again, and scores the same; a store of another suite is ignored and written over."""
    import forgetless.evaluate as evaluate_mod
    from forgetless.compare import BASE_ANSWERS, RUN_EVAL, Suite

    config = tiny_compare(tiny_llama, suite, tmp_path, "train.max_steps=2", "compare.methods=[sft]")
    run_compare(config)
    root = tmp_path / "cmp"
    stored = json.loads((root / BASE_ANSWERS).read_text())
    assert stored["key"] == json.loads(json.dumps(Suite(config, root).key()))
    [(spec, budget, prompts, ends, tokens, ended, rows)] = stored["answers"]
    assert budget == suite.instructions_max_new_tokens and len(prompts) == len(tokens) == len(ended) > 0
    assert rows == evaluate_mod.generation_batch(config.evaluation)
    folder = next(root.glob("sft/**/train_summary.json")).parent
    first = json.loads((folder / RUN_EVAL).read_text())["results"]["items"]

    calls = []
    real = evaluate_mod.greedy_answers
    monkeypatch.setattr(evaluate_mod, "greedy_answers",
                        lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    run_cfg = load_config(folder / "config.yaml")
    summary = json.loads((folder / "train_summary.json").read_text())
    again = Suite(config, root).run_results("sft", run_cfg, summary, overwrite=True)  # a new base object
    assert calls and not [d for d in calls if d.endswith("base answers")]
    assert again["items"]["instr_nll"] == first["instr_nll"] and again["items"]["instr_nll_ids"] == first["instr_nll_ids"]

    # a store written before entries recorded their rows per generate call: of its suite's, so reused
    (root / BASE_ANSWERS).write_text(json.dumps({**stored, "answers": [entry[:6] for entry in stored["answers"]]}))
    calls.clear()
    Suite(config, root).run_results("sft", run_cfg, summary, overwrite=True)
    assert calls and not [d for d in calls if d.endswith("base answers")]

    (root / BASE_ANSWERS).write_text(json.dumps({**stored, "key": {"another": "suite"}}))
    calls.clear()
    Suite(config, root).run_results("sft", run_cfg, summary, overwrite=True)
    assert [d for d in calls if d.endswith("base answers")] == ["sft: base answers"]
    assert json.loads((root / BASE_ANSWERS).read_text()) == stored


def test_a_comparison_stopped_mid_run_resumes_that_run_from_its_checkpoint(tiny_llama, suite, tmp_path,
                                                                           monkeypatch):
    """Rerun after a kill, compare resumes an unfinished run from its last checkpoint (same config and inputs)
    and ends with the weights of the uninterrupted run; an unfinished run of another config trains afresh."""
    import shutil

    from safetensors.torch import load_file

    import forgetless.compare as compare_mod

    overrides = ("train.max_steps=4", "train.save_steps=2", "train.learning_rate=1e-2", "compare.methods=[sft]")
    run_compare(tiny_compare(tiny_llama, suite, tmp_path, *overrides))
    folder = next((tmp_path / "cmp").glob("sft/**/train_summary.json")).parent
    whole = load_file(folder / "adapter_model.safetensors")
    # as a kill after step 3 leaves it: no summary, no final weights, checkpoint 2 the last complete one
    for name in ("train_summary.json", "adapter_model.safetensors", "compare_eval.json"):
        (folder / name).unlink()
    shutil.rmtree(folder / "checkpoints" / "checkpoint-4")

    calls = []
    real = compare_mod.train
    monkeypatch.setattr(compare_mod, "train", lambda cfg, **kw: calls.append(kw) or real(cfg, **kw))
    run_compare(tiny_compare(tiny_llama, suite, tmp_path, *overrides))
    assert [kw.get("resume") for kw in calls] == [True]
    resumed = load_file(folder / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys()
    assert all(torch.allclose(resumed[k], whole[k], atol=1e-6) for k in whole)

    # another learning rate: the unfinished run is not this one's, so it is trained afresh
    (folder / "train_summary.json").unlink()
    calls.clear()
    run_compare(tiny_compare(tiny_llama, suite, tmp_path, *overrides, "train.learning_rate=2e-2"))
    assert [kw.get("resume", False) for kw in calls] == [False] and (folder / "train_summary.json").exists()


def test_a_float32_lora_run_is_evaluated_with_its_adapters_merged(tiny_llama, suite, tmp_path, monkeypatch):
    """compare folds a float32 run's LoRA adapters into its base's weights before the suite (one matmul a layer,
    not three): the figures equal the unmerged model's to float32 rounding, the stored evaluation's key says
    so (an unmerged one is not reused for it), and a half-precision or quantised run stays unmerged."""
    import yaml

    import forgetless.evaluate as evaluate_mod
    from forgetless.compare import RUN_EVAL, Suite
    from forgetless.evaluate import evaluate, merges_for_evaluation
    from forgetless.model import load_trained

    config = tiny_compare(tiny_llama, suite, tmp_path, "train.max_steps=2", "train.learning_rate=5e-2",
                          "compare.methods=[sft]", "model.dtype=float32")  # (auto is bfloat16 on a GPU)
    run_compare(config)
    root = tmp_path / "cmp"
    folder = next(root.glob("sft/**/train_summary.json")).parent
    shared_base = {n: p.clone() for n, p in Suite(config, root).base()[0].named_parameters()}
    stored = json.loads((folder / RUN_EVAL).read_text())
    assert stored["key"]["adapters"] == "merged" and stored["key"]["mc_contexts"] == "shared"
    merged = stored["results"]["items"]

    suite_obj = Suite(config, root)
    base, tokenizer = suite_obj.base()
    unmerged_model, _ = load_trained(folder, dtype=base.dtype)
    lora_b = [p for n, p in unmerged_model.named_parameters() if "lora_B" in n]
    assert max(float(p.abs().max()) for p in lora_b) > 1e-3  # trained: merging changes the weights
    unmerged = evaluate(unmerged_model.eval(), tokenizer, config.evaluation, config.data, base=base)["items"]
    for key in ("target_nll", "general_nll", "general_drift_kl", "instr_nll", "mc_acc"):
        assert merged[key] == pytest.approx(unmerged[key], rel=1e-4, abs=1e-6), key

    # an evaluation stored unmerged, or with multiple choice scored pair by pair (before these changes), is
    # evaluated again, not reused
    summary = json.loads((folder / "train_summary.json").read_text())
    seen = []
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda model, *a, **k: seen.append(model) or evaluate(model, *a, **k))
    for before in ("adapters", "mc_contexts"):
        (folder / RUN_EVAL).write_text(json.dumps({**stored, "key": {k: v for k, v in stored["key"].items()
                                                                       if k != before}, "results": {"stale": 1}}))
        again = suite_obj.run_results("sft", load_config(folder / "config.yaml"), summary)
        assert "stale" not in again and again["items"]["target_nll"] == pytest.approx(merged["target_nll"])
    assert [type(m).__name__ for m in seen] == ["LlamaForCausalLM"] * 2  # the merged model, not a PeftModel
    for name, weight in suite_obj.base()[0].named_parameters():  # merging never touches the base drift is measured against
        assert torch.equal(weight, shared_base[name]), name

    assert not merges_for_evaluation(folder, torch.bfloat16)
    adapter_file = folder / "adapter_config.json"
    adapter = json.loads(adapter_file.read_text())
    for changed in ({"target_modules": [*adapter["target_modules"], "lm_head"]},  # tied to the embeddings
                    {"modules_to_save": ["embed_tokens"]}, {"peft_type": "PREFIX_TUNING"}, {"target_modules": ".*proj"}):
        adapter_file.write_text(json.dumps({**adapter, **changed}))
        assert not merges_for_evaluation(folder, torch.float32), changed
    adapter_file.write_text(json.dumps(adapter))
    assert merges_for_evaluation(folder, torch.float32)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    saved["model"]["quantization"] = "4bit"
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    assert not merges_for_evaluation(folder, torch.float32)
    assert not merges_for_evaluation(tiny_llama, torch.float32)  # a whole model: nothing to merge

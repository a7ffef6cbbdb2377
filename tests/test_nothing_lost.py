"""Nothing lost: --overwrite deletes only runs, --resume continues only the same run, and every reused
result or cache is keyed by the content of what it was computed from (forgetless.run_folder, .identity)."""

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from forgetless import curve as curve_module, frontier as frontier_module, identity
from forgetless.cache import build_once, load_matching, save_atomic
from forgetless.cli import main
from forgetless import train as train_module
from forgetless.errors import ConfigError, DataError
from forgetless.compare import read_curve
from forgetless.evaluate import merges_for_evaluation
from forgetless.model import load_trained, read_run_config
from forgetless.run_folder import MARKER, check_same_base, reusable_summary, save_aside
from forgetless.train import continue_run, train

from conftest import memorisation_rows, save_tiny, tiny_config, with_method, write_jsonl


class OneProcess:
    """The parts of an accelerator that build_once uses, for one process."""
    is_main_process = True

    def main_process_first(self):
        import contextlib
        return contextlib.nullcontext()


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("months of work")
    return path


# ---------------------------------------------------------------- deletion only of runs


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_gpt2, memo_data, tmp_path):
    folder = user_folder(tmp_path / "mine")
    cfg = tiny_config(tiny_gpt2, memo_data, folder, max_steps=1)
    with pytest.raises(ConfigError, match=r"not a forgetless run \(thesis.tex\).*nothing was deleted"):
        train(cfg, overwrite=True)
    with pytest.raises(ConfigError, match="not a forgetless run"):
        train(cfg)
    with pytest.raises(ConfigError, match="not a forgetless run"):
        train(cfg, resume=True)
    assert (folder / "thesis.tex").read_text() == "months of work"


def test_cli_overwrite_of_the_working_directory_is_refused(tiny_gpt2, memo_data, tmp_path, monkeypatch, capsys):
    scratch = user_folder(tmp_path / "scratch")
    monkeypatch.chdir(scratch)
    args = ["train", "default", f"model.name_or_path={tiny_gpt2}", f"data.train={memo_data}", "train.max_steps=1",
            "train.progress_bar=false", "--overwrite"]
    assert main(args + ["output_dir=."]) == 2
    assert "not a forgetless run" in capsys.readouterr().err
    # even a working directory that looks like a run (its marker) is never deleted by --overwrite
    (scratch / MARKER).write_text("{}")
    assert main(args + ["output_dir=."]) == 2
    assert "is the working directory; --overwrite will not delete it" in capsys.readouterr().err
    (scratch.parent / MARKER).write_text("{}")  # an ancestor of the working directory, marked too
    assert main(args + [f"output_dir={scratch.parent}"]) == 2
    assert "holds the working directory" in capsys.readouterr().err
    assert (scratch / "thesis.tex").read_text() == "months of work"


def test_overwrite_replaces_a_run_and_tilde_is_home(tiny_gpt2, memo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = tiny_config(tiny_gpt2, memo_data, "~/runs/a", max_steps=1)
    result = train(cfg)
    assert result.output_dir == tmp_path / "home" / "runs" / "a"
    assert (result.output_dir / "train_summary.json").is_file() and (result.output_dir / MARKER).is_file()
    assert not Path("~").exists()
    train(cfg, overwrite=True)  # a run: replaced
    assert not list(result.output_dir.glob(".saving*"))  # the save aside is renamed into place


# ---------------------------------------------------------------- resume that checks


def test_resume_refuses_a_finished_run_a_changed_config_and_a_missing_checkpoint(tiny_gpt2, memo_data, tmp_path):
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "run", max_steps=2)
    train(cfg)
    with pytest.raises(ConfigError, match="has finished"):
        train(cfg, resume=True)
    (tmp_path / "run" / "train_summary.json").unlink()  # as if killed after training, before the summary
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(cfg, resume=True)
    changed = tiny_config(tiny_gpt2, memo_data, tmp_path / "run", max_steps=2, learning_rate=3e-3)
    with pytest.raises(ConfigError, match=r"differs .* in train.learning_rate"):
        train(changed, resume=True)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        train(tiny_config(tiny_gpt2, memo_data, tmp_path / "nothing", max_steps=2), resume=True)


def test_resume_trims_metrics_and_refuses_changed_data(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Calculate {i} + 1.", "response": str(i)} for i in range(8)])
    cfg = tiny_config(tiny_gpt2, data, tmp_path / "run", max_steps=4, save_steps=2, batch_size=2)
    train(cfg)
    run = tmp_path / "run"
    # as if killed after step 4 was logged but before its checkpoint and the summary were complete
    (run / "train_summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    train(cfg, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 4, steps  # each step logged once
    (run / "train_summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "Calculate 9 + 1.", "response": "10"}) + "\n")
    with pytest.raises(ConfigError, match=r"data file .*d.jsonl changed since the run"):
        train(cfg, resume=True)


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(run / "adapter_model.safetensors")


def _summary(run: Path) -> dict:
    return json.loads((run / "train_summary.json").read_text())


def test_a_resumed_run_ends_as_the_uninterrupted_one_did_and_its_summary_counts_every_step(tiny_gpt2, tmp_path):
    """16 examples in batches of 8: 2 steps an epoch, so step 3's checkpoint is part-way through the second epoch.
    Trainer takes a step before it checks max_steps: resumed from that last checkpoint it trained a 4th."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Calculate {i} + 1.", "response": str(i)} for i in range(16)])
    cfg = tiny_config(tiny_gpt2, data, tmp_path / "run", max_steps=3, save_steps=1, save_total_limit=5, batch_size=8)
    run = tmp_path / "run"
    train(cfg)
    whole, weights = _summary(run), _adapter(run)
    ends = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train_runtime" in line]
    assert len(ends) == 1 and ends[0]["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)  # Trainer's own

    (run / "train_summary.json").unlink()  # killed after its last checkpoint, before the summary
    train(cfg, resume=True)
    after = _summary(run)
    assert after["global_steps"] == 3 and after["resumed_at_step"] == 3
    for name, tensor in weights.items():
        torch.testing.assert_close(_adapter(run)[name], tensor, rtol=0, atol=0)
    assert after["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)  # not 0: no step was trained here
    assert after["train_seconds"] >= 0.9 * whole["train_seconds"]  # the tally's seconds, saved in the checkpoint
    ends = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train_runtime" in line]
    assert len(ends) == 1, "the killed run's end-of-training row is trimmed; the resume logs its own"
    assert ends[0]["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)  # the run's, not Trainer's 0

    (run / "train_summary.json").unlink()  # killed after step 1's checkpoint
    for step in (2, 3):
        shutil.rmtree(run / "checkpoints" / f"checkpoint-{step}")
    train(cfg, resume=True)
    after = _summary(run)
    assert after["global_steps"] == 3 and after["resumed_at_step"] == 1
    assert after["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)  # over steps 1-3, not 2-3
    for name, tensor in weights.items():
        torch.testing.assert_close(_adapter(run)[name], tensor, rtol=1e-5, atol=1e-7)

    # a checkpoint written before forgetless kept its tally: resumed, its figures over the steps trained then
    (run / "train_summary.json").unlink()
    for step in (2, 3):
        shutil.rmtree(run / "checkpoints" / f"checkpoint-{step}")
    state_file = run / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["RunTally"]
    state_file.write_text(json.dumps(state))
    train(cfg, resume=True)
    after = _summary(run)
    steps = {row["step"]: row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in row}
    assert after["global_steps"] == 3 and after["counted_from_step"] == 1
    assert after["train_loss"] == pytest.approx((steps[2] + steps[3]) / 2, rel=1e-5)
    # the checkpoints that resume wrote say where their tally starts: resumed again, the figures are still 2-3's
    (run / "train_summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "checkpoint-3")
    train(cfg, resume=True)
    again = _summary(run)
    assert again["resumed_at_step"] == 2 and again["counted_from_step"] == 1
    assert again["train_loss"] == pytest.approx(after["train_loss"], rel=1e-5)


def test_a_resumed_runs_curve_seconds_count_the_measurements_before_the_resume(tiny_gpt2, suite, tmp_path, monkeypatch):
    """The forgetting curve's seconds are saved in each checkpoint: a run resumed from its last checkpoint, which
    measures nothing more, reports the curve's cost over the whole run, not 0."""
    # a clock on which each timed part of the curve takes exactly one second: the sums below are exact, where a real
    # clock's few milliseconds on a fast machine round to 0.0 in the summary
    ticks = iter(range(10_000))
    monkeypatch.setattr(curve_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Calculate {i} + 1.", "response": str(i)} for i in range(16)])
    cfg = tiny_config(tiny_gpt2, data, tmp_path / "run", max_steps=3, save_steps=1, batch_size=8)
    cfg.evaluation = suite
    cfg.evaluation.every_steps, cfg.evaluation.curve_blocks, cfg.evaluation.curve_examples = 1, 2, 3
    run = tmp_path / "run"
    train(cfg)
    # the base reference, the measurement before the first step, and one after each of the 3 steps
    assert _summary(run)["curve_seconds"] == 5.0
    (run / "train_summary.json").unlink()  # killed after its last checkpoint, before the summary
    train(cfg, resume=True)
    after = _summary(run)
    assert after["resumed_at_step"] == 3 and after["curve_seconds"] == 5.0
    # a checkpoint written before the curve saved its seconds: counted from the resume (step 3's measurement; the
    # stored reference is reused), and the checkpoint that resume writes has the entry again
    state_file = run / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["ForgettingCurve"]
    state_file.write_text(json.dumps(state))
    shutil.rmtree(run / "checkpoints" / "checkpoint-3")
    (run / "train_summary.json").unlink()
    train(cfg, resume=True)
    assert _summary(run)["curve_seconds"] == 1.0
    rewritten = json.loads((run / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert rewritten["stateful_callbacks"]["ForgettingCurve"]["attributes"]["seconds"] == 1.0


def test_save_aside_leaves_the_old_files_when_the_save_fails(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_text("old")

    def failing(folder: Path) -> None:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_text("half")
        raise KeyboardInterrupt  # a kill part-way

    with pytest.raises(KeyboardInterrupt):
        save_aside(tmp_path, failing)
    assert (tmp_path / "adapter_model.safetensors").read_text() == "old"

    def works(folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        (folder / "adapter_model.safetensors").write_text("new")

    save_aside(tmp_path, works)
    assert (tmp_path / "adapter_model.safetensors").read_text() == "new" and not (tmp_path / ".saving").exists()


def test_write_run_writes_the_summary_last_and_a_kill_leaves_no_finished_run(tiny_gpt2, memo_data, tmp_path,
                                                                             monkeypatch):
    """run_folder.write_run, the one writer of a finished run's folder (train's and budget's): weights aside
    then in place, the metrics of the run they came from, config.yaml, extra files, the summary last."""
    import yaml

    from forgetless import run_folder

    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("{}")
    (tmp_path / "trained.jsonl").write_text('{"step": 1}\n')
    cfg = tiny_config(tiny_gpt2, memo_data, run)

    def save(folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        (folder / "adapter_model.safetensors").write_text("weights")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill after the weights, while the other files are written

    with monkeypatch.context() as m:
        m.setattr(run_folder, "write_json_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            run_folder.write_run(run, save, {"train_loss": 1.0}, config=cfg, metrics=tmp_path / "trained.jsonl",
                                 files={"budget.json": {"chosen": 1}})
    assert (run / "adapter_model.safetensors").read_text() == "weights"
    assert not run_folder.is_finished(run)  # the folder never reads as finished

    present_at_summary = []
    real = run_folder.write_summary
    monkeypatch.setattr(run_folder, "write_summary", lambda folder, summary: (
        present_at_summary.append(sorted(p.name for p in Path(folder).iterdir())), real(folder, summary)))
    run_folder.write_run(run, save, {"train_loss": 1.0}, config=cfg, metrics=tmp_path / "trained.jsonl",
                         files={"budget.json": {"chosen": 1}})
    assert present_at_summary == [sorted([MARKER, "adapter_model.safetensors", "metrics.jsonl", "config.yaml",
                                          "budget.json"])]
    assert sorted(p.name for p in run.iterdir()) == sorted(present_at_summary[0] + ["train_summary.json"])
    assert json.loads((run / "train_summary.json").read_text()) == {"train_loss": 1.0}
    assert json.loads((run / "budget.json").read_text()) == {"chosen": 1}
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert yaml.safe_load((run / "config.yaml").read_text()) == yaml.safe_load(yaml.safe_dump(cfg.to_dict()))


# ---------------------------------------------------------------- reuse keyed by content


def test_a_finished_run_is_reused_only_with_the_same_inputs(tiny_gpt2, tmp_path, monkeypatch):
    model = Path(shutil.copytree(tiny_gpt2, tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Calculate {i} + 1.", "response": str(i)} for i in range(4)])
    cfg = tiny_config(model, data, tmp_path / "run", max_steps=1)
    train(cfg)
    assert reusable_summary(cfg) is not None  # unchanged: reused

    data.write_text(data.read_text().replace('"3"', '"4"'))  # edited in place: same name, same config
    assert reusable_summary(cfg) is None
    data.write_text(data.read_text().replace('"4"', '"3"'))
    assert reusable_summary(cfg) is not None

    monkeypatch.setattr(identity, "resolve_dtype", lambda *a, **k: torch.bfloat16)  # `auto` on a GPU
    assert reusable_summary(cfg) is None
    monkeypatch.undo()
    monkeypatch.setattr(identity, "__version__", "9.9.9")
    assert reusable_summary(cfg) is None
    monkeypatch.undo()

    weights = model / "model.safetensors"
    state = {k: v.clone() for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(weights)).items()}
    next(iter(state.values())).add_(1.0)
    save_atomic(state, weights, metadata={"format": "pt"})  # new weights behind the same path
    assert reusable_summary(cfg) is None


def test_a_run_folder_moved_elsewhere_is_still_reused(tiny_gpt2, memo_data, tmp_path):
    """Where a run lives is not what it trained: a finished run moved (or copied) to another folder is reused there,
    and only while the rest of its config and its inputs are the same."""
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "run", max_steps=1)
    train(cfg)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    moved = tiny_config(tiny_gpt2, memo_data, tmp_path / "moved", max_steps=1)
    assert reusable_summary(moved) is not None
    assert continue_run(moved) == reusable_summary(moved)  # reused as it is, not trained again
    assert not (tmp_path / "run").exists() and (tmp_path / "moved" / "train_summary.json").is_file()
    assert reusable_summary(tiny_config(tiny_gpt2, memo_data, tmp_path / "moved", max_steps=2)) is None


def test_a_run_written_before_an_option_existed_is_reused_and_resumed(tiny_gpt2, memo_data, tmp_path):
    """A config.yaml without an option added since (here train.loss_chunk, added after the 0.2.0 frontier runs
    were trained) reads with that option at its default: the run is reused and resumable, not retrained."""
    import yaml

    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "run", max_steps=2, save_steps=1)
    train(cfg)
    saved = tmp_path / "run" / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    del older["train"]["loss_chunk"]
    saved.write_text(yaml.safe_dump(older))
    assert reusable_summary(cfg) is not None
    (tmp_path / "run" / "train_summary.json").unlink()  # as if killed after its last checkpoint
    assert train(cfg, resume=True).summary["global_steps"] == 2
    # an option set away from its default is still a different run
    chunked = tiny_config(tiny_gpt2, memo_data, tmp_path / "run", max_steps=2, save_steps=1, loss_chunk=4)
    assert reusable_summary(chunked) is None
    # sections reuse ignores may hold what this version no longer reads (a preset renamed since)
    older = yaml.safe_load(saved.read_text())
    del older["train"]["loss_chunk"]
    older["compare"]["methods"] = ["a-preset-renamed-since"]
    older["frontier"]["grids"] = {"a-preset-renamed-since": [1.0]}
    saved.write_text(yaml.safe_dump(older))
    assert reusable_summary(cfg) is not None


def test_a_finished_run_of_another_config_is_set_aside_not_trained_over(tiny_gpt2, memo_data, tmp_path):
    """What frontier and budget --resume do with a point folder that holds a finished run of other settings."""
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "point", max_steps=1)
    train(cfg)
    (tmp_path / "point" / "notes.txt").write_text("kept with the run")
    old_summary = (tmp_path / "point" / "train_summary.json").read_text()
    changed = tiny_config(tiny_gpt2, memo_data, tmp_path / "point", max_steps=1, learning_rate=3e-3)
    assert continue_run(changed)["global_steps"] == 1
    aside = tmp_path / "point.replaced-1"
    assert (aside / "train_summary.json").read_text() == old_summary
    assert (aside / "notes.txt").read_text() == "kept with the run"
    assert continue_run(changed) is not None and not (tmp_path / "point.replaced-2").exists()  # now reused
    assert continue_run(cfg)["global_steps"] == 1 and (tmp_path / "point.replaced-2").is_dir()


def test_an_unfinished_run_of_another_config_is_set_aside_with_its_checkpoints(tiny_gpt2, memo_data, tmp_path,
                                                                               monkeypatch):
    """frontier / budget --resume (continue_run) and compare (train_or_reuse), given a folder that holds a run
    stopped with a checkpoint under other settings: it cannot be resumed as this run, so this run trains
    afresh, and the stopped one is moved aside whole, its checkpoints with it, never deleted or trained over."""
    from forgetless.compare import train_or_reuse

    for name, carry_on in (("point", continue_run),
                           ("sft", lambda c: train_or_reuse(c, overwrite=False, label="sft"))):
        cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / name, max_steps=2, save_steps=1)
        train(cfg)
        (tmp_path / name / "train_summary.json").unlink()  # as if killed after its last checkpoint
        checkpoints = sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir())
        assert checkpoints
        changed = tiny_config(tiny_gpt2, memo_data, tmp_path / name, max_steps=2, save_steps=1, learning_rate=3e-3)
        assert carry_on(changed)["global_steps"] == 2
        aside = tmp_path / f"{name}.replaced-1"
        assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == checkpoints
        assert not (aside / "train_summary.json").exists() and (tmp_path / name / "train_summary.json").is_file()
        assert carry_on(changed)  # now reused, nothing moved
        assert not (tmp_path / f"{name}.replaced-2").exists()
    # the same settings stopped with a checkpoint are resumed, not set aside, also when examples are held out
    # (budget's and frontier's trials): its inputs then name the holdout, which the check must see
    import forgetless.train as train_module

    more = write_jsonl(tmp_path / "more.jsonl", memorisation_rows() * 2)  # 15 left to train on after the holdout
    cfg = tiny_config(tiny_gpt2, more, tmp_path / "held", max_steps=4, save_steps=2)
    train(cfg, holdout=1)
    (tmp_path / "held" / "train_summary.json").unlink()  # as if killed after step 2's checkpoint
    shutil.rmtree(tmp_path / "held" / "checkpoints" / "checkpoint-4")
    calls = []
    monkeypatch.setattr(train_module, "train", lambda *a, **k: calls.append(k) or train(*a, **k))
    assert continue_run(cfg, holdout=1)["global_steps"] == 4
    assert calls == [{"resume": True, "holdout": 1}] and not (tmp_path / "held.replaced-1").exists()


def test_compare_sets_aside_a_finished_run_it_does_not_reuse(tiny_gpt2, memo_data, tmp_path):
    """compare retrains a run of other settings (or one without its memory figure) in its folder: the old one is
    moved aside; --overwrite (overwrite=True) replaces it as asked."""
    from forgetless.compare import train_or_reuse

    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "sft", max_steps=1)
    train(cfg)  # a plain run: no peak_mem_bytes, so compare trains it again
    assert "peak_mem_bytes" in train_or_reuse(cfg, overwrite=False, label="sft")
    assert not (json.loads((tmp_path / "sft.replaced-1" / "train_summary.json").read_text())).get("peak_mem_bytes")
    assert train_or_reuse(cfg, overwrite=False, label="sft") and not (tmp_path / "sft.replaced-2").exists()
    train_or_reuse(cfg, overwrite=True, label="sft")
    assert not (tmp_path / "sft.replaced-2").exists()


def test_eval_run_refuses_a_run_of_another_base(tiny_gpt2, tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "run", max_steps=1)
    train(cfg)
    check_same_base(tmp_path / "run", cfg)  # its own base: fine
    other = tiny_config(tiny_llama, memo_data, tmp_path / "x", max_steps=1)
    with pytest.raises(ConfigError, match="was trained from"):
        check_same_base(tmp_path / "run", other)


def test_a_damaged_config_or_summary_in_a_run_folder_is_named_and_the_run_kept(tiny_gpt2, memo_data, tmp_path, caplog):
    """A run folder's config.yaml or train_summary.json cut short or edited into something else: every reader
    raises a ConfigError naming the file (its line, for YAML) before any model is loaded, never yaml's or json's
    traceback; reuse passes the run over with a warning, and the run is then set aside whole, never trained over."""
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "run", max_steps=1)
    train(cfg)
    run = tmp_path / "run"
    config_text, summary_text = (run / "config.yaml").read_text(), (run / "train_summary.json").read_text()
    assert merges_for_evaluation(run, torch.float32) and reusable_summary(cfg) is not None
    load_trained(run)  # the readers read the intact folder

    (run / "config.yaml").write_text("model: [unclosed\n  name: x\n")
    for read in (lambda: read_run_config(run), lambda: check_same_base(run, cfg), lambda: load_trained(run),
                 lambda: merges_for_evaluation(run, torch.float32)):
        with pytest.raises(ConfigError, match=rf"{run / 'config.yaml'}: line 2 not valid YAML: expected ',' or ']'"):
            read()
    for model in ("null", "gpt2"):  # a section edited away: refused, never the default model loaded as its base
        (run / "config.yaml").write_text(config_text.replace("model:\n", f"model: {model}\nold_model:\n", 1))
        for read in (lambda: check_same_base(run, cfg), lambda: load_trained(run),
                     lambda: merges_for_evaluation(run, torch.float32)):
            with pytest.raises(ConfigError, match=r"config.yaml: `model:` is (missing|'gpt2'), not the mapping"):
                read()
    (run / "config.yaml").write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match="config.yaml: the top level must be a mapping of sections, got list"):
        check_same_base(run, cfg)
    with caplog.at_level("WARNING", logger="forgetless.run_folder"):
        assert reusable_summary(cfg) is None
    assert f"{run}: not reused: {run / 'config.yaml'}" in caplog.text

    (run / "config.yaml").write_text(config_text)
    (run / "train_summary.json").write_text(summary_text[: len(summary_text) // 2])  # cut short, as by a full disk
    with pytest.raises(ConfigError, match=rf"{run / 'train_summary.json'} is not valid JSON"):
        check_same_base(run, cfg)
    assert reusable_summary(cfg) is None
    damaged = (run / "train_summary.json").read_bytes()
    continue_run(cfg)  # what budget --resume does: the damaged run is moved aside whole, then trained
    assert (tmp_path / "run.replaced-1" / "train_summary.json").read_bytes() == damaged
    assert reusable_summary(cfg) is not None

    # frontier's point: the same, and the damaged file named once (it used to ask twice, and warn twice)
    (run / "train_summary.json").write_text("[]")
    caplog.clear()
    with caplog.at_level("WARNING", logger="forgetless.run_folder"):
        summary, trained = frontier_module._train_or_reuse(cfg, 0, False, "point")
    assert trained and summary["global_steps"] == 1
    assert caplog.text.count(f"{run}: not reused: {run / 'train_summary.json'} holds a list") == 1, caplog.text
    assert (tmp_path / "run.replaced-2" / "train_summary.json").read_text() == "[]"



def test_a_metrics_line_cut_short_leaves_the_curve_without_it(tmp_path, caplog):
    """compare's report reads each run's forgetting curve from metrics.jsonl: a line cut short (or not a mapping)
    is left out with a warning naming the file and line, never a traceback after all the training is done."""
    points = [{"step": s, "curve_general_nll": 3.0 + s, "curve_drift_kl": 0.1 * s, "curve_target_nll": 2.0 - s}
              for s in (0, 20, 40)]
    lines = [json.dumps(points[0]), json.dumps({"step": 1, "loss": 2.5}), json.dumps(points[1])[:25], "[1, 2]",
             json.dumps(points[2])]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="forgetless.compare"):
        assert read_curve(tmp_path) == [points[0], points[2]]
    assert f"{tmp_path / 'metrics.jsonl'}: line 3 is not JSON" in caplog.text


def test_bad_names_and_missing_data_stop_train_before_the_model_loads(memo_data, tmp_path, monkeypatch):
    """A misspelt scheduler, optimizer or logger, and a missing data file, are one line naming the key or the
    file, said before the model loads (transformers would raise after it) and before the folder is written."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_module, "load_for_training", no_model)
    cfg = tiny_config(tmp_path / "no-model", memo_data, tmp_path / "run", max_steps=1)
    for key, value, said in (("lr_scheduler", "cosin", "did you mean 'cosine'?"),
                             ("optim", "adamw_torc", "did you mean 'adamw_torch'?"),
                             ("report_to", ["none", "tensorbord"], "did you mean 'tensorboard'?")):
        bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{key: value}))
        with pytest.raises(ConfigError, match=rf"train\.{key}: '\w+' is not a name transformers knows; {said}"):
            train(bad)
    missing = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        train(missing)
    no_eval = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        train(no_eval)
    assert not (tmp_path / "run").exists()


def test_a_run_trains_beside_the_base_evaluation_eval_wrote_in_its_folder(tiny_gpt2, memo_data, tmp_path):
    """`forgetless eval` without --run writes OUTPUT_DIR/eval.json; `train` into that folder is not refused as
    a folder of foreign files, and keeps the file (with or without --overwrite); anything beside it is refused."""
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "run", max_steps=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.json").write_text('{"base": {}}')
    train(cfg)
    assert (tmp_path / "run" / "eval.json").read_text() == '{"base": {}}'
    assert reusable_summary(cfg) is not None
    other = tiny_config(tiny_gpt2, memo_data, tmp_path / "other", max_steps=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "eval.json").write_text('{"base": {}}')
    train(other, overwrite=True)
    assert (tmp_path / "other" / "eval.json").read_text() == '{"base": {}}'
    mine = user_folder(tmp_path / "mine")
    (mine / "eval.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds files that are not a forgetless run"):
        train(tiny_config(tiny_gpt2, memo_data, mine, max_steps=1))


def test_caches_are_rebuilt_for_other_inputs_or_when_corrupt(tmp_path):
    path = tmp_path / "cache.safetensors"
    built = []

    def build():
        built.append(1)
        return {"x": torch.arange(4.0)}

    meta = {"k": "8", "inputs": "abc"}
    build_once(path, meta, build, OneProcess(), "test")
    build_once(path, meta, build, OneProcess(), "test")
    assert len(built) == 1  # same inputs: reused
    build_once(path, {**meta, "inputs": "other"}, build, OneProcess(), "test")
    assert len(built) == 2  # other inputs: rebuilt
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 6])  # truncated, its header (and metadata) intact
    assert load_matching(path, {**meta, "inputs": "other"}) is None
    out = build_once(path, {**meta, "inputs": "other"}, build, OneProcess(), "test")
    assert len(built) == 3 and torch.equal(out["x"], torch.arange(4.0))


def test_run_inputs_change_with_each_input(tiny_gpt2, memo_data, tmp_path):
    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "run")
    before = identity.run_inputs(cfg)
    assert identity.run_inputs(cfg) == before
    corpus = tmp_path / "replay.txt"
    corpus.write_text("one document\n\nanother")
    cfg = with_method(cfg, replay={"data": str(corpus)})
    with_replay = identity.run_inputs(cfg)
    corpus.write_text("one document\n\nchanged")
    assert identity.changed_inputs(with_replay, identity.run_inputs(cfg)) == [f"data file {corpus}"]


def test_examples_held_out_of_training_are_part_of_a_runs_inputs(tiny_gpt2, memo_data, tmp_path):
    """budget's trials train on data.train less its last validation examples (train(holdout=...)): the
    count is in their inputs, so a finished trial is reused only for the same split, and plain runs'
    inputs are as before."""
    from forgetless.config import dump_config
    from forgetless.run_folder import write_summary

    cfg = tiny_config(tiny_gpt2, memo_data, tmp_path / "run")
    plain, held = identity.run_inputs(cfg), identity.run_inputs(cfg, holdout=16)
    assert "holdout" not in plain and held == {**plain, "holdout": 16}
    assert identity.changed_inputs(held, identity.run_inputs(cfg, holdout=8)) == [
        "the examples held out of training (budget.validation_examples)"]
    run = tmp_path / "run"
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    write_summary(run, {"inputs": held})
    assert reusable_summary(cfg, holdout=16) == {"inputs": held}
    assert reusable_summary(cfg, holdout=8) is None and reusable_summary(cfg) is None


# ---------------------------------------------------------------- the offline default stays offline


def test_saving_an_adapter_of_the_embedded_default_makes_no_network_lookup(tmp_path, monkeypatch, memo_data):
    # the embedded default's converted folder, here a tiny model in its place (FORGETLESS_CACHE)
    save_tiny(tmp_path / "cache" / "models" / "smollm2-135m-instruct", "llama", chat=True)
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # peft looks up the Hub unless told it is offline
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("Name or service not known")

    monkeypatch.setattr("socket.getaddrinfo", no_network)
    monkeypatch.setattr("socket.create_connection", no_network)
    cfg = tiny_config("smollm2-135m-instruct", memo_data, tmp_path / "run", max_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    assert attempts == []
    assert not [w for w in caught if "Unable to fetch" in str(w.message) or "Could not find a config" in str(w.message)]
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == tmp_path / "cache" / "models" / "smollm2-135m-instruct"


def test_a_folder_is_a_run_only_when_forgetless_made_it_and_holds_nothing_else(tmp_path):
    from forgetless.run_folder import check_output_dir, is_run

    project = tmp_path / "project"  # a user's ML project: a config.yaml of its own beside checkpoints/
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.yaml").write_text("lr: 1\n")
    (project / "main.py").write_text("print('hi')")
    assert not is_run(project)
    with pytest.raises(ConfigError, match="not a forgetless run"):
        check_output_dir(project, overwrite=True, resume=False)

    run = tmp_path / "run"  # a marked run to which the user added notes: not deleted with it
    run.mkdir()
    (run / MARKER).write_text("{}")
    (run / "adapter_model.safetensors").write_text("w")
    (run / "my-notes.md").write_text("keep")
    with pytest.raises(ConfigError, match="also my-notes.md, which forgetless did not write"):
        check_output_dir(run, overwrite=True, resume=False)
    (run / "my-notes.md").unlink()
    check_output_dir(run, overwrite=True, resume=False)  # only forgetless's files: may be replaced


def test_model_identity_is_its_weights_config_and_tokenizer_only(tiny_gpt2, tmp_path):
    from forgetless.config import ModelConfig

    model = Path(shutil.copytree(tiny_gpt2, tmp_path / "model"))
    before = identity.model_identity(ModelConfig(name_or_path=str(model)))
    (model / "checkpoints").mkdir()  # e.g. a forgetless run used as a base, evaluated later
    (model / "checkpoints" / "state.bin").write_text("x")
    (model / "eval.json").write_text("{}")
    (model / "notes.md").write_text("later")
    assert identity.model_identity(ModelConfig(name_or_path=str(model))) == before
    (model / "tokenizer_config.json").write_text((model / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1))
    assert identity.model_identity(ModelConfig(name_or_path=str(model))) != before


def test_a_glob_source_that_matches_a_dataset_folder_is_hashed(tmp_path):
    (tmp_path / "d" / "ds").mkdir(parents=True)
    (tmp_path / "d" / "ds" / "part.jsonl").write_text("{}")
    first = identity.source_digest(str(tmp_path / "d" / "*"))
    (tmp_path / "d" / "ds" / "part.jsonl").write_text("{ }")
    assert identity.source_digest(str(tmp_path / "d" / "*")) != first

"""A run's folder: what marks it as forgetless's, when it may be replaced or resumed, and how a
finished run is written so that a kill never leaves a half-written one that looks finished.

Nothing a user did not ask to delete is deleted: `--overwrite` removes a folder only when it carries
forgetless's marker (MARKER, written when the run starts; runs from before the marker are recognised
by their config.yaml beside a train_summary.json, metrics.jsonl or checkpoints/), and never the working
directory, an ancestor of it or the home folder. `--resume` continues only an unfinished run, from a
complete checkpoint, with the same config (but for the keys in RESUMABLE) and the same inputs
(forgetless.identity): anything else is one error saying what differs.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from forgetless import __version__
from forgetless.cache import write_json_atomic
from forgetless.config import ForgetlessConfig, dump_config
from forgetless.errors import ConfigError
from forgetless.identity import changed_inputs, model_identity, run_inputs
from forgetless.model import load_trained, read_adapter_config, read_run_config, read_run_model
from forgetless.schema import from_dict, read_yaml_mapping

logger = logging.getLogger(__name__)

MARKER = ".forgetless-run"  # JSON: the forgetless version and the run's inputs (forgetless.identity)
SUMMARY = "train_summary.json"  # written last: its presence marks a finished run
CONFIG = "config.yaml"
EVAL_FILE = "eval.json"  # `forgetless eval`'s results: of the base (in output_dir) or of a run and its base (in it)
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"

# top-level config keys that are not what a run trains: where it lies, and the sections that evaluate, compare and
# search (reuse ignores these; run_folder.training_part)
NOT_TRAINED = ("output_dir", "evaluation", "compare", "budget", "frontier")
# config keys that may differ on --resume: those, and how the run is logged, saved and exported, and memory-only
# settings
RESUMABLE = NOT_TRAINED + ("merge", "train.progress_bar", "train.logging_steps", "train.report_to", "train.save_steps",
                           "train.save_total_limit", "train.max_nonfinite_steps", "train.gradient_checkpointing")

# What a run folder holds (top level) when forgetless wrote it: its own files, Trainer's and peft's saves,
# the tokenizer, compare's and eval's results, budget's trials. `--overwrite` deletes a run only when
# nothing else is there: a file you added to a run folder is never deleted with it.
RUN_ENTRIES = (MARKER, CONFIG, METRICS, SUMMARY, CHECKPOINTS, "tensorboard", "merged", ".saving", ".merged",
               "budget", "budget.json", EVAL_FILE, "compare_eval.json", "README.md", "adapter_config.json",
               "adapter_model.safetensors", "adapter_model.bin", "config.json", "generation_config.json",
               "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
               "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "vocab.txt", "merges.txt",
               "added_tokens.json", "spiece.model", "training_args.bin", "*.tmp")


def _looks_like_run_config(path: Path) -> bool:
    try:
        saved = read_yaml_mapping(path)
    except (OSError, ConfigError):  # unreadable, or not a mapping: not a config forgetless wrote
        return False
    return {"model", "data", "train", "output_dir"} <= set(saved)


def is_run(folder: Path) -> bool:
    """Whether `folder` holds a forgetless run: its marker, or (a run from before the marker) a config.yaml
    that forgetless wrote beside its summary, metrics or checkpoints."""
    if (folder / MARKER).is_file():
        return True
    return (_looks_like_run_config(folder / CONFIG)
            and any((folder / name).exists() for name in (SUMMARY, METRICS, CHECKPOINTS)))


def foreign_entries(folder: Path) -> list[str]:
    """Top-level entries of a run folder that forgetless does not write there."""
    return sorted(p.name for p in folder.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in RUN_ENTRIES))


def read_run_json(path: Path) -> dict[str, Any]:
    """A JSON file forgetless wrote in a run folder (its summary, its marker) as a dict; one cut short or edited
    into something else is a ConfigError naming it, never json's traceback."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is not valid JSON ({exc}); the run folder {path.parent} is damaged: restore the "
                          "file, or pass --overwrite to train the run again") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} holds a {type(loaded).__name__}, not the mapping forgetless wrote there; the run "
                          f"folder {path.parent} is damaged: restore the file, or pass --overwrite to train the run again")
    return loaded


def is_finished(folder: Path) -> bool:
    return (folder / SUMMARY).is_file()


def stopped_with_checkpoint(folder: Path) -> bool:
    """A forgetless run that did not finish and holds a complete checkpoint: one a resume can continue."""
    return is_run(folder) and not is_finished(folder) and latest_checkpoint(folder / CHECKPOINTS) is not None


def holds_base_evaluation_only(folder: Path) -> bool:
    """Whether `folder` holds nothing but what `forgetless eval` without --run writes in output_dir (eval.json):
    a run then trains there beside it, and keeps it."""
    entries = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return bool(entries) and set(entries) <= {EVAL_FILE} and (folder / EVAL_FILE).is_file()


def _holds_files(folder: Path) -> bool:
    """Whether a folder holds a file to lose: not a run stopped while being set up (bad input found after
    the folder was prepared), which holds its marker and, beside it, its config.yaml at most."""
    if not folder.is_dir():
        return False
    setup_only = {folder / MARKER, folder / CONFIG} if (folder / MARKER).is_file() else set()
    return any(p.is_file() and p not in setup_only for p in folder.rglob("*"))


def _protected(folder: Path) -> str | None:
    """Why deleting `folder` is never right, or None."""
    target = folder.expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == Path(target.anchor):
        return "the filesystem root"
    if target == home:
        return "your home folder"
    if target == cwd or target in cwd.parents:
        return "the working directory" if target == cwd else "a folder that holds the working directory"
    return None


def _listing(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(output_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse, before anything loads, every use of output_dir that could lose a user's files or a run.
    A folder of empty folders (a run stopped by bad input while being set up) holds nothing to lose."""
    output_dir = Path(output_dir).expanduser()
    holds_files = _holds_files(output_dir)
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume: give one (start again, or continue the run)")
    if resume:
        if not holds_files:
            raise ConfigError(f"--resume: {output_dir} holds no run to resume; drop --resume to start it")
        if not is_run(output_dir):
            raise ConfigError(f"--resume: {output_dir} is not a forgetless run (it holds {_listing(output_dir)})")
        if is_finished(output_dir):
            raise ConfigError(f"--resume: the run in {output_dir} has finished ({SUMMARY} is there); "
                              "pass --overwrite to train it again, or choose another output_dir")
        return
    if not holds_files or holds_base_evaluation_only(output_dir):
        return
    if not is_run(output_dir):
        what = f"{output_dir} holds files that are not a forgetless run ({_listing(output_dir)})"
        if overwrite:
            raise ConfigError(f"output_dir: {what}; --overwrite replaces only a forgetless run, so nothing was "
                              "deleted. Choose a new output_dir, or move those files away")
        raise ConfigError(f"output_dir: {what}; choose a new or empty output_dir")
    if overwrite:
        why = _protected(output_dir)
        if why:
            raise ConfigError(f"output_dir {output_dir} is {why}; --overwrite will not delete it. "
                              "Give each run a folder of its own, e.g. output_dir=runs/NAME")
        foreign = foreign_entries(output_dir)
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise ConfigError(f"output_dir {output_dir} holds a forgetless run and also {shown}, which forgetless "
                              "did not write; --overwrite deletes nothing of yours, so nothing was deleted. Move "
                              "them out of the run folder, or choose another output_dir")
        return
    finished = is_finished(output_dir)
    what = "a finished run" if finished else "files from an earlier (unfinished) run"
    if finished:
        hint = "pass --overwrite to replace it"
    elif latest_checkpoint(output_dir / CHECKPOINTS):
        hint = "pass --resume to continue it or --overwrite to start again"
    else:
        hint = "it has no complete checkpoint to resume from: pass --overwrite to start again"
    raise ConfigError(f"output_dir {output_dir} already holds {what}; {hint}")


def prepare_output_dir(output_dir: Path, overwrite: bool, resume: bool, inputs: dict[str, Any] | None = None) -> None:
    """Start afresh (--overwrite: the old run is removed) or continue; mark the folder as a run. With
    several processes only the main one calls this, after every process has run check_output_dir."""
    output_dir = Path(output_dir).expanduser()
    check_output_dir(output_dir, overwrite, resume)
    if overwrite and _holds_files(output_dir) and not holds_base_evaluation_only(output_dir):
        shutil.rmtree(output_dir)  # check_output_dir: a forgetless run, not a protected folder
    output_dir.mkdir(parents=True, exist_ok=True)
    if not resume or not (output_dir / MARKER).is_file():
        write_json_atomic(output_dir / MARKER, {"forgetless": __version__, "inputs": inputs}, indent=2)


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest *complete* checkpoint: Trainer writes trainer_state.json last, so a folder whose
    state file is missing or unreadable was cut short by a kill and is passed over."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for path in sorted(candidates, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (OSError, ValueError):
            logger.warning("skipping incomplete checkpoint %s", path)
    return None


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for a nested mapping (lists and empty mappings are values)."""
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys (dotted) whose values differ, except those RESUMABLE."""
    a, b = flat(saved), flat(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [k for k in keys if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]


def training_part(config: dict[str, Any]) -> dict[str, Any]:
    """A config's YAML form less what does not change what a run trains (what reuse compares): the sections that
    evaluate, compare and search, and output_dir (where the run is, not what it is: a run folder moved or copied
    is still that run)."""
    return {k: v for k, v in config.items() if k not in NOT_TRAINED}


def saved_config(output_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as this version reads it, for what reuse and resume compare (the training
    sections; output_dir, evaluation, compare, budget and frontier come back at their defaults): an option added since
    the run was written takes its default, so the run stays reusable and resumable across that addition.
    (A new option's default keeps what the version before it did; a change of behaviour comes with a new
    version, which the run's recorded inputs name.) A file this version cannot read (an option removed
    since) comes back as written: it then differs from any current config."""
    saved = read_run_config(output_dir) or {}
    # the sections reuse and resume ignore are left out, so that a preset renamed under compare or a grid
    # that no longer parses cannot make the run unreadable
    try:
        return yaml.safe_load(yaml.safe_dump(from_dict(ForgetlessConfig, training_part(saved)).to_dict()))
    except Exception as exc:  # anything this version cannot read is a difference, never a crash
        logger.debug("%s: read as written (%s: %s)", output_dir, type(exc).__name__, exc)
        return saved


def set_aside(output_dir: Path) -> Path:
    """Move a run folder out of the way, next to it (NAME.replaced-N, the first free N), and return where it
    went: a run forgetless would otherwise train over is kept, never deleted."""
    output_dir = Path(output_dir).expanduser()
    n = 1
    while (aside := output_dir.with_name(f"{output_dir.name}.replaced-{n}")).exists():
        n += 1
    output_dir.rename(aside)
    return aside


def check_resume(output_dir: Path, config_dict: dict[str, Any], inputs: dict[str, Any]) -> str:
    """The checkpoint to resume from, after checking the run is the same one; else a ConfigError."""
    output_dir = Path(output_dir).expanduser()
    saved_path = output_dir / CONFIG
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {output_dir} has no {CONFIG} (the run stopped before it started training); "
                          "start again with --overwrite")
    saved = saved_config(output_dir)
    current = yaml.safe_load(yaml.safe_dump(config_dict))  # as it reads back from the file
    differing = config_differences(saved, current)
    if differing:
        shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
        raise ConfigError(f"--resume: the config differs from the run's own {saved_path} in {shown}; resume with "
                          "the same settings, or start again with --overwrite")
    marker = output_dir / MARKER
    old_inputs = read_run_json(marker).get("inputs") if marker.is_file() else None
    if old_inputs is not None:
        changed = changed_inputs(old_inputs, inputs)
        if changed:
            raise ConfigError(f"--resume: {', '.join(changed)} changed since the run in {output_dir} started; "
                              "a resumed run would mix them. Start again with --overwrite")
    checkpoint = latest_checkpoint(output_dir / CHECKPOINTS)
    if checkpoint is None:
        raise ConfigError(f"--resume: no complete checkpoint in {output_dir / CHECKPOINTS} (train.save_steps: 0 saves "
                          "only at the end, or the run stopped before its first save); start again with --overwrite")
    return checkpoint


def checkpoint_state(checkpoint: str | Path) -> tuple[int, dict[str, dict]]:
    """What a resume reads of a checkpoint's trainer_state.json: (the optimizer steps it was saved after, each
    saved callback's attributes by class name: forgetless's RunTally and ForgettingCurve, absent from a
    checkpoint written before they were saved)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    callbacks = state.get("stateful_callbacks") or {}
    return int(state["global_step"]), {name: (saved or {}).get("attributes") or {} for name, saved in callbacks.items()
                                        if isinstance(saved, dict)}


def metrics_rows(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's rows (each with its line as written); a line that is not JSON (cut short by a kill, or
    edited by hand) is left out with a warning naming it, and so, silently, is one that is not a mapping."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            logger.warning("%s: line %d is not JSON; left out", path, number)
            continue
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def trim_metrics(output_dir: Path, step: int) -> None:
    """metrics.jsonl back to the checkpoint's step: the resumed run logs the later steps again, and its end of
    training (the row Trainer logs when training ends, `train_runtime`: a run killed after its last checkpoint
    may have logged it already)."""
    path = Path(output_dir) / METRICS
    if not path.is_file():
        return
    kept = [line for line, row in metrics_rows(path) if row.get("step", 0) <= step and "train_runtime" not in row]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def save_aside(output_dir: Path, save: Callable[[Path], None], is_main: bool = True,
               barrier: Callable[[], None] = lambda: None) -> None:
    """`save(folder)` writes into a fresh folder beside the run (on every process: an engine may write
    shards from each); then the main process renames each entry into place. A kill part-way leaves no
    train_summary.json, so the run never reads as finished. `barrier`: every process waits there."""
    output_dir = Path(output_dir)
    aside = output_dir / ".saving"
    if is_main:
        shutil.rmtree(aside, ignore_errors=True)
    barrier()
    save(aside)
    barrier()
    if not is_main:
        return
    for item in sorted(aside.iterdir()):
        target = output_dir / item.name
        if target.is_dir():  # os.replace renames over a file, not over a folder
            shutil.rmtree(target)
        elif item.is_dir() and target.exists():
            target.unlink()
        os.replace(item, target)
    aside.rmdir()


def reusable_summary(config, holdout: int = 0) -> dict | None:
    """The summary of a finished run in config.output_dir trained with the same config (what it trains:
    evaluation, compare, budget and frontier aside) and the same inputs by content (data files, model, resolved
    dtype, device kind, forgetless version, examples held out: `holdout`), else None. A run whose config.yaml or
    summary is damaged is not reused (its caller sets it aside, whole, and trains the run again), with a warning
    naming the file."""
    out = Path(config.output_dir).expanduser()
    if not is_finished(out) or not (out / CONFIG).is_file():
        return None
    try:
        saved, summary = saved_config(out), read_run_json(out / SUMMARY)
    except ConfigError as exc:
        logger.warning("%s: not reused: %s", out, exc)
        return None
    if training_part(saved) != training_part(yaml.safe_load(yaml.safe_dump(config.to_dict()))):
        return None
    if "merged_dir" in summary:  # where the run lies now (it may have been moved since it was written)
        summary["merged_dir"] = str(out / "merged")
    old, new = summary.get("inputs"), run_inputs(config, holdout)
    if old is None or changed_inputs(old, new):
        logger.info("%s: its inputs changed (%s); training it again", out,
                    ", ".join(changed_inputs(old, new)) if old else "not recorded by an older forgetless")
        return None
    return summary


def check_same_base(run_dir: Path, config) -> None:
    """Refuse to evaluate a run against a base it was not trained from (`eval --run`). Its config.yaml and
    adapter config are read first, so a damaged one stops `eval` before any model is loaded or evaluated."""
    run_dir = Path(run_dir).expanduser()
    saved = read_run_model(run_dir)
    if (run_dir / "adapter_config.json").is_file():
        read_adapter_config(run_dir)
    summary = read_run_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
    recorded = (summary.get("inputs") or {}).get("model")
    if recorded is not None:
        if recorded != model_identity(config.model):
            raise ConfigError(f"--run {run_dir} was trained from {recorded['name_or_path']} (files "
                              f"{recorded['files'][:12]}), not from this config's model.name_or_path "
                              f"{config.model.name_or_path!r} as it is now; evaluate it with the config it was "
                              f"trained with ({run_dir / CONFIG})")
        return
    if saved is not None:  # a run from an older forgetless: compare the names
        if (saved.get("name_or_path"), saved.get("revision")) != (config.model.name_or_path, config.model.revision):
            raise ConfigError(f"--run {run_dir} was trained from model.name_or_path {saved.get('name_or_path')!r}, "
                              f"not this config's {config.model.name_or_path!r}; evaluate it with its own "
                              f"{run_dir / CONFIG}")


def write_summary(output_dir: Path, summary: dict[str, Any]) -> None:
    """The one writer of OUTPUT_DIR/train_summary.json. Written last, and whole (tmp + rename): its
    presence marks a finished run."""
    write_json_atomic(Path(output_dir) / SUMMARY, summary, indent=2)


def write_run(output_dir: Path, save: Callable[[Path], None], summary: dict[str, Any], config=None,
              metrics: Path | None = None, files: dict[str, Any] | None = None, merge: bool = False,
              is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> None:
    """The one writer of a finished run's folder: train's run and budget's chosen model alike. In an order a
    kill may stop anywhere without leaving a folder that reads as finished:
      1. the weights and tokenizer: `save(folder)` writes them into a folder beside the run, on every process
         (an engine may gather shards collectively; `save` writes what its own process should), `metrics` (a
         metrics.jsonl from another folder: the run these weights were trained in) beside them; the main
         process renames them into place (save_aside);
      2. config.yaml (`config`; train writes it when the run starts too, for --resume), written whole;
      3. `merge`: a LoRA run's adapter folded into a full model, from the saved adapter, into merged/ the same
         way (summary["merged_dir"] says where);
      4. `files` (name -> JSON-able, e.g. budget.json), each written whole;
      5. train_summary.json (write_summary), last: it marks the run finished.
    The main process alone writes (`is_main`); every process waits at `barrier`, and returns when the folder
    is whole."""
    output_dir = Path(output_dir)

    def save_with_metrics(folder: Path) -> None:
        save(folder)
        if is_main and metrics is not None and Path(metrics).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(metrics, folder / METRICS)

    save_aside(output_dir, save_with_metrics, is_main=is_main, barrier=barrier)
    if is_main:
        if config is not None:  # before the merge: the adapter's base is loaded as this config says
            tmp = output_dir / f".{CONFIG}.tmp"
            dump_config(config, tmp)
            os.replace(tmp, output_dir / CONFIG)
        if merge:  # from the saved adapter, which holds the whole weights whatever the engine sharded
            merged, tokenizer = load_trained(output_dir, device="cpu")
            merged = merged.merge_and_unload()

            def save_merged(folder: Path) -> None:
                merged.save_pretrained(str(folder / "merged"))
                tokenizer.save_pretrained(str(folder / "merged"))

            save_aside(output_dir, save_merged)
            summary["merged_dir"] = str(output_dir / "merged")
        for name, value in (files or {}).items():
            write_json_atomic(output_dir / name, value, indent=2)
        write_summary(output_dir, summary)
    barrier()


def copy_run_files(run_dir: Path) -> Callable[[Path], None]:
    """A `save` for write_run that takes a finished run's weights and tokenizer, byte for byte: its top-level
    files but its marker, config.yaml, metrics and summary (write_run writes those of the new run)."""
    def save(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for item in sorted(Path(run_dir).iterdir()):
            if item.is_file() and item.name not in (MARKER, CONFIG, METRICS, SUMMARY):
                shutil.copy2(item, folder / item.name)

    return save

"""The training recipe, a straight line: config -> data -> model -> ForgetlessTrainer -> outputs.

OUTPUT_DIR after a run:
  adapter_config.json + adapter_model.safetensors (LoRA)  or  config.json + model.safetensors (full)
  tokenizer files, config.yaml (the resolved config), metrics.jsonl, train_summary.json (written last)
  tensorboard/       with train.report_to: tensorboard (unless TENSORBOARD_LOGGING_DIR says elsewhere)
  merged/            (LoRA with merge: true) a full model with the adapter folded in
  checkpoints/       Trainer checkpoints, for --resume
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from forgetless import data as data_mod
from forgetless.config import ForgetlessConfig, dump_config
from forgetless.curve import ForgettingCurve
from forgetless.environment import environment_kept
from forgetless.errors import ConfigError, TrainingError
from forgetless.identity import digest, run_inputs
from forgetless.memory import peak_memory
from forgetless.model import load_for_training, load_trained, resolve_dtype  # noqa: F401  (load_trained: public here too)
from forgetless import registry
from forgetless.regularizers import Regularizer
from forgetless.replay import ReplaySource
from forgetless.run_folder import (CHECKPOINTS, METRICS, SUMMARY, check_output_dir, check_resume,  # noqa: F401
                                   checkpoint_state, is_finished, is_run, latest_checkpoint, prepare_output_dir,
                                   reusable_summary, save_aside, set_aside, stopped_with_checkpoint, trim_metrics,
                                   write_run, write_summary)
from forgetless.schema import closest
from forgetless.sections import TrainingSettings
from forgetless.trainer import ForgetlessTrainer, MetricsFileCallback

with environment_kept():  # forgetless.environment: importing transformers writes TORCHINDUCTOR_CACHE_DIR
    from transformers import TrainingArguments, set_seed
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    summary: dict[str, Any]


def build_method(config: ForgetlessConfig) -> tuple[list[Regularizer], ReplaySource | None]:
    """The run's training terms (one per `regularizers:` entry) and its replay source (a data source)."""
    regularizers = [registry.build(options) for options in config.regularizers]
    replay = ReplaySource(config.replay, config.data) if config.replay is not None else None
    return regularizers, replay


def check_transformers_names(settings: TrainingSettings) -> None:
    """train.lr_scheduler, train.optim and train.report_to name things transformers defines: checked against its
    lists before the model loads, one line naming the key (TrainingArguments or Trainer would raise after it)."""
    reporters = settings.report_to if isinstance(settings.report_to, list) else [settings.report_to]
    for key, values, known in (("lr_scheduler", [settings.lr_scheduler], [s.value for s in SchedulerType]),
                               ("optim", [settings.optim], [o.value for o in OptimizerNames]),
                               ("report_to", reporters, ["none", "all", *INTEGRATION_TO_CALLBACK])):
        for value in values:
            if value not in known:
                close = closest(value, known)
                hint = f"did you mean '{close}'?" if close else f"one of: {', '.join(known)}"
                raise ConfigError(f"train.{key}: {value!r} is not a name transformers knows; {hint}")


def training_arguments(config: ForgetlessConfig, checkpoint_dir: Path) -> TrainingArguments:
    t = config.train
    dtype = resolve_dtype(config.model)
    # Passed only when on: transformers v5 warns about the old name even when it is False.
    checkpointing = (
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if t.gradient_checkpointing else {}
    )
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers v5: a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_total_limit=t.save_total_limit,
        **checkpointing,
        # the one precision setting is model.dtype: half-precision weights train under mixed precision
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        disable_tqdm=not t.progress_bar,
        remove_unused_columns=False,
        report_to=t.report_to,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # explicit on machines without an accelerator: it is what makes several processes under
        # `accelerate launch` form a gloo process group instead of running as independent copies
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        **t.extra,
    )


def train(config: ForgetlessConfig, overwrite: bool = False, resume: bool = False,
          measure_memory: bool = False, extra_summary: dict[str, Any] | None = None, holdout: int = 0) -> TrainResult:
    """Run one fine-tune as `config` describes and write its outputs. See the module docstring.
    `measure_memory`: the summary gets the training's peak memory (forgetless.memory.peak_memory).
    `extra_summary`: facts the caller adds to train_summary.json (compare: runs trained side by side).
    `holdout`: train on data.train's mixture less its last `holdout` examples, read in memory with their
    sources' formats and tags (budget validates on those: forgetless.data.split_holdout); the run's inputs
    record it (its identity: resume, reuse, caches)."""
    output_dir = Path(config.output_dir).expanduser()
    check_output_dir(output_dir, overwrite, resume)  # before the model loads: fail fast
    check_transformers_names(config.train)
    checkpoint_dir = output_dir / CHECKPOINTS
    set_seed(config.train.seed)

    # the data read before the model loads (a missing file or a bad row is said at once), tokenised after it
    # (the tokenizer decides how it is rendered)
    mixture = data_mod.split_holdout(data_mod.training_records(config.data, config.train.seed), holdout)[0]
    eval_records = data_mod.load_records(data_mod.eval_source(config.data), config.data) if config.data.eval else None
    model, tokenizer, model_path = load_for_training(config.model, config.train.gradient_checkpointing)
    train_ds = data_mod.build_training_dataset(mixture, tokenizer, config.data)
    eval_ds = data_mod.records_dataset(eval_records, tokenizer, config.data) if eval_records is not None else None
    # by content, once the data is read (a Hub dataset is in the local cache now): the run's caches, its
    # resume and its reuse by compare are keyed by it
    inputs = run_inputs(config, holdout)
    resume_from = check_resume(output_dir, config.to_dict(), inputs) if resume else None
    # the checkpoint's step and what forgetless's callbacks saved in it (read once: trimming, tally, curve)
    saved_step, saved = checkpoint_state(resume_from) if resume_from else (0, {})
    regularizers, replay = build_method(config)

    args = training_arguments(config, checkpoint_dir)
    is_main = args.process_index == 0
    # Before any regularizer caches into it. Every process has checked the folder (above) before the main
    # one writes to it, and none goes on before it has.
    args.distributed_state.wait_for_everyone()
    if is_main:
        prepare_output_dir(output_dir, overwrite, resume, inputs)
        if resume_from:
            trim_metrics(output_dir, saved_step)
        dump_config(config, output_dir / "config.yaml")  # before the caches are built: a kill then can resume
    args.distributed_state.wait_for_everyone()
    inputs_key = digest(inputs)
    curve = ForgettingCurve(config, tokenizer, inputs_key) if config.evaluation.every_steps > 0 else None
    trainer = ForgetlessTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=data_mod.collator(tokenizer),
        processing_class=tokenizer,
        regularizers=regularizers,
        replay=replay,
        loss_chunk=config.train.loss_chunk,
        max_nonfinite_steps=config.train.max_nonfinite_steps,
        inputs_key=inputs_key,
        callbacks=[MetricsFileCallback(output_dir / METRICS)] + ([curve] if curve else []),
    )
    if curve:
        curve.attach(trainer)
    tensorboard_into(trainer, output_dir / "tensorboard")

    # a resumed run's summary counts its steps before the resume too (the checkpoint's tally; from a checkpoint
    # written before forgetless kept one: the steps trained from there)
    if resume_from:
        trainer.tally.resume_from(saved.get(type(trainer.tally).__name__, {}), saved_step)
        if curve:
            curve.resume_from(saved.get(type(curve).__name__, {}))
    memory: dict[str, int] = {}
    with peak_memory(memory) if measure_memory else contextlib.nullcontext():
        trainer.tally.start()
        result = trainer.train(resume_from_checkpoint=resume_from)
    counted = result.global_step - trainer.tally.from_step  # the steps the tally's figures cover
    train_seconds = trainer.tally.total_seconds()

    summary: dict[str, Any] = {
        "method": config.method,
        "model": str(model_path),
        "finetune": config.model.finetune,
        "train_examples": len(train_ds),
        "global_steps": result.global_step,
        # the mean step loss over the run, as Trainer's train_loss; each process's own, averaged (None: no step
        # counted, a resume from the last checkpoint of a run written before forgetless kept its tally)
        "train_loss": trainer.run_train_loss(),
        "train_seconds": round(train_seconds, 2),
        "step_time_s": train_seconds / counted if counted else None,
        "inputs": inputs,
    }
    if resume_from:
        summary["resumed_at_step"] = saved_step
        if trainer.tally.from_step:
            summary["counted_from_step"] = trainer.tally.from_step  # train_loss, train_seconds, step_time_s
    if measure_memory:
        summary["peak_mem_bytes"] = memory["peak_bytes"]
    if curve:
        summary["curve_seconds"] = round(curve.seconds, 3)  # a tiny model's few milliseconds are not 0
    summary.update(extra_summary or {})
    if replay is not None:
        summary.update(replay.summary())
    for reg in regularizers:  # post-training steps (WiSE-FT's weight mix) before anything is saved
        summary.update(reg.finalize(trainer.accelerator.unwrap_model(trainer.model)))
    if eval_ds is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]

    bad = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"training produced non-finite weights ({bad[0]} and {len(bad) - 1} more); "
                            "nothing was saved. Lower train.learning_rate or train.max_grad_norm")
    # The finished run's folder, through its one writer (run_folder.write_run): weights and tokenizer aside
    # and renamed into place, the summary last, so a kill part-way never leaves a run that reads as finished.
    # save_model runs on every process: under DeepSpeed ZeRO-3 / FSDP the weights are gathered collectively
    # (Trainer writes on the main one).
    def save(folder: Path) -> None:
        trainer.save_model(str(folder))
        if is_main:
            tokenizer.save_pretrained(str(folder))

    write_run(output_dir, save, summary, config=config, merge=config.merge, is_main=trainer.is_world_process_zero(),
              barrier=trainer.accelerator.wait_for_everyone)
    return TrainResult(output_dir, summary)


def continue_run(config: ForgetlessConfig, **kwargs: Any) -> dict[str, Any]:
    """The run in config.output_dir carried to its end, and its summary: reused when it finished with the
    same config and inputs, resumed from its last checkpoint when it did not, else trained afresh. A run of
    another config or inputs there (finished, or stopped with a checkpoint) is moved aside
    (run_folder.set_aside), not trained over; an unfinished one without a checkpoint holds no training to keep
    and is replaced; anything but a forgetless run is refused. What `budget --resume` and `frontier` do per
    point."""
    summary = reusable_summary(config, kwargs.get("holdout", 0))
    if summary is not None:
        return summary
    return resume_or_train_afresh(config, **kwargs)


def resume_or_train_afresh(config: ForgetlessConfig, **kwargs: Any) -> dict[str, Any]:
    """continue_run past its reuse check, for a caller that has just found the run not reusable (frontier,
    which logs that itself: asking again would say a damaged run's warning twice)."""
    out = Path(config.output_dir).expanduser()
    if why_not_resumed(out, config, kwargs.get("holdout", 0)) is None:
        return train(config, resume=True, **kwargs).summary
    set_aside_kept(out)
    return train(config, overwrite=True, **kwargs).summary


def why_not_resumed(out: Path, config: ForgetlessConfig, holdout: int = 0) -> str | None:
    """None when `out` holds an unfinished run of this config and inputs (`holdout`: as train's) with a checkpoint
    (a resume continues it exactly), else why a resume cannot continue it."""
    if not stopped_with_checkpoint(out):
        return "no unfinished run with a checkpoint there"
    try:
        check_resume(out, config.to_dict(), run_inputs(config, holdout))
    except ConfigError as exc:
        return str(exc)
    return None


def set_aside_kept(out: Path) -> None:
    """Before a run trains into `out` in place of what is there: a run there that its caller will not reuse or
    resume (a finished one, or one stopped with a checkpoint, of another config or inputs) is moved aside
    (run_folder.set_aside), never trained over. Every process looks before the main one moves it, so all take
    the same path through the barriers."""
    state = PartialState()
    finished = is_run(out) and is_finished(out)
    stopped = not finished and stopped_with_checkpoint(out)
    state.wait_for_everyone()
    if (finished or stopped) and state.is_main_process:
        what = "a finished run" if finished else "an unfinished run of other settings, with its checkpoints,"
        logger.warning("%s: %s that is not reused here; moved to %s, training this one afresh", out, what,
                       set_aside(out))
    state.wait_for_everyone()


def tensorboard_into(trainer: ForgetlessTrainer, folder: Path) -> None:
    """TensorBoard logs go to OUTPUT_DIR/tensorboard, not under the checkpoints, unless the user's
    TENSORBOARD_LOGGING_DIR names a folder."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(folder)

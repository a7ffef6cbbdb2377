"""Forgetting budget: the user states how much general capability they accept to lose, forgetless
picks the regularisation strength that stays inside it while keeping as much target gain as it can.

    forgetless train default budget.max_general_drop=0.01      # general-text perplexity +1% at most
    forgetless train default budget.max_drift_kl=0.02          # or: mean token KL(base || tuned) bound

The search, on a validation split (never the data the final figures are reported on):
  - general text: `budget.general_text`, or by default the blocks of each `evaluation.general_text` domain
    *after* its first `evaluation.general_blocks` (which the evaluation reports on), the domains in turn;
  - target task: the last `budget.validation_examples` examples of data.train's mixture, held out from
    training (in memory: each trial trains on the rest, `train(holdout=...)`, with the sources' own formats
    and tags; the trials' inputs record the count).
A candidate passes when its validation perplexity rise (ppl / ppl_base - 1) and/or drift KL stay
within (1 - margin) x the bound(s); among passing candidates the one with the lowest validation
target NLL wins.

Knobs:
  wise_ft (default, cheapest): train once, then mix W_0 + alpha (W_tuned - W_0) (WiSE-FT) for alpha in
    `grid` (default 1, .75, .5, .25) and `refine` bisection steps between the best passing alpha and the
    next failing one. Cost: one training run + (len(grid) + refine) validation passes.
  kl (coef), replay (ratio), l2sp (coef), ewc (coef), replay.weight (any knob of
  forgetless.registry.strengths whose Strength claims to hold the model, `holds`): retrain with each
    strength of `grid`, weakest first, stopping at the first that passes (stronger = less forgetting and
    less gain, so the first passing strength keeps the most gain). Cost: up to len(grid) training runs.
    Knobs without that claim (lfu's lam and alpha, neftune) are refused: map them with `forgetless frontier`.
Finally the chosen model is measured on the held-out test blocks the evaluation uses, and everything
(every candidate, the choice, the held-out check) goes to OUTPUT_DIR/budget.json and the run summary.

OUTPUT_DIR: the chosen model (a normal run, written by the same writer as train's: run_folder.write_run),
budget.json, budget/ (the trial runs).

Under `accelerate launch` every process runs the search: the trials train together (train() is
collective), every process measures its copy of each candidate and all follow the main process's figures
(one decision), and the main process alone writes the shared files while the others wait.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from forgetless.cache import write_json_atomic
from forgetless.config import ForgetlessConfig, with_strength, without_method
from forgetless.registry import knob as registry_knob, main_knob
from forgetless.data import (general_blocks, general_domains, held_out_blocks, load_texts, pack_blocks, paragraphs,
                             split_holdout, task_pairs, training_records)
from forgetless.errors import ConfigError, DataError, TrainingError
from forgetless.evaluate import block_nll_and_drift, continuation_logprobs
from forgetless.replay import row_format
from forgetless.run_folder import METRICS, copy_run_files, read_run_json, write_run
from forgetless.sections import SELF
from forgetless.model import default_device, load_model, load_tokenizer, load_trained, resolve_model_path
from forgetless.regularizers.wise_ft import WeightMixer
from forgetless.train import SUMMARY, check_output_dir, continue_run, prepare_output_dir, train, training_arguments

logger = logging.getLogger(__name__)



def budget_active(config: ForgetlessConfig) -> bool:
    b = config.budget
    return b.max_general_drop is not None or b.max_drift_kl is not None


def check_validation_text(config: ForgetlessConfig) -> None:
    """budget.general_text is never the text the evaluation reports on (a choice made on it would be made on
    the test split) nor the run's replay corpus (replay would be validated on what it trained on)."""
    own = paragraphs(load_texts(config.budget.general_text))
    others = {f"evaluation.general_text ({domain}: {spec})": spec
              for domain, spec in general_domains(config.evaluation.general_text).items()}
    if config.replay is not None and config.replay.data != SELF and row_format(config.replay) == "text":
        others[f"the replay corpus {config.replay.data}"] = config.replay.data
    for what, spec in others.items():
        shared = own & paragraphs(load_texts(spec))
        if shared:
            raise DataError(f"budget.general_text ({config.budget.general_text}) shares {len(shared)} paragraphs with "
                            f"{what} (e.g. {next(iter(shared))[:60]!r}); validate on other text, or leave "
                            "budget.general_text unset (the evaluation's held-out blocks)")


class Validator:
    """Validation measures of a model: general-text perplexity and drift, target NLL."""

    def __init__(self, config: ForgetlessConfig, val_records, tokenizer, base) -> None:
        b, ev = config.budget, config.evaluation
        self.batch_size = ev.batch_size
        self.tokenizer, self.base = tokenizer, base
        if b.general_text:
            check_validation_text(config)
            self.blocks = pack_blocks(load_texts(b.general_text), tokenizer, ev.block_length)[: b.validation_blocks]
            where = b.general_text
        elif ev.general_text:
            # held out from the evaluation: each domain's blocks after those it reports on, the domains in turn
            self.blocks = held_out_blocks(ev.general_text, tokenizer, ev.block_length, ev.general_blocks,
                                          b.validation_blocks)
            where = (f"evaluation.general_text ({', '.join(general_domains(ev.general_text))}) after the first "
                     f"{ev.general_blocks} blocks of each")
        else:
            raise ConfigError("budget: needs general text to validate on: set budget.general_text or evaluation.general_text")
        if len(self.blocks) < 4:
            raise DataError(f"budget: only {len(self.blocks)} validation blocks of {ev.block_length} tokens in {where}; "
                            "give budget.general_text a longer text, or lower evaluation.general_blocks")
        self.pairs, answers = task_pairs(val_records, tokenizer, config.data)
        self.lengths = [len(answer) for answer in answers]
        self.base_ppl, _, self.base_nll = self.measure_raw(base)

    def measure_raw(self, model, base=None) -> tuple[float, float, float]:
        """(perplexity, drift against `base` (0 without), target NLL) on the validation split."""
        nll, drift, _ = block_nll_and_drift(model, self.blocks, self.batch_size, base)
        scores = continuation_logprobs(model, self.tokenizer, self.pairs, self.batch_size, "budget: target NLL")
        return math.exp(sum(nll) / len(nll)), (sum(drift) / len(drift) if drift else 0.0), -sum(scores) / sum(self.lengths)

    def measure(self, model) -> dict[str, float]:
        model.eval()
        ppl, drift, target_nll = self.measure_raw(model, self.base)
        return {"general_ppl": ppl, "general_drop": ppl / self.base_ppl - 1, "drift_kl": drift, "target_nll": target_nll}


def judge(validator: Validator, config: ForgetlessConfig, model, **fields) -> dict[str, Any]:
    """One candidate: its validation measures and whether it is inside the bound(s)."""
    row = {**fields, **validator.measure(model)}
    row["passes"] = passes(row, config)
    if PartialState().num_processes > 1:
        # the main process's figures everywhere: a pass/fail that differed in the last bit between the
        # processes' copies would send them on to different trials, each waiting for the others
        row = broadcast_object_list([row])[0]
    label = ", ".join(f"{k}={v:g}" for k, v in fields.items() if isinstance(v, float))
    logger.info("budget: %s -> ppl %+.2f%%, drift %.4f, target NLL %.4f (%s)", label, 100 * row["general_drop"],
                row["drift_kl"], row["target_nll"], "ok" if row["passes"] else "over")
    return row


def passes(m: dict[str, float], config: ForgetlessConfig) -> bool:
    b = config.budget
    slack = 1 - b.margin
    ok = True
    if b.max_general_drop is not None:
        ok &= m["general_drop"] <= slack * b.max_general_drop
    if b.max_drift_kl is not None:
        ok &= m["drift_kl"] <= slack * b.max_drift_kl
    return bool(ok)


def train_with_budget(config: ForgetlessConfig, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Train as `config` says, with the regularisation strength searched to meet `config.budget`."""
    b = config.budget  # knob, grid and bounds are validated with the config
    out = Path(config.output_dir)
    work = out / "budget"
    # the processes as train() sets them up (under `accelerate launch`: several); one writer, the main one
    args = training_arguments(config, work)
    state = args.distributed_state
    writer = state.is_main_process
    check_output_dir(out, overwrite, resume)  # on every process, before the main one writes anything
    state.wait_for_everyone()
    if writer:
        prepare_output_dir(out, overwrite, resume)
    state.wait_for_everyone()  # the folder is prepared before any process goes on
    # the split, in memory: the trials train on the mixture less its last validation_examples (train's
    # `holdout`: each source's format and tag kept), the search scores those
    n_val = b.validation_examples
    val_records = [record for record, _ in split_holdout(training_records(config.data, config.train.seed), n_val)[1]]

    device = default_device()
    path = resolve_model_path(config.model.name_or_path, config.model.revision)
    tokenizer = load_tokenizer(path)
    base = load_model(config.model, path, device=device).eval()

    def load_candidate(run_dir: str):  # on the base's device, in its precision (see load_trained)
        return load_trained(run_dir, dtype=base.dtype, device=device)[0]

    validator = Validator(config, val_records, tokenizer, base)
    logger.info("budget: base validation ppl %.3f, target NLL %.4f", validator.base_ppl, validator.base_nll)

    def trial_config(name: str, method: ForgetlessConfig) -> ForgetlessConfig:
        cfg = copy.deepcopy(method)  # the config with the trial's strength (config.with_strength)
        cfg.budget.max_general_drop = cfg.budget.max_drift_kl = None
        cfg.output_dir = str(work / name)
        # the processes enter each trial together: train() checks the folder on each of them before the
        # main one prepares it, so one that lagged behind could find it half-written
        state.wait_for_everyone()
        return cfg

    trials: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    knob = main_knob(b.knob)  # one spelling per knob: trial folders and the report do not depend on it
    method_name, strength = registry_knob(knob)  # a registered knob with a monotone claim (checked with the config)
    if not strength.retrains:  # WiSE-FT: one training run, then each alpha is a mix of its weights
        cfg = trial_config("tuned", without_method(config, method_name))
        continue_run(cfg, holdout=n_val) if resume else train(cfg, overwrite=True, holdout=n_val)
        model = load_candidate(cfg.output_dir)
        initial = None if (Path(cfg.output_dir) / "adapter_config.json").exists() else dict(base.state_dict())
        mixer = WeightMixer(model, initial)

        def try_alpha(alpha: float) -> None:
            mixer.set(alpha)
            trials.append(judge(validator, config, model, alpha=alpha))

        for alpha in sorted(b.grid or strength.grid, reverse=True):
            try_alpha(alpha)
        for _ in range(b.refine):
            ok = [t for t in trials if t["passes"]]
            best = min(ok, key=lambda t: t["target_nll"])["alpha"] if ok else 0.0
            above = [t["alpha"] for t in trials if not t["passes"] and t["alpha"] > best]
            if not above:
                break
            try_alpha((best + min(above)) / 2)
        ok = [t for t in trials if t["passes"]]
        if ok:
            chosen = min(ok, key=lambda t: t["target_nll"])
        else:  # alpha = 0 is the base model itself: inside any non-negative bound
            chosen = {"alpha": 0.0, **validator.measure(base), "passes": True}
            trials.append(chosen)
        mixer.set(chosen["alpha"])
        chosen_model = model
        final = with_strength(without_method(config, method_name), knob, chosen["alpha"])
        tuned_dir = Path(cfg.output_dir)

        def save_mixed(folder: Path) -> None:  # the mix in memory; its metrics are the fine-tune's
            model.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))

        save, metrics = save_mixed, tuned_dir / METRICS
        summary = read_run_json(Path(cfg.output_dir) / SUMMARY)
    else:
        option = strength.option
        for value in sorted(b.grid or strength.grid):
            trial = with_strength(config, knob, value)
            cfg = trial_config(f"{knob}-{value:g}", trial)
            continue_run(cfg, holdout=n_val) if resume else train(cfg, overwrite=True, holdout=n_val)
            model = load_candidate(cfg.output_dir)
            row = judge(validator, config, model, **{option: value, "run": cfg.output_dir})
            trials.append(row)
            if row["passes"]:
                chosen, chosen_model, final = row, model, trial
                break
            del model
        if chosen is None:
            if writer:
                write_json_atomic(out / "budget.json", {"trials": trials}, indent=2)
            raise TrainingError(
                f"budget: no {method_name}.{option} in {sorted(b.grid or strength.grid)} met the bound on validation "
                f"(closest: {min(trials, key=lambda t: t['general_drop'])}); widen budget.grid or use budget.knob=wise_ft. "
                f"Trial runs are kept in {work}"
            )
        # the chosen trial's weights and tokenizer, byte for byte, and its metrics
        save, metrics = copy_run_files(Path(chosen["run"])), Path(chosen["run"]) / METRICS
        summary = read_run_json(Path(chosen["run"]) / SUMMARY)

    # the held-out check: the test blocks the evaluation reports on (not those the search saw)
    held_out = None
    ev = config.evaluation
    if ev.general_text:
        domains = general_blocks(ev.general_text, tokenizer, ev.block_length, ev.general_blocks)
        blocks = torch.cat([reported for reported, _ in domains.values()])
        base_nll, _, _ = block_nll_and_drift(base, blocks, ev.batch_size)
        nll, drift, _ = block_nll_and_drift(chosen_model.eval(), blocks, ev.batch_size, base)
        drop = math.exp(sum(nll) / len(nll) - sum(base_nll) / len(base_nll)) - 1
        mean_drift = sum(drift) / len(drift)
        held_out = {"general_drop": drop, "drift_kl": mean_drift, "blocks": len(blocks),
                    "within_bound": bool((b.max_general_drop is None or drop <= b.max_general_drop)
                                         and (b.max_drift_kl is None or mean_drift <= b.max_drift_kl))}
    report = {
        "knob": knob, "max_general_drop": b.max_general_drop, "max_drift_kl": b.max_drift_kl, "margin": b.margin,
        "base": {"general_ppl": validator.base_ppl, "target_nll": validator.base_nll},
        "validation_blocks": len(validator.blocks), "validation_examples": len(val_records),
        "trials": trials, "chosen": chosen, "held_out": held_out,
    }
    full = [t for t in trials if t.get("alpha") == 1.0]  # wise_ft: the unmixed fine-tune
    if full and validator.base_nll > full[0]["target_nll"]:
        report["target_gain_kept"] = (validator.base_nll - chosen["target_nll"]) / (validator.base_nll - full[0]["target_nll"])
    summary["budget"] = {k: report[k] for k in ("knob", "chosen", "held_out")}
    # the chosen model as a normal run, through the one writer of a finished run's folder: weights aside and
    # renamed into place (the main process's copy), config.yaml, budget.json, the summary last; the other
    # processes wait, and the output is whole when any process returns
    write_run(out, save if writer else (lambda folder: None), summary, config=final, metrics=metrics,
              files={"budget.json": report}, merge=final.merge, is_main=writer, barrier=state.wait_for_everyone)
    logger.info("budget: chose %s; held-out general-text ppl %+.2f%% (bound %s)", chosen,
                100 * held_out["general_drop"] if held_out else math.nan, b.max_general_drop)
    return report

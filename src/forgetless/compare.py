"""`forgetless compare`: train each method from the same base, data, seed and step budget, evaluate
the base and every result with the same suite, and write report.md, report.json and PNG plots.

OUTPUT_DIR/<method>/   one training run per method (reused when finished with the same config), with
                       compare_eval.json: its suite results (reused while the run and the suite are the same)
OUTPUT_DIR/base_eval.json  the base model's suite results (likewise)
OUTPUT_DIR/base_answers.json  the base's greedy instruction answers, which every evaluation scores (likewise)
OUTPUT_DIR/report.md   the table;  report.json   every figure with its n and 95% interval (forgetless.stats)
OUTPUT_DIR/tradeoff.png, OUTPUT_DIR/measures.png

`jobs` > 1 trains and evaluates that many runs at a time in worker processes (spawned, each on the
run's device; the base's evaluation is one of their jobs): for small models on a GPU, which one run
leaves mostly idle. Step times are then
measured under that contention, and the report says so.
The workers exit with this process (`forgetless.workers`): a killed comparison leaves none training on.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
import statistics
import time
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any, Callable

import torch

from forgetless.cache import write_json_atomic, write_text_atomic
from forgetless.config import ForgetlessConfig, resolve_runs
from forgetless.data import source_spec, train_sources
from forgetless.evaluate import (base_answers, check_disjoint, evaluate, evaluate_run, generation_batch,
                                 know_base_answers, load_base, merges_for_evaluation)
from forgetless.identity import evaluation_inputs, source_digest
from forgetless.model import resolve_dtype, resolve_model_path
from forgetless.run_folder import metrics_rows, reusable_summary, stopped_with_checkpoint
from forgetless import stats
from forgetless.train import set_aside_kept, train, why_not_resumed
from forgetless.workers import worker_pool

logger = logging.getLogger(__name__)

# The report's measures, their columns, paired differences and plots: forgetless.stats.MEASURES, one entry each.
# Everything below reads that table when it runs (never a copy taken at import), so an entry added to it is shown.


def shown_measures() -> list[stats.Measure]:
    """The results table's and the plot's measures, in the table's order."""
    return [m for m in stats.MEASURES.values() if m.header]


def paired_measures() -> dict[str, stats.Measure]:
    """key -> measure of those with paired differences, in the table's order (per-domain general-text measures
    are added for each domain measured: stats.domain_measures)."""
    return {m.key: m for m in stats.MEASURES.values() if m.vs}


def compared_runs(config: ForgetlessConfig, root: Path) -> dict[str, ForgetlessConfig]:
    """name -> config of every compared run (config.resolve_runs), each in its folder under `root`."""
    runs = {}
    for name, cfg in resolve_runs(config).items():
        cfg = copy.deepcopy(cfg)
        cfg.output_dir = str(root / name)
        # the suite measures the target (evaluation.task) for every model alike; the Trainer's own pass
        # over data.eval after training would repeat it (~45 s a run on the default)
        cfg.data.eval = None
        runs[name] = cfg
    return runs


def per_seed(cfg: ForgetlessConfig, seeds: list[int]) -> dict[int, ForgetlessConfig]:
    """One config per seed (its own folder), or the config itself for its train.seed."""
    if not seeds:
        return {cfg.train.seed: cfg}
    out = {}
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.train.seed = seed
        c.output_dir = str(Path(cfg.output_dir) / f"seed-{seed}")
        out[seed] = c
    return out


def run_compare(config: ForgetlessConfig, overwrite: bool = False, jobs: int = 1) -> dict[str, Any]:
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    configs = compared_runs(config, root)
    replays = {(cfg.replay.data, cfg.replay.format, cfg.replay.text_field): cfg.replay for cfg in configs.values()
               if cfg.replay is not None}
    check_disjoint(config.evaluation, config.data, [source_spec(s) for s in train_sources(config.data)],
                   list(replays.values()))

    seeds = list(config.compare.seeds) or [config.train.seed]
    # seed by seed: a comparison stopped part-way leaves whole seeds of every method behind
    per_run = {name: per_seed(cfg, config.compare.seeds) for name, cfg in configs.items()}
    jobs_list = [(name, seed, per_run[name][seed]) for seed in seeds for name in configs]
    suite = Suite(config, root)
    runs: dict[str, dict[int, dict]] = {name: {} for name in configs}
    results: dict[str, Any] = {}
    evaluated: dict[tuple[str, int], dict] = {}
    if jobs <= 1:
        for i, (name, seed, cfg) in enumerate(jobs_list, start=1):
            runs[name][seed] = train_or_reuse(cfg, overwrite, f"[{i}/{len(jobs_list)}] {name} (seed {seed})")
        # after training: the base model loaded beside a training run would count in its peak memory
        results["base"] = suite.base_results(overwrite)
        logger.info("evaluating %d fine-tuned models (each reused while its run and the suite are unchanged)",
                    len(jobs_list))
        for name, seed, cfg in jobs_list:
            evaluated[name, seed] = suite.run_results(f"{name}@{seed}", cfg, runs[name][seed], overwrite)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        logger.info("training and evaluating %d runs, %d at a time (worker processes, %d threads each)",
                    len(jobs_list), jobs, threads)
        started = time.perf_counter()
        failed: list[tuple[str, int, BaseException]] = []
        with worker_pool(jobs) as pool:
            # the base is evaluated in a worker too, beside the first runs: here it would leave the pool's other
            # workers idle until it finished (the workers measure their own memory)
            base = pool.submit(_base_in_worker, config, overwrite, threads)
            futures = {pool.submit(_job_in_worker, config, name, seed, cfg, overwrite, threads, jobs): (name, seed)
                       for name, seed, cfg in jobs_list}
            done = 0
            for future in as_completed([base, *futures]):
                if future is base:
                    try:
                        results["base"] = base.result()
                    except Exception:  # nothing can be compared without it: stop what has not started
                        logger.error("the base model's evaluation failed; runs not yet started are cancelled, "
                                     "those running finish and are kept")
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
                    logger.info("base model evaluated (%.0f s so far)", time.perf_counter() - started)
                    continue
                done += 1
                name, seed = futures[future]
                try:
                    runs[name][seed], evaluated[name, seed] = future.result()
                except Exception as exc:  # the other runs go on: what finishes is kept and reused next time
                    logger.error("[%d/%d] %s (seed %d) failed: %s", done, len(jobs_list), name, seed, exc)
                    failed.append((name, seed, exc))
                    continue
                logger.info("[%d/%d] %s (seed %d) trained and evaluated (%.0f s so far)", done, len(jobs_list),
                            name, seed, time.perf_counter() - started)
        if failed:
            logger.error("%d runs failed: %s; the first error follows", len(failed),
                         ", ".join(f"{name} (seed {seed})" for name, seed, _ in failed))
            raise failed[0][2]
    results.update({name: {seed: evaluated[name, seed] for seed in seeds} for name in configs})
    path = resolve_model_path(config.model.name_or_path, config.model.revision)

    report = {
        "base_model": str(path), "methods": list(configs), "seeds": seeds,
        "run_settings": {name: {"regularizers": cfg.to_dict()["regularizers"], "replay": cfg.to_dict()["replay"],
                                "overrides": config.compare.runs.get(name)} for name, cfg in configs.items()},
        "runs": {name: summarise_runs(by_seed) for name, by_seed in runs.items()},
        "results": {"base": summarise_results({seeds[0]: results["base"]}),
                    **{name: summarise_results(by_seed) for name, by_seed in results.items() if name != "base"}},
        "paired": paired_differences(results, list(configs), config.compare.paired_with),
        "paired_with": list(config.compare.paired_with),
        "per_seed": {name: results[name] for name in configs},
        "settings": {"seed": config.train.seed, **report_settings(config),
                     # runs that trained side by side (compare's jobs), as each run's summary records it
                     "runs_at_a_time": max(summary.get("runs_at_a_time", 1) for by_seed in runs.values()
                                           for summary in by_seed.values())},
    }
    report["curves"] = {name: read_curve(Path(cfg.output_dir)) for name, seed, cfg in jobs_list if seed == seeds[0]}
    # what every run shares, in full: a later report is joined to this one only when they are equal
    # (scripts/rerender_report.py --add); each run's own changes are in run_settings
    report["training"] = shared_training(config)
    report["evaluation"] = config.to_dict()["evaluation"]
    report["inputs"] = shared_inputs(config)
    mark_comparisons(report)
    write_json_atomic(root / "report.json", report, indent=2)
    write_text_atomic(root / "report.md", render_markdown(report))
    plot(report, root)
    return report


def report_settings(config: ForgetlessConfig) -> dict[str, Any]:
    """The training settings a report names in its heading, which every method of a comparison shares."""
    return {"max_steps": config.train.max_steps, "epochs": config.train.epochs,
            "batch_size": config.train.batch_size, "finetune": config.model.finetune,
            "train_data": ", ".join(f"{source_spec(s)} x{s.weight:g}" if s.weight != 1 else source_spec(s)
                                    for s in train_sources(config.data))}


# options that change how a run is logged or saved, never what it learns; the seed is compare's seeds, the
# model is named by its files (shared_inputs), data.eval is not read by a compared run
_NOT_SHARED = {"train": ("progress_bar", "logging_steps", "save_steps", "save_total_limit", "report_to", "seed"),
               "model": ("name_or_path", "revision"), "data": ("eval",)}


def shared_training(config: ForgetlessConfig) -> dict[str, Any]:
    """The model, data and train options every compared run starts from (before its own overrides), less
    the bookkeeping ones (_NOT_SHARED)."""
    full = config.to_dict()
    return {part: {k: v for k, v in full[part].items() if k not in _NOT_SHARED[part]}
            for part in ("model", "data", "train")}


def shared_inputs(config: ForgetlessConfig) -> dict[str, Any]:
    """What every compared run and the base's evaluation read, by content: the model's files, the training
    and evaluation data, the resolved dtype and device kind, the forgetless version (forgetless.identity)."""
    evaluation = evaluation_inputs(config)
    inputs = {"forgetless": evaluation["forgetless"], "model_files": evaluation["model"]["files"],
              "dtype": evaluation["dtype"], "device": evaluation["device"],
              "train_data": {spec: source_digest(spec) for spec in map(source_spec, train_sources(config.data))},
              "evaluation_data": evaluation["data"]}
    return {**inputs, **mc_scoring(config)}


def mc_scoring(config: ForgetlessConfig) -> dict[str, str]:
    """How the suite scores multiple choice, for a stored evaluation's key and report.json's inputs: each
    question's context run once for all its choices since forgetless 0.3.0 (evaluate.choice_logprobs; figures
    equal to float rounding, but a near tie may go the other way, so one scored before is not reused or joined)."""
    return {"mc_contexts": "shared"} if config.evaluation.mc else {}


def train_or_reuse(cfg: ForgetlessConfig, overwrite: bool, label: str, jobs: int = 1) -> dict:
    """The run's training summary: a finished run of the same config is reused, else it is trained
    (`jobs`: how many runs train side by side, recorded with its step time)."""
    reused = None if overwrite else reusable_summary(cfg)
    if reused is not None and "peak_mem_bytes" in reused:
        logger.info("%s: reusing the finished run in %s", label, cfg.output_dir)
        return reused
    out, extra = Path(cfg.output_dir).expanduser(), {"runs_at_a_time": jobs}
    if not overwrite and stopped_with_checkpoint(out):
        # a comparison stopped part-way (killed, a machine lost) loses at most the steps since a checkpoint
        why = why_not_resumed(out, cfg)
        if why is None:
            logger.info("%s: resuming the unfinished run in %s from its last checkpoint", label, out)
            return train(cfg, resume=True, measure_memory=True, extra_summary=extra).summary
        logger.info("%s: the unfinished run in %s is not resumed: %s", label, out, why)  # kept aside below
    logger.info("%s: training -> %s", label, cfg.output_dir)
    if not overwrite:  # a run not reused (other settings, or no memory figure) nor resumed is kept aside
        set_aside_kept(out)
    return train(cfg, overwrite=True, measure_memory=True, extra_summary=extra).summary


BASE_EVAL = "base_eval.json"
RUN_EVAL = "compare_eval.json"
BASE_ANSWERS = "base_answers.json"


class Suite:
    """The evaluation suite of a comparison, with its results kept beside what they measured: the base's
    in OUTPUT_DIR/base_eval.json, each run's in its folder. A result is reused only while the suite (the
    config's evaluation, data and model sections) and, for a run, its training summary are unchanged, so
    adding a method to a comparison evaluates only that method. The base model loads on first need."""

    def __init__(self, config: ForgetlessConfig, root: Path):
        self.config, self.root = config, root
        self._base = None

    def key(self) -> dict:
        """The suite's settings and, by content, its data files, the base model, dtype, device and version
        (file hashes are memoised: cheap to ask again)."""
        d = self.config.to_dict()
        if d["evaluation"]["generation_batch_size"] is None:  # null generates as before the option existed: the
            del d["evaluation"]["generation_batch_size"]  # results stored then stay reusable
        return {**{k: d[k] for k in ("evaluation", "data", "model")}, "inputs": evaluation_inputs(self.config)}

    def base(self):
        if self._base is None:
            self._base = load_base(self.config)
        return self._base

    def release_base(self) -> None:
        """Free the base model (a worker's next training would count it in its peak memory)."""
        self._base = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def results_key(self) -> dict:
        """A stored evaluation's key: the suite's, and how multiple choice was scored (mc_scoring)."""
        return {**self.key(), **mc_scoring(self.config)}

    def base_results(self, overwrite: bool = False) -> dict:
        return self._cached(self.root / BASE_EVAL, self.results_key, overwrite, lambda: self._sharing_base_answers(
            lambda base, tokenizer: evaluate(base, tokenizer, self.config.evaluation, self.config.data, name="base")))

    def run_key(self, cfg: ForgetlessConfig, summary: dict) -> dict:
        """A run's stored evaluation's key: the suite's, the run's training summary, and whether its adapters are
        merged for the suite (evaluate.merges_for_evaluation: the figures then differ in float32 rounding, so an
        evaluation stored unmerged is not reused as a merged one's, nor the other way)."""
        key = {**self.results_key(), "run": summary}
        if merges_for_evaluation(cfg.output_dir, resolve_dtype(self.config.model)):
            key["adapters"] = "merged"
        return key

    def run_results(self, name: str, cfg: ForgetlessConfig, summary: dict, overwrite: bool = False) -> dict:
        return self._cached(Path(cfg.output_dir) / RUN_EVAL, lambda: self.run_key(cfg, summary), overwrite,
                            lambda: self._sharing_base_answers(
                                lambda base, tokenizer: evaluate_run(self.config, base, tokenizer, cfg.output_dir,
                                                                     name)))

    def _sharing_base_answers(self, compute: Callable) -> dict:
        """compute(base, tokenizer), with the base's greedy instruction answers read from OUTPUT_DIR/
        base_answers.json when it holds this suite's, and written there when it did not. Each evaluation in
        a worker process (compare --jobs) loads the base afresh; without this it would generate the base's
        answers again every time (minutes on a CPU). Keyed like base_eval.json: the suite, its data and the
        base model by content."""
        base, tokenizer = self.base()
        path, stored = self.root / BASE_ANSWERS, None
        try:
            saved = json.loads(path.read_text())
            stored = saved["answers"] if saved.get("key") == json.loads(json.dumps(self.key())) else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # AttributeError: not a mapping
            pass  # none yet, or unreadable: generated (and written) again
        if stored:
            know_base_answers(base, stored, generation_batch(self.config.evaluation))
        results = compute(base, tokenizer)
        answers = base_answers(base)
        if answers and answers != stored:  # keyed as it is after the evaluation, as _cached keys its results
            write_json_atomic(path, {"key": self.key(), "answers": answers})
        return results

    @staticmethod
    def _cached(path: Path, key: Callable[[], dict], overwrite: bool, compute) -> dict:
        if not overwrite and path.exists():
            try:
                saved = json.loads(path.read_text())
                if saved.get("key") == json.loads(json.dumps(key())):  # as it reads back from the file
                    return saved["results"]
            except (ValueError, KeyError, TypeError, AttributeError):  # AttributeError: not a mapping
                pass  # unreadable: measured again
        results = compute()
        # keyed as it is after the evaluation: a Hub dataset it read is in the local cache now, hashed
        write_json_atomic(path, {"key": key(), "results": results})
        return results


_WORKER_SUITE: Suite | None = None  # in a worker process: the suite (its base loaded for each evaluation)


def _base_in_worker(config: ForgetlessConfig, overwrite: bool, threads: int) -> dict:
    """The base model's suite results in a worker process of run_compare's pool (reused when stored)."""
    global _WORKER_SUITE
    torch.set_num_threads(threads)
    if _WORKER_SUITE is None:
        _WORKER_SUITE = Suite(config, Path(config.output_dir))
    try:
        return _WORKER_SUITE.base_results(overwrite)
    finally:  # this worker trains next: its peak memory is the run's, not the run's plus the base's
        _WORKER_SUITE.release_base()


def _job_in_worker(config: ForgetlessConfig, name: str, seed: int, cfg: ForgetlessConfig, overwrite: bool,
                   threads: int, jobs: int) -> tuple[dict, dict]:
    """One compared run in a worker process of run_compare's pool: train (or reuse), then evaluate."""
    global _WORKER_SUITE
    torch.set_num_threads(threads)  # this worker's own process: the pool shares the machine's cores
    if _WORKER_SUITE is None:
        _WORKER_SUITE = Suite(config, Path(config.output_dir))
    summary = train_or_reuse(cfg, overwrite, f"{name} (seed {seed})", jobs)
    try:
        return summary, _WORKER_SUITE.run_results(f"{name}@{seed}", cfg, summary, overwrite)
    finally:  # as in _base_in_worker
        _WORKER_SUITE.release_base()


def read_curve(run_dir: Path) -> list[dict]:
    """The forgetting-curve points a run logged (forgetless.curve), in step order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [row for _, row in metrics_rows(path)]  # a torn line is left out of the curve, with a warning
    keys = ("step", "curve_general_nll", "curve_drift_kl", "curve_target_nll")
    return [{k: r[k] for k in keys if k in r} for r in rows if "curve_target_nll" in r or "curve_drift_kl" in r]


# ---------------------------------------------------------------- seeds and paired differences


def summarise_runs(by_seed: dict[int, dict]) -> dict[str, Any]:
    """A run's training summary; with several seeds, the mean of its numbers over them."""
    summaries = list(by_seed.values())
    if len(summaries) == 1:
        return summaries[0]
    return {k: statistics.fmean(s[k] for s in summaries) for k in summaries[0]
            if all(isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool) for s in summaries)}


def summarise_results(by_seed: dict[int, dict]) -> dict[str, Any]:
    """A model's measures over its seeds, each computed from its per-item values (forgetless.stats): the
    value, its 95% interval (over seeds and items; one seed: over items only, `covers` says which), its df,
    the std of the per-seed values (`seed_std`), n. A measure without items (an old report's mc_acc) is
    the mean of the per-seed values. One seed's other entries are kept as they are (its items included)."""
    results = list(by_seed.values())
    items = [r.get("items", {}) for r in results]
    out: dict[str, Any] = dict(results[0]) if len(results) == 1 else {}
    for key, entry in results[0].items():
        if not (isinstance(entry, dict) and "value" in entry):
            continue
        measure = stats.MEASURES.get(key)
        together = stats.value(items, measure) if measure else None
        per_seed_values = [(stats.value([i], measure) or r[key])["value"] if measure else r[key]["value"]
                           for i, r in zip(items, results)]
        # (an interval another machinery computed, e.g. an old report's bootstrap, is not carried over)
        summary = {"value": statistics.fmean(per_seed_values), "n": entry["n"], "seeds": len(results)}
        if together is not None:
            summary.update(value=together["value"], ci95=together["ci95"], df=together["df"],
                           covers=together["covers"])
        if len(results) > 1:
            finite = all(math.isfinite(v) for v in per_seed_values)  # a measure with nothing to score is NaN
            summary["seed_std"] = statistics.stdev(per_seed_values) if finite else math.nan
        out[key] = summary
    if "general_by_domain" in results[0]:
        out["general_by_domain"] = {}
        domains = stats.domain_measures(items[0])
        for d, fig in results[0]["general_by_domain"].items():
            ppl = domains.get(f"general_ppl@{d}")
            ppl = stats.value(items, ppl) if ppl else None
            drift = domains.get(f"general_drift_kl@{d}")
            drift = stats.value(items, drift) if drift else None
            if ppl is None or drift is None:  # no per-item values: the mean over seeds of each figure
                out["general_by_domain"][d] = {k: statistics.fmean(r["general_by_domain"][d][k] for r in results)
                                               for k in fig}
                continue
            # perplexity as exp(mean NLL over seeds and blocks), as the pooled one and the paired changes
            out["general_by_domain"][d] = {"ppl": ppl["value"], "ppl_ci95": ppl["ci95"], "drift_kl": drift["value"],
                                           "drift_kl_ci95": drift["ci95"], "blocks": fig["blocks"],
                                           "tokens": fig["tokens"]}
    return out


def paired_differences(results: dict, names: list[str],
                       references: list[str] = ("sft",)) -> dict[str, dict[str, dict]]:
    """name -> measure -> {"vs_base": ..., "vs_<ref>": ... for each compared reference run}: the paired
    difference of the measure's statistic over the same items (seed s with seed s; the base serves every
    seed), its 95% interval, two-sided p-value and df (forgetless.stats.item_difference). results: "base" ->
    its evaluation; each name -> seed -> evaluation. A run and a reference must have the same seeds (each
    printed value is over all of its seeds, and a paired difference is the difference of the two)."""
    out: dict[str, dict[str, dict]] = {}
    base_items = results["base"].get("items", {})
    measures = {**paired_measures(), **stats.domain_measures(base_items)}
    for name in names:
        by_seed = results[name]
        seeds = list(by_seed)
        refs = [ref for ref in references if ref in results and ref != name]
        for ref in refs:
            if set(results[ref]) != set(seeds):
                raise ValueError(f"paired differences: {name} has seeds {sorted(seeds)} but the reference {ref} "
                                 f"has {sorted(results[ref])}: pair runs of the same seeds")
        runs = [by_seed[s].get("items", {}) for s in seeds]
        out[name] = {}
        for key, measure in measures.items():
            # not measured, or nothing to pair (e.g. no base answer to score): no entry
            entry = {"vs_base": stats.item_difference(runs, [base_items], measure)}
            if entry["vs_base"] is None:
                continue
            for ref in refs:
                diff = stats.item_difference(runs, [results[ref][s].get("items", {}) for s in seeds], measure)
                if diff is not None:
                    entry[f"vs_{ref}"] = diff
            out[name][key] = entry
    return out


# ---------------------------------------------------------------- many comparisons

def paired_columns() -> list[tuple[stats.Measure, str]]:
    """The main paired table's columns, (measure, reference) for each reference of its `vs`: the measures
    paired with the sft run first (what each method traded against plain fine-tuning), then those paired
    with the base only (what it kept of the base); each group in the table's order."""
    paired = list(paired_measures().values())
    ordered = [m for m in paired if "sft" in m.vs] + [m for m in paired if "sft" not in m.vs]
    return [(m, ref) for m in ordered for ref in m.vs]


def reference_columns() -> list[stats.Measure]:
    """The columns of the table against each further reference run (compare.paired_with besides sft): the
    measures paired with the sft run, first_vs_runs ones leading, else in the table's order."""
    return sorted((m for m in paired_measures().values() if "sft" in m.vs), key=lambda m: not m.first_vs_runs)


def _other_references(report: dict) -> list[str]:
    return [r for r in report.get("paired_with", []) if r != "sft" and r in report["methods"]]


def _domains(report: dict) -> list[str]:
    """The general-text domains the report shows a table of (more than one)."""
    domains = list(report["results"]["base"].get("general_by_domain", {}))
    return domains if len(domains) > 1 else []


def shown_differences(report: dict) -> tuple[list[dict], list[dict]]:
    """The paired-difference entries the report's tables show: (the paired tables: against the base, sft and
    every further reference; the per-domain table). Together they are one family for the Holm correction."""
    paired = report.get("paired", {})

    def get(name: str, measure: str, ref: str) -> dict | None:
        return paired.get(name, {}).get(measure, {}).get(f"vs_{ref}")

    main = [get(name, m.key, ref) for name in report["methods"] for m, ref in paired_columns()]
    main += [get(name, m.key, ref) for ref in _other_references(report) for name in report["methods"]
             if name != ref for m in reference_columns()]
    domain = [get(name, f"general_ppl@{d}", "base") for name in report["methods"] for d in _domains(report)]
    return [e for e in main if e], [e for e in domain if e]


def mark_comparisons(report: dict, alpha: float = 0.05) -> dict:
    """Holm–Bonferroni over one family, every paired difference the report shows (and may star): each shown
    entry gets `p_holm` (adjusted), `holm` (survives at family-wise level alpha) and `excludes_zero` (its
    unadjusted interval does); an entry the report does not show carries none of these (its p-value and
    interval stay). report["comparisons"]: the family's size and how many of it each table shows. Returns
    report."""
    main, by_domain = shown_differences(report)
    shown = {id(e) for e in main + by_domain}
    for by_measure in report.get("paired", {}).values():
        for entries in by_measure.values():
            for entry in entries.values():
                if id(entry) not in shown:
                    for key in ("excludes_zero", "holm", "p_holm"):
                        entry.pop(key, None)
    adjusted = stats.holm([e.get("p", math.nan) for e in main + by_domain])
    for entry, p in zip(main + by_domain, adjusted):
        lo, hi = entry["ci95"]
        entry["p_holm"], entry["holm"], entry["excludes_zero"] = p, bool(p <= alpha), bool(lo > 0 or hi < 0)
    finite = [math.isfinite(p) for p in adjusted]
    report["comparisons"] = {"family": sum(finite), "paired": sum(finite[:len(main)]),
                             "by_domain": sum(finite[len(main):])}
    return report


def holm_threshold(seeds: int, comparisons: int, alpha: float = 0.05) -> float:
    """|mean| / se over seeds that a difference needs to survive Holm's first (strictest) step over this many
    comparisons when its interval is the t over seeds (seeds - 1 df)."""
    return stats.t_quantile(1 - alpha / (2 * max(comparisons, 1)), seeds - 1).item()


# ---------------------------------------------------------------- report


def _value(results: dict, key: str) -> float:
    entry = results.get(key)
    return entry["value"] if isinstance(entry, dict) else math.nan


def _fmt(entry: dict | None, digits: int = 3) -> str:
    """A value with its 95% interval."""
    if not isinstance(entry, dict):
        return "–"
    text = f"{entry['value']:.{digits}f}"
    if "ci95" in entry and all(math.isfinite(x) for x in entry["ci95"]):
        lo, hi = entry["ci95"]
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    elif "seed_std" in entry:  # no items to compute an interval from: mean ± std over seeds
        text += f" ± {entry['seed_std']:.{digits}f}"
    return text


def change_vs_base(results: dict, base: dict, key: str) -> float:
    """A model's value of measure `key` against the base's, in the measure's unit, from the two values alone
    (no interval: the results table's Δ columns and the trade-off plot; paired_differences has those)."""
    unit = stats.MEASURES[key].unit
    value, reference = _value(results, key), _value(base, key)
    if unit == "percent":
        return 100 * (value / reference - 1)
    return 100 * (value - reference) if unit == "points" else value - reference


def _unit_format(unit: str) -> tuple[int, str]:
    """(decimals, suffix) of a change in this unit."""
    return 4 if unit == "nats" else 1, "%" if unit == "percent" else ""


def _diff(entry: dict | None) -> str:
    """A paired difference: mean [95% interval], starred when it survives the Holm correction."""
    if not entry:
        return "–"
    digits, suffix = _unit_format(entry["unit"])
    ci = entry.get("ci95")
    if not ci or not all(math.isfinite(x) for x in ci):  # too few items for an interval (one answer scored)
        return f"{entry['mean']:+.{digits}f}{suffix} (no interval: n={entry.get('n', '?')})"
    lo, hi = ci
    star = " *" if entry.get("holm") else ""
    return f"{entry['mean']:+.{digits}f}{suffix} [{lo:+.{digits}f}, {hi:+.{digits}f}]{star}"


def _results_headers() -> list[str]:
    """The results table's measure columns: each shown measure's, then its change against the base where it
    asks for one (a percentage carries its % in the cell, points say so in the header)."""
    headers = []
    for m in shown_measures():
        headers.append(m.header)
        if m.change:
            headers.append(f"{m.diff} (points)" if m.unit == "points" else m.diff)
    return headers


def _results_cells(results: dict, base: dict) -> list[str]:
    """A model's cells under _results_headers: value [95% interval], and the change against the base."""
    cells = []
    for m in shown_measures():
        cells.append(_fmt(results.get(m.key), m.digits))
        if m.change:
            digits, suffix = _unit_format(m.unit)
            cells.append(f"{change_vs_base(results, base, m.key):+.{digits}f}{suffix}")
    return cells


def _covers_text(seeds: list) -> str:
    if len(seeds) > 1:
        return ("over seeds and items (a t interval from the two-level variance of seeds crossed with items, "
                "forgetless.stats)")
    return ("over items only: one seed, so it does not cover training randomness (another seed can land "
            "outside it)")


def _few_seeds_text(seeds: int, comparisons: int) -> str:
    """The legend's warning when seeds are few: the t over seeds has seeds - 1 df."""
    if not 2 <= seeds <= 5 or comparisons < 1:
        return ""
    return (f" With {seeds} seeds the t over seeds has {seeds - 1} df, so a difference whose interval that t sets "
            f"survives Holm over {comparisons} comparisons only when |mean| is above about "
            f"{holm_threshold(seeds, comparisons):.0f} times its standard error over seeds: few seeds: wide intervals, "
            "few stars.")


def _tiny_domains_text(by_domain: dict, domains: list[str]) -> str:
    """The legend's warning for domains of fewer than 2 items of BLOCK_GROUP blocks: df tiny."""
    tiny = [d for d in domains if by_domain[d].get("blocks", 0) < 2 * stats.BLOCK_GROUP]
    if not tiny:
        return ""
    items = {d: len(stats.block_groups([0.0] * int(by_domain[d]["blocks"]))) for d in tiny}
    listed = ", ".join(f"{d} ({by_domain[d]['blocks']:g} blocks, {items[d]} items)" for d in tiny)
    return f" Fewer than {2 * stats.BLOCK_GROUP} blocks in {listed}: df tiny (items - 1), its intervals are very wide."


def _instructions_text(base: dict) -> list[str]:
    """The base's instruction answers instr NLL scores, and those cut at the budget (not scored)."""
    answers = base.get("instr_base_answers")
    if not answers:
        return []
    return [f"instr NLL scores the base's {answers['scored']} answers to the instructions that ended within "
            f"{answers['max_new_tokens']} new tokens, each with its end-of-sequence token; the {answers['cut']} still "
            "running there (cut) are left out."]


def render_markdown(report: dict) -> str:
    if "family" not in report.get("comparisons", {}):  # a report built before the Holm marks over one family
        report = mark_comparisons(copy.deepcopy(report))
    res, runs = report["results"], report["runs"]
    base = res["base"]
    s = report["settings"]
    seeds = report.get("seeds", [s["seed"]])
    first = runs[report["methods"][0]]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    lines = [
        "# forgetless compare",
        "",
        f"Base model: `{report['base_model']}`; training data `{s['train_data']}`; {s['finetune']} fine-tuning, "
        f"{seed_text}, {first['global_steps']:g} steps of batch {s['batch_size']} for every method.",
        f"Each cell: value [95% interval {_covers_text(seeds)}]; the base's intervals are over items. "
        "Δ is against the base model (accuracies in points, perplexity in %). Target NLL and instr NLL: NLL per "
        "answer token, averaged over answers (nats). Accuracies and clean-end rates are 0/1 per item: one seed's "
        "interval is Wilson's score interval, and a 0/1 measure's item variance is floored by pseudo-observations "
        "(Agresti–Coull for a value, Agresti–Min for a paired difference), so a rate of 0 or 1 still gets a "
        "width. Sample counts are in report.json.",
        "",
    ]
    headers = ["method", *_results_headers(), "step s", "peak mem GiB"]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name in ["base"] + report["methods"]:
        run = runs.get(name, {})
        step = f"{run['step_time_s']:.2f}" if run.get("step_time_s") is not None else "–"
        mem = f"{run['peak_mem_bytes'] / 2**30:.2f}" if run and "peak_mem_bytes" in run else "–"
        lines.append("| " + " | ".join([name, *_results_cells(res[name], base), step, mem]) + " |")
    n = {k: base[k]["n"] for k in ("target_acc", "general_ppl", "mc_acc_norm") if k in base}
    lines += [
        "",
        f"n: target {n.get('target_acc')} questions ({len(base.get('robust_acc_per_template', []))} prompt templates "
        f"for robustness; robust std: spread of accuracy over prompt templates beyond question noise, "
        f"sqrt(max(0, (MS_template - MS_question×template) / questions)) of the question × template table, "
        f"its interval over questions), general text {n.get('general_ppl')} tokens (intervals over contiguous "
        f"groups of {stats.BLOCK_GROUP} blocks: consecutive blocks of a text are not independent; the pooled "
        f"figure's jackknife within each domain: the domains are fixed, not a sample), "
        f"MMLU {n.get('mc_acc_norm')} questions.",
        *_instructions_text(base),
        "Peak memory is the process's (CPU: resident set size, including the Python runtime and libraries).",
    ]
    if s.get("runs_at_a_time", 1) > 1:
        lines.append(f"Runs trained up to {s['runs_at_a_time']} at a time on one machine: step times include that "
                     "contention; compare them with `bench/` figures, not with a run trained alone.")
    lines += report.get("notes", [])  # what a joined report says of its parts (scripts/rerender_report.py)
    paired = report.get("paired", {})
    counts = report["comparisons"]
    columns, against_runs = paired_columns(), reference_columns()
    if paired:
        lines += [
            "",
            "## Paired differences",
            "",
            "Each model answers the same items, so differences are paired: the measure of the run minus that of "
            "the reference on the same items" + (", averaged over seeds (seed s paired with seed s; the base "
            "serves every seed)" if len(seeds) > 1 else "") + f", with its 95% interval {_covers_text(seeds)}. "
            f"* = survives Holm correction over all {counts.get('family', 0)} comparisons starred in this report "
            f"(family-wise 5%, one family: the {counts.get('paired', 0)} differences of this section's tables and the "
            f"{counts.get('by_domain', 0)} of the per-domain table); the intervals shown are unadjusted. Accuracies "
            "in points, perplexity in %, NLL (per answer token, averaged over answers) and drift in nats."
            + _few_seeds_text(len(seeds), counts.get("family", 0)),
            "",
            "| method | " + " | ".join(f"{m.diff} vs {ref}" for m, ref in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for name in report["methods"]:
            p = paired.get(name, {})
            lines.append(f"| {name} | " + " | ".join(_diff(p.get(m.key, {}).get(f"vs_{ref}"))
                                                     for m, ref in columns) + " |")
        for ref in _other_references(report):
            lines += [
                "",
                f"Against `{ref}` (the same measures, paired with its items and seeds; in the same Holm family):",
                "",
                "| method | " + " | ".join(f"{m.diff} vs {ref}" for m in against_runs) + " |",
                "|---|" + "---|" * len(against_runs),
            ]
            for name in report["methods"]:
                if name == ref:
                    continue
                p = paired.get(name, {})
                lines.append(f"| {name} | " + " | ".join(_diff(p.get(m.key, {}).get(f"vs_{ref}"))
                                                         for m in against_runs) + " |")
    domains = _domains(report)
    if domains:
        blocks = base["general_by_domain"][domains[0]]["blocks"]
        lines += [
            "",
            "## General yardstick by domain",
            "",
            "Perplexity (change against the base, paired 95% interval; * = survives Holm correction in the same "
            f"Holm family as the paired differences, all {counts.get('family', 0)} comparisons) and drift KL per "
            f"domain; the pooled figures above weigh every block alike. Each {stats.BLOCK_GROUP} consecutive blocks "
            f"of a domain form one item of its interval (consecutive blocks of one text are not independent): "
            f"{blocks:g} blocks are {len(stats.block_groups([0.0] * int(blocks)))} items, so the intervals are wide."
            + _tiny_domains_text(base["general_by_domain"], domains),
            "",
            "| method | " + " | ".join(f"{d} ppl | {d} drift" for d in domains) + " |",
            "|---|" + "---|---|" * len(domains),
        ]
        tokens = ", ".join(f"{d} {base['general_by_domain'][d]['tokens']:g}" for d in domains)
        for name in ["base"] + report["methods"]:
            by = res[name].get("general_by_domain", {})
            cells = []
            for d in domains:
                change = "" if name == "base" else " " + _diff(paired.get(name, {}).get(f"general_ppl@{d}", {}).get("vs_base"))
                cells += [f"{by[d]['ppl']:.2f}{change}" if d in by else "–", f"{by[d]['drift_kl']:.4f}" if d in by else "–"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"Tokens per domain: {tokens}."]
    settings = report.get("run_settings", {})
    if settings:
        lines += ["", "## Settings of each run", ""]
        for name, entry in settings.items():
            extra = f"; overrides `{json.dumps(entry['overrides'])}`" if entry.get("overrides") else ""
            replay = f"; replay `{json.dumps(entry['replay'])}`" if entry.get("replay") else ""
            lines.append(f"- **{name}**: regularizers `{json.dumps(entry['regularizers'])}`{replay}{extra}")
    lines += ["", "![trade-off](tradeoff.png)", "", "![measures](measures.png)", ""]
    if any(report.get("curves", {}).values()):
        lines += ["![forgetting curve](curve.png)", ""]
    return "\n".join(lines)


def spread_labels(fig, labels: list, points: list[tuple[float, float]], gap_px: float = 2.0,
                  marker_px: float = 7.0, rounds: int = 200) -> None:
    """Move point labels apart vertically until no label overlaps another or a point (methods with close
    figures sit close on the trade-off plot); each keeps a thin line to its point. Greedy: two labels that
    overlap move apart by half the overlap each, a label over a point moves off it, until nothing moves."""
    from matplotlib.text import Text  # matplotlib only where a plot is drawn, as in plot()

    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72  # display pixels per offset point
    ax = labels[0].axes if labels else None
    dots = [ax.transData.transform(p) for p in points if all(map(math.isfinite, p))] if ax is not None else []

    def box(k: int):  # the text alone: an annotation's own extent takes in its line, which grows as it moves
        labels[k].update_positions(renderer)
        return Text.get_window_extent(labels[k], renderer)

    def nudge(k: int, pixels: float) -> None:
        dx, dy = labels[k].xyann
        labels[k].xyann = (dx, dy + pixels / scale)

    for _ in range(rounds):
        moved = False
        for i in range(len(labels)):
            a = box(i)
            for x, y in dots:  # a point's marker: a square of 2 × marker_px around it
                if a.x1 <= x - marker_px or x + marker_px <= a.x0 or a.y1 + gap_px <= y - marker_px \
                        or y + marker_px + gap_px <= a.y0:
                    continue
                up = (a.y0 + a.y1) / 2 >= y
                nudge(i, (y + marker_px + gap_px - a.y0) if up else -(a.y1 + gap_px - (y - marker_px)))
                a, moved = box(i), True
            for j in range(i + 1, len(labels)):
                b = box(j)
                if a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 + gap_px <= b.y0 or b.y1 + gap_px <= a.y0:
                    continue
                lower, upper = (i, j) if (a.y0 + a.y1, i) < (b.y0 + b.y1, j) else (j, i)
                overlap = min(a.y1, b.y1) - max(a.y0, b.y0) + gap_px
                nudge(lower, -overlap / 2)
                nudge(upper, overlap / 2)
                a, moved = box(i), True
        if not moved:
            return


MARKERS = "o^sDv"  # the 1st ten methods, the next ten, ...


def method_style(i: int) -> tuple[str, str, str]:
    """(colour, marker, line style) of a report's i-th method in every plot: matplotlib's ten colours, then the
    same colours again with another marker and a dashed line (bars: hatched), so no two methods look alike."""
    return f"C{i % 10}", MARKERS[(i // 10) % len(MARKERS)], "-" if i < 10 else "--"


def plot(report: dict, root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, methods = report["results"], report["methods"]
    base = res["base"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.scatter([0], [0], color="black", marker="s")
    line = dict(arrowstyle="-", lw=0.6, shrinkA=0, shrinkB=4)
    base_label = ax.annotate("base", (0, 0), textcoords="offset points", xytext=(6, 4),
                             arrowprops=dict(line, color="black"))
    points = {m: (change_vs_base(res[m], base, "target_acc"), change_vs_base(res[m], base, "general_ppl"))
              for m in methods}
    labels, where = [], [(0.0, 0.0)]
    for i, (m, (x, y)) in enumerate(points.items()):
        if not (math.isfinite(x) and math.isfinite(y)):  # a measure missing for this method: no point to draw
            continue
        where.append((x, y))
        colour, marker, _ = method_style(i)
        ax.scatter([x], [y], s=60, color=colour, marker=marker)
        labels.append(ax.annotate(m, (x, y), textcoords="offset points", xytext=(6, 4), color=colour,
                                  fontsize=9, arrowprops=dict(line, color=colour)))
    ax.set_xlabel("target accuracy gain over base (points)")
    ax.set_ylabel("general-text perplexity change (%)  ↓ better")
    ax.set_title("What each method gained vs what it broke")
    ax.margins(x=0.12, y=0.12)
    fig.tight_layout()
    spread_labels(fig, [base_label, *labels], where)
    fig.savefig(root / "tradeoff.png", dpi=120)
    plt.close(fig)

    shown = shown_measures()
    fig, axes = plt.subplots(1, len(shown), figsize=(3.0 * len(shown), 3.6))
    names = ["base"] + methods
    for ax, measure in zip(axes, shown):
        key = measure.key
        values = [_value(res[n], key) for n in names]
        bars = ax.bar(range(len(names)), values, color=["black"] + [method_style(i)[0] for i in range(len(methods))])
        for i, bar in enumerate(bars.patches[1:]):
            if method_style(i)[2] != "-":
                bar.set_hatch("//")
        for i, n in enumerate(names):
            ci = res[n].get(key, {}).get("ci95") if isinstance(res[n].get(key), dict) else None
            if ci and all(math.isfinite(c) for c in ci):
                ax.plot([i, i], ci, color="grey", lw=1.5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{measure.label} {'↑' if measure.higher else '↓'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(root / "measures.png", dpi=110)
    plt.close(fig)

    curves = {m: c for m, c in report.get("curves", {}).items() if any("curve_drift_kl" in p for p in c)}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for i, (m, points) in enumerate(curves.items()):
            # the method's colour in the other plots too (a curve of a method not in the list: its own place)
            colour, marker, style = method_style(methods.index(m) if m in methods else len(methods) + i)
            pts = [p for p in points if "curve_drift_kl" in p and "curve_target_nll" in p]
            ax.plot([p["curve_drift_kl"] for p in pts], [p["curve_target_nll"] for p in pts], linestyle=style,
                    marker=marker, ms=3, color=colour, label=m)
            if pts:
                ax.annotate(f"step {pts[-1]['step']}", (pts[-1]["curve_drift_kl"], pts[-1]["curve_target_nll"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
        ax.set_xlabel("drift KL(base‖model) on held-out general text  → forgetting")
        ax.set_ylabel("target NLL on held-out questions  ↓ learning")
        ax.set_title("Forgetting curve: learning against forgetting over the steps")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(root / "curve.png", dpi=120)
        plt.close(fig)

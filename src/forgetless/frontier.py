"""`forgetless frontier CONFIG`: what each method keeps and breaks across its strengths, on a validation split.

    forgetless frontier default                                    # sft, kl, ewc, l2sp, lfu-fast, wise-ft
    forgetless frontier default frontier.methods=[sft,kl,wise-ft] 'frontier.grids={kl: [0.1, 1.0]}'
    forgetless frontier default frontier.methods=[lfu-fast] 'frontier.knobs={lfu-fast: lfu.alpha}'
    forgetless frontier default --jobs 4                           # 4 points train at a time (a GPU)

For each method of `frontier.methods` (a preset), each strength of its grid: the preset with that strength
(config.with_strength on the preset's knob: `frontier.knobs.<method>` if given, one of config.preset_knobs,
else config.preset_knob: its first knob that claims to hold the model, else its first: LfU's lam), trained on data.train less budget's validation examples (train(holdout=...)) into
OUTPUT_DIR/frontier/<method>/<value> (<knob>-<value> for a knob that is not the preset's default), then measured on budget's validation split (budget.Validator: the last
`budget.validation_examples` training examples, and general-text blocks the evaluation never reports on).
Never the test split: the points train without data.eval and without the forgetting curve (both read test data).
  - the grid: `frontier.grids.<method>`, else the knob's registered Strength grid, weakest first (a retraining
    knob: ascending; a mix applied after training, WiSE-FT's alpha: descending from 1 = the plain fine-tune);
  - sft: one point, the reference; a preset without a knob (dft, ...): one point, at its preset;
  - a knob that does not retrain (WiSE-FT): one fine-tune, each alpha a mix W0 + alpha (W - W0) of it
    (regularizers.wise_ft.WeightMixer, as budget does); that fine-tune is sft's own run when the preset
    less its mix trains like sft (wise-ft: it does), so it costs no run.
Cost: training runs = 1 (sft) + the grid sizes of the retraining methods (+1 for a WiSE-FT preset whose
fine-tune is not sft's); default: 1 + kl 4 + ewc 3 + l2sp 3 + lfu-fast 3 = 14 runs, and 1 + 18 validation
passes (the base, then each point). Finished runs are reused (run_folder.reusable_summary, as compare and
`budget --resume` do: same config and inputs by content), an unfinished one resumed from its last checkpoint
(train.continue_run); a rerun trains nothing that finished. --overwrite trains every point again.

Writes OUTPUT_DIR/frontier.json (every point, both Pareto sets, each method's choices, the rules) and
OUTPUT_DIR/frontier.png (an earlier frontier.json with a point this call lacks is kept: keep_earlier). The axes (validation, against the base model):
  target gain   = base target NLL - the point's target NLL (nats per answer token; higher: learned more)
  general_drop  = general-text perplexity / the base's - 1 (plotted as the NLL change, log(1 + general_drop))
  drift_kl      = mean token KL(base || point) on that text
Pareto sets, over every point of every method, one per forgetting axis: a point is in the set when no other
point has a target gain >= its own and a forgetting <= its own, with one of the two strictly (equal points
are all kept). Each method's choices:
  within_bound  the point inside `frontier.max_general_drop` and/or `frontier.max_drift_kl` (each bound as
                stated, on the validation figures; none set: every point passes) with the lowest target NLL;
                ties: the least forgetting, then the weakest strength. None when no point is inside.
  matches_sft   the point whose target NLL <= SFT's + sft_tolerance x |SFT's target gain| with the least
                forgetting; ties: the lower target NLL, then the weakest strength.
"Forgetting" orders by general_drop then drift_kl, or drift_kl first when only max_drift_kl is set.

With `frontier.evaluate_chosen`, each method's `frontier.evaluate_rule` choice is then trained on the whole
training set and compared with sft on the test split by `forgetless compare` itself (compare.run_compare,
with compare.runs set to the chosen points): OUTPUT_DIR/chosen/ holds its runs, report.md, report.json (the
suite's figures with their paired 95% intervals) and plots; one training run and one suite evaluation per
method, reused like compare's.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import math
import os
import re
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from forgetless.budget import Validator
from forgetless.cache import write_json_atomic, write_text_atomic
from forgetless.compare import run_compare
from forgetless.config import (ForgetlessConfig, method_config, preset_knob, validate, with_strength,
                               without_method)
from forgetless.data import source_spec, split_holdout, train_sources, training_records
from forgetless.errors import ConfigError
from forgetless.evaluate import check_disjoint
from forgetless.model import default_device, load_model, load_tokenizer, load_trained, resolve_model_path
from forgetless.registry import Strength, entry
from forgetless.registry import knob as registry_knob
from forgetless.regularizers.wise_ft import WeightMixer
from forgetless.run_folder import reusable_summary
from forgetless.sections import RUN_NAME, FrontierConfig
from forgetless.train import resume_or_train_afresh, train
from forgetless.workers import worker_pool

logger = logging.getLogger(__name__)

FORGETTING = ("general_drop", "drift_kl")


# ---------------------------------------------------------------- the grid


def weakest_first(strength: Strength, values) -> list[float]:
    """`values` weakest first: a retraining knob's ascending (0: no pull), a mix's descending (1: no mix)."""
    return sorted({float(v) for v in values}, reverse=not strength.retrains)


def grid(config: ForgetlessConfig) -> dict[str, tuple[str | None, list[float | None]]]:
    """method -> (its knob, the strengths it is trained at, weakest first); sft first, once (the reference);
    a method without a knob: [None], as it is (a preset, or a compare.runs entry of that name)."""
    out: dict[str, tuple[str | None, list[float | None]]] = {"sft": (None, [None])}
    for method in config.frontier.methods:
        knob = preset_knob(method, config.frontier.knobs.get(method), config)
        if method == "sft" or knob is None:
            out[method] = (None, [None])
            continue
        strength = registry_knob(knob)[1]
        out[method] = (knob, weakest_first(strength, config.frontier.grids.get(method) or strength.grid))
    return out


def _folder(default_knob: str | None, knob: str | None, value: float | None) -> str:
    """A point's folder: its value, prefixed by the knob when it is not the method's default one (so the
    points of two knobs of one method never share a folder)."""
    if value is None:
        return "default"
    return repr(float(value)) if knob == default_knob else f"{knob}-{float(value)!r}"


def point_config(config: ForgetlessConfig, root: Path, method: str, knob: str | None, value: float | None,
                 folder: str | None = None) -> ForgetlessConfig:
    """One point's run: method `method` (a preset or a compare.runs entry) with its knob at `value`, in
    OUTPUT_DIR/frontier/<method>/<value>, trained without anything that reads the test split (data.eval, the
    forgetting curve). Its frontier section is the default one, so that changing the frontier's settings never
    makes a finished point look different."""
    cfg = method_config(config, method)
    if value is not None:
        cfg = with_strength(cfg, knob, value)
    folder = folder or _folder(preset_knob(method, None, config), knob, value)
    cfg.output_dir = str(root / "frontier" / method / folder)
    cfg.data.eval = None
    cfg.evaluation.every_steps = 0
    cfg.frontier = FrontierConfig()
    return cfg


# ---------------------------------------------------------------- selection (pure: the numbers alone)


def _finite(p: dict) -> bool:
    return all(isinstance(p.get(k), (int, float)) and math.isfinite(p[k]) for k in ("target_nll", *FORGETTING))


def pareto(points: list[dict], forgetting: str) -> list[int]:
    """Indices of the points no other point dominates on (target_gain up, `forgetting` down): a dominating point
    is at least as good on both and strictly better on one, so equal points are all kept. Non-finite: left out."""
    ok = [i for i, p in enumerate(points) if _finite(p)]

    def dominates(a: dict, b: dict) -> bool:
        return (a["target_gain"] >= b["target_gain"] and a[forgetting] <= b[forgetting]
                and (a["target_gain"] > b["target_gain"] or a[forgetting] < b[forgetting]))

    return [i for i in ok if not any(dominates(points[j], points[i]) for j in ok if j != i)]


def forgetting_order(max_general_drop: float | None, max_drift_kl: float | None) -> tuple[str, str]:
    """The forgetting axes in the order "least forgetting" compares them: general_drop first, unless only the
    drift is bounded."""
    return ("drift_kl", "general_drop") if max_general_drop is None and max_drift_kl is not None else FORGETTING


def inside(p: dict, max_general_drop: float | None, max_drift_kl: float | None) -> bool:
    """Whether a point's validation figures are within the stated bound(s) (NaN: never)."""
    return _finite(p) and ((max_general_drop is None or p["general_drop"] <= max_general_drop)
                           and (max_drift_kl is None or p["drift_kl"] <= max_drift_kl))


def within_bound(points: list[dict], max_general_drop: float | None, max_drift_kl: float | None) -> dict | None:
    """Rule (a): among the points within the bound(s), the lowest target NLL; ties: the least forgetting, then the
    first (the weakest strength: points come weakest first). None when no point is within."""
    order = forgetting_order(max_general_drop, max_drift_kl)
    passing = [p for p in points if inside(p, max_general_drop, max_drift_kl)]
    return min(passing, key=lambda p: (p["target_nll"], p[order[0]], p[order[1]]), default=None)


def sft_threshold(sft: dict, tolerance: float) -> float:
    """The target NLL a point must reach to match SFT: SFT's + tolerance x |SFT's target gain|."""
    return sft["target_nll"] + tolerance * abs(sft["target_gain"])


def matches_sft(points: list[dict], sft: dict, tolerance: float, order: tuple[str, str] = FORGETTING) -> dict | None:
    """Rule (b): among the points whose target NLL is within sft_threshold, the least forgetting (`order`); ties:
    the lower target NLL, then the first (the weakest strength). None when none reaches SFT's target."""
    limit = sft_threshold(sft, tolerance)
    matching = [p for p in points if _finite(p) and p["target_nll"] <= limit]
    return min(matching, key=lambda p: (p[order[0]], p[order[1]], p["target_nll"]), default=None)


def choose(methods: dict[str, dict], sft: dict, f: FrontierConfig) -> dict[str, Any]:
    """Both Pareto sets over every method's points, and each method's choices (in place: methods[m]["choices"]).
    Returns {"pareto": {axis: [[method, value], ...]}, "overall": {rule: point}}."""
    every = [p for m in methods.values() for p in m["points"]]
    order = forgetting_order(f.max_general_drop, f.max_drift_kl)
    for m in methods.values():
        m["choices"] = {"within_bound": within_bound(m["points"], f.max_general_drop, f.max_drift_kl),
                        "matches_sft": matches_sft(m["points"], sft, f.sft_tolerance, order)}
    sets = {axis: pareto(every, axis) for axis in FORGETTING}
    for axis, indices in sets.items():
        for i, p in enumerate(every):
            p[f"pareto_{axis}"] = i in indices
    return {"pareto": {axis: [[every[i]["method"], every[i]["value"]] for i in indices] for axis, indices in sets.items()},
            "overall": {"within_bound": within_bound(every, f.max_general_drop, f.max_drift_kl),
                        "matches_sft": matches_sft(every, sft, f.sft_tolerance, order)}}


# ---------------------------------------------------------------- the search


def validation_records(config: ForgetlessConfig) -> list:
    """The validation examples: data.train's mixture's last budget.validation_examples (what the points do not
    train on: train(holdout=...) drops the same ones)."""
    held = split_holdout(training_records(config.data, config.train.seed), config.budget.validation_examples)[1]
    return [record for record, _ in held]


def make_validator(config: ForgetlessConfig):
    """The base model, on its device, and budget's Validator over the validation split."""
    path = resolve_model_path(config.model.name_or_path, config.model.revision)
    tokenizer = load_tokenizer(path)
    base = load_model(config.model, path, device=default_device()).eval()
    return Validator(config, validation_records(config), tokenizer, base)


def _label(method: str, knob: str | None, value: float | None, cfg: ForgetlessConfig) -> str:
    """How the progress log names a run."""
    if knob is not None and not registry_knob(knob)[1].retrains:
        return f"{method} (the fine-tune its {knob} mixes)" if cfg.output_dir.endswith("tuned") else "sft"
    return method if value is None else f"{method} {registry_knob(knob)[1].option}={value:g}"


def _train_or_reuse(cfg: ForgetlessConfig, holdout: int, overwrite: bool, label: str) -> tuple[dict, bool]:
    """(the run's summary, whether it trained now): a finished run of the same config and inputs is reused,
    an unfinished one resumed (train.resume_or_train_afresh); --overwrite trains it again."""
    if not overwrite:
        summary = reusable_summary(cfg, holdout)
        if summary is not None:
            logger.info("frontier: %s: reusing the finished run in %s", label, cfg.output_dir)
            return summary, False
    logger.info("frontier: %s: training -> %s", label, cfg.output_dir)
    if overwrite:
        return train(cfg, overwrite=True, holdout=holdout).summary, True
    return resume_or_train_afresh(cfg, holdout=holdout), True


def _train_in_worker(cfg: ForgetlessConfig, holdout: int, overwrite: bool, label: str,
                     threads: int) -> tuple[dict, bool]:
    """One point's run in a worker process of run_frontier's pool (--jobs)."""
    torch.set_num_threads(threads)  # this worker's own process: the pool shares the machine's cores
    return _train_or_reuse(cfg, holdout, overwrite, label)


def _trains_as(cfg: ForgetlessConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "method")}


def point_runs(config: ForgetlessConfig, root: Path,
               plan: dict[str, tuple[str | None, list[float | None]]]) -> dict[str, list[tuple[Any, ForgetlessConfig]]]:
    """method -> [(value, the run its point measures)]: sft's own run for sft, one run per point of a retraining
    knob, and for a mixing knob (WiSE-FT) one fine-tune every value mixes (sft's run when it trains like sft)."""
    sft_cfg = point_config(config, root, "sft", None, None)
    out: dict[str, list[tuple[Any, ForgetlessConfig]]] = {}
    for method, (knob, values) in plan.items():
        if knob is not None and not registry_knob(knob)[1].retrains:
            tuned = without_method(point_config(config, root, method, None, None, folder="tuned"),
                                   registry_knob(knob)[0])
            shares = _trains_as(tuned) == _trains_as(sft_cfg)  # everything but the folder and the label
            out[method] = [(value, sft_cfg if shares else tuned) for value in values]
        else:
            out[method] = [(value, sft_cfg if method == "sft" else point_config(config, root, method, knob, value))
                           for value in values]
    return out


def train_side_by_side(runs: dict[str, tuple[ForgetlessConfig, str]], holdout: int, overwrite: bool,
                       jobs: int) -> dict[str, tuple[dict, bool]]:
    """Train (or reuse) every run, `jobs` at a time in spawned worker processes: run folder -> (summary, trained
    now). A failed run does not stop the others (what finishes is reused next time); the first error is raised
    once all are done."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    logger.info("frontier: %d runs, %d at a time (worker processes, %d threads each)", len(runs), jobs, threads)
    done: dict[str, tuple[dict, bool]] = {}
    failed: list[tuple[str, BaseException]] = []
    with worker_pool(jobs) as pool:
        futures = {pool.submit(_train_in_worker, cfg, holdout, overwrite, label, threads): folder
                   for folder, (cfg, label) in runs.items()}
        for count, future in enumerate(as_completed(futures), start=1):
            folder = futures[future]
            try:
                done[folder] = future.result()
            except Exception as exc:
                logger.error("frontier: [%d/%d] %s failed: %s", count, len(runs), runs[folder][1], exc)
                failed.append((folder, exc))
                continue
            logger.info("frontier: [%d/%d] %s %s", count, len(runs), runs[folder][1],
                        "trained" if done[folder][1] else "reused")
    if failed:
        raise failed[0][1]
    return done


FRONTIER_FILES = ("frontier.json", "frontier.md", "frontier.png")


def _figures(report: dict) -> dict[tuple, tuple]:
    """(method, value, run folder) -> the point's validation figures, with the base's under ("base",)."""
    base = report.get("validation", {})
    figures = {("base",): (base.get("examples"), base.get("blocks"), *base.get("base", {}).values())}
    for method, m in report.get("methods", {}).items():
        for p in m.get("points", []):
            figures[(method, p["value"], p["run"])] = tuple(p.get(k) for k in ("target_nll", *FORGETTING))
    return figures


def _same(a: tuple, b: tuple) -> bool:  # measured again, the figures agree to float noise (threads, kernels)
    return len(a) == len(b) and all(
        x == y or (isinstance(x, float) and isinstance(y, float) and math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-6))
        for x, y in zip(a, b))


def keep_earlier(root: Path, report: dict) -> Path | None:
    """Before `report` is written to root/frontier.json: an earlier frontier.json that holds a point `report`
    does not (another method list or grid, or a point measured differently) is moved aside with its .md and .png
    to frontier.replaced-N.* (the first free N), and where it went is returned. A rerun that only adds points,
    or measures the same ones again, writes over it (nothing of it is lost)."""
    earlier = root / "frontier.json"
    if not earlier.is_file():
        return None
    try:
        old = json.loads(earlier.read_text())
    except (OSError, ValueError):
        old = {}
    before, now = _figures(old), _figures(report)
    if old and all(key in now and _same(figures, now[key]) for key, figures in before.items()):
        return None
    n = 1
    while any((root / f"frontier.replaced-{n}{Path(name).suffix}").exists() for name in FRONTIER_FILES):
        n += 1
    for name in FRONTIER_FILES:
        if (root / name).exists():
            (root / name).rename(root / f"frontier.replaced-{n}{Path(name).suffix}")
    aside = root / f"frontier.replaced-{n}.json"
    logger.warning("frontier: the earlier %s held points this call does not; kept as %s (and its .md, .png)",
                   earlier, aside)
    return aside


def run_frontier(config: ForgetlessConfig, overwrite: bool = False, jobs: int = 1) -> dict[str, Any]:
    """Train and measure every point, choose, write frontier.json / frontier.png, and (evaluate_chosen) compare
    the chosen points on the test split. Returns frontier.json's content. `jobs` > 1 trains that many points
    at a time in worker processes first (for small models on a GPU, which one run leaves mostly idle), then
    measures them one by one here; with 1, each point is measured as soon as it has trained. The chosen
    points' comparison runs `jobs` runs at a time too."""
    if PartialState().num_processes > 1:
        raise ConfigError("forgetless frontier runs as one process (each point trains on the machine's devices "
                          "as `forgetless train` does); run it without `accelerate launch`")
    f = config.frontier
    root = Path(config.output_dir)
    plan = grid(config)
    # never select on what the evaluation asks or replay trains on: stop before any point trains
    replays = {cfg.replay.data: cfg.replay for cfg in (method_config(config, method) for method in plan)
               if cfg.replay is not None}
    check_disjoint(config.evaluation, config.data, [source_spec(s) for s in train_sources(config.data)],
                   list(replays.values()))
    root.mkdir(parents=True, exist_ok=True)
    n_val = config.budget.validation_examples
    total = sum(len(values) for _, values in plan.values())
    runs = point_runs(config, root, plan)
    done: dict[str, tuple[dict, bool]] = {}  # run folder -> (summary, trained now): a run shared is trained once
    counted: list[dict] = []  # the points measured so far (the progress count)
    if jobs > 1:  # before the base model loads here: the workers have the device to themselves
        labels = {cfg.output_dir: (cfg, _label(method, plan[method][0], value, cfg))
                  for method, items in runs.items() for value, cfg in items}
        done.update(train_side_by_side(labels, n_val, overwrite, jobs))
    validator = make_validator(config)
    base, device = validator.base, validator.base.device
    logger.info("frontier: base validation ppl %.3f, target NLL %.4f (%d examples, %d blocks)", validator.base_ppl,
                validator.base_nll, len(validator.pairs), len(validator.blocks))

    def run(cfg: ForgetlessConfig, label: str) -> tuple[dict, bool]:
        if cfg.output_dir not in done:
            done[cfg.output_dir] = _train_or_reuse(cfg, n_val, overwrite, label)
        return done[cfg.output_dir]

    def measured(model, method: str, knob: str | None, value: float | None, run_dir: str, summary: dict,
                 trained: bool) -> dict:
        m = validator.measure(model)
        point = {"method": method, "knob": knob, "option": registry_knob(knob)[1].option if knob else None,
                 "value": value, "run": run_dir, "trained_now": trained,
                 "train_seconds": summary.get("train_seconds"), **m,
                 "target_gain": validator.base_nll - m["target_nll"], "general_nll_change": math.log1p(m["general_drop"])}
        counted.append(point)
        shown = method if value is None else f"{method} {point['option']}={value:g}"
        logger.info("frontier: [%d/%d] %s -> ppl %+.2f%%, drift %.4f, target NLL %.4f (gain %+.4f)", len(counted),
                    total, shown, 100 * m["general_drop"], m["drift_kl"], m["target_nll"], point["target_gain"])
        return point

    def load(run_dir: str):  # on the base's device, in its precision (as budget loads its candidates)
        return load_trained(run_dir, dtype=base.dtype, device=device)[0].eval()

    methods: dict[str, dict] = {}
    for method, (knob, values) in plan.items():
        points: list[dict] = []
        if knob is not None and not registry_knob(knob)[1].retrains:  # a mix of one fine-tune per value
            tuned = runs[method][0][1]
            summary, trained = run(tuned, _label(method, knob, None, tuned))
            model = load(tuned.output_dir)
            # a full fine-tune mixes with the base's weights, on the CPU beside the mixer's copy of the tuned ones
            initial = None if (Path(tuned.output_dir) / "adapter_config.json").exists() else {
                name: w.detach().to("cpu") for name, w in base.state_dict().items()}
            mixer = WeightMixer(model, initial)
            for value in values:
                mixer.set(value)
                points.append(measured(model, method, knob, value, tuned.output_dir, summary, trained))
            del model, mixer
        else:
            for value, cfg in runs[method]:
                summary, trained = run(cfg, _label(method, knob, value, cfg))
                model = load(cfg.output_dir)
                points.append(measured(model, method, knob, value, cfg.output_dir, summary, trained))
                del model
        methods[method] = {"knob": knob, "option": points[0]["option"], "points": points}
    sft = methods["sft"]["points"][0]
    chosen = choose(methods, sft, f)
    report = {
        "validation": {"examples": len(validator.pairs), "blocks": len(validator.blocks),
                       "base": {"general_ppl": validator.base_ppl, "target_nll": validator.base_nll}},
        "axes": {"target_gain": "base target NLL - the point's target NLL on the validation examples (nats per "
                                "answer token; higher: learned more)",
                 "general_drop": "validation general-text perplexity / the base's - 1 (lower: forgot less); "
                                 "general_nll_change = log(1 + general_drop)",
                 "drift_kl": "mean token KL(base || point) on the validation general text (lower: drifted less)"},
        "rules": {"max_general_drop": f.max_general_drop, "max_drift_kl": f.max_drift_kl,
                  "sft_tolerance": f.sft_tolerance, "sft_threshold": sft_threshold(sft, f.sft_tolerance),
                  "forgetting_order": list(forgetting_order(f.max_general_drop, f.max_drift_kl)),
                  "within_bound": "inside the bound(s) on validation, lowest target NLL; ties: least forgetting, "
                                  "then the weakest strength",
                  "matches_sft": "target NLL <= SFT's + sft_tolerance x |SFT's target gain|, least forgetting; "
                                 "ties: lower target NLL, then the weakest strength",
                  "pareto": "no other point has target_gain >= and forgetting <= with one strict; one set per "
                            "forgetting axis, over every method's points"},
        "sft": sft,
        "methods": methods,
        **chosen,
        "runs": {"trained_now": sum(t for _, t in done.values()), "reused": sum(not t for _, t in done.values()),
                 # > 1: the runs trained now shared the machine (--jobs), their train_seconds include that
                 "at_a_time": jobs},
        "chosen_evaluation": None,
    }
    keep_earlier(root, report)
    write_json_atomic(root / "frontier.json", report, indent=2)
    write_text_atomic(root / "frontier.md", render_markdown(report))
    plot(report, root / "frontier.png")
    logger.info("frontier: wrote %s, frontier.md and frontier.png (%d runs trained now, %d reused)",
                root / "frontier.json", report["runs"]["trained_now"], report["runs"]["reused"])
    if f.evaluate_chosen:
        # the comparison loads its own base (and its workers theirs): this one would stay in memory beside them
        # and count in the chosen runs' peak memory
        validator = base = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report["chosen_evaluation"] = evaluate_chosen(config, report, overwrite, jobs)
        write_json_atomic(root / "frontier.json", report, indent=2)
    return report


def render_markdown(report: dict) -> str:
    """frontier.md: every point as a table row (method, strength, the validation figures, Pareto marks, the
    rules' choices), then what each rule chose per method. One seed and the validation split: no intervals."""
    v, rules = report["validation"], report["rules"]
    bound = " and ".join(f"{k} <= {rules[k]:g}" for k in ("max_general_drop", "max_drift_kl") if rules[k] is not None)
    lines = [f"# Frontier on validation ({v['examples']} held-out examples, {v['blocks']} held-out general-text blocks)",
             "",
             f"Base: target NLL {v['base']['target_nll']:.4f}, general-text perplexity {v['base']['general_ppl']:.3f}. "
             "One training run per point (one seed): these figures carry no interval; compare the chosen points "
             "over seeds on the test split (`frontier.evaluate_chosen`, or `forgetless compare` with "
             "`compare.seeds`) before acting on a small difference.",
             "",
             "P: on the Pareto set of target gain against general-text NLL change (first) or drift KL (second). "
             f"B: the method's choice within the bound ({bound or 'no bound'}); "
             f"S: its choice matching SFT's target (target NLL <= {rules['sft_threshold']:.4f}).",
             "",
             "| method | strength | target NLL | target gain | general ppl | drift KL | Pareto | chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for method, m in report["methods"].items():
        chosen = {rule: p["value"] for rule, p in m.get("choices", {}).items() if p is not None}
        for p in m["points"]:
            strength = "" if p["value"] is None else f"{p['option']}={p['value']:g}"
            pareto_marks = ("P" if p.get("pareto_general_drop") else "-") + ("P" if p.get("pareto_drift_kl") else "-")
            marks = ("B" if chosen.get("within_bound", object()) == p["value"] else "") + (
                "S" if chosen.get("matches_sft", object()) == p["value"] else "")
            lines.append(f"| {method} | {strength} | {p['target_nll']:.4f} | {p['target_gain']:+.4f} | "
                         f"{100 * p['general_drop']:+.2f}% | {p['drift_kl']:.4f} | {pareto_marks} | {marks} |")
    lines += ["", f"Runs trained now: {report['runs']['trained_now']}, reused: {report['runs']['reused']}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the chosen points on the test split


def run_name(method: str, value: float | None) -> str:
    """A compare.runs name for a chosen point: e.g. kl-0.1, wise-ft-0.5 (characters a folder name may not
    carry become '_')."""
    name = method if value is None else f"{method}-{value:g}"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    assert RUN_NAME.fullmatch(name)
    return name


def chosen_compare_config(config: ForgetlessConfig, report: dict) -> tuple[ForgetlessConfig, dict[str, Any]]:
    """The compare config of the chosen points: sft (compare.methods) beside each other method's
    `evaluate_rule` choice (compare.runs: its preset's regularizers / replay at the chosen strength), paired
    with sft, in OUTPUT_DIR/chosen; and name -> {method, value} of what it compares."""
    rule = config.frontier.evaluate_rule
    cmp = copy.deepcopy(config)
    cmp.output_dir = str(Path(config.output_dir) / "chosen")
    cmp.frontier = FrontierConfig()  # as the points: the frontier's settings are not what a run trains
    runs: dict[str, Any] = {}
    compared: dict[str, Any] = {"sft": {"method": "sft", "value": None}}
    for method, m in report["methods"].items():
        point = m["choices"][rule]
        if method == "sft":
            continue
        if point is None:
            logger.warning("frontier: %s has no point by the %s rule: not evaluated on the test split", method, rule)
            continue
        cfg = method_config(config, method)
        if m["knob"] is not None:
            cfg = with_strength(cfg, m["knob"], point["value"])
        name = run_name(method, point["value"])
        if name in runs:
            raise ConfigError(f"frontier: two chosen points would both be compared as '{name}'; rename the "
                              f"compare.runs entry '{method}'")
        # a compare.runs method keeps its other overrides (e.g. its own learning rate); one with no regularizer
        # and no replay trains as plain SFT (compare's label rule)
        label = name if cfg.regularizers or cfg.replay is not None else "sft"
        runs[name] = {**copy.deepcopy(config.compare.runs.get(method, {})), "method": label,
                      "regularizers": [entry(o) for o in cfg.regularizers],
                      "replay": dataclasses.asdict(cfg.replay) if cfg.replay is not None else None}
        compared[name] = {"method": method, "value": point["value"]}
    cmp.compare = dataclasses.replace(cmp.compare, methods=["sft"], runs=runs, paired_with=["sft"])
    validate(cmp)
    return cmp, compared


def evaluate_chosen(config: ForgetlessConfig, report: dict, overwrite: bool = False, jobs: int = 1) -> dict[str, Any]:
    """The chosen points, trained on the whole training set and compared with sft on the test split by
    compare.run_compare (its report.json / report.md / plots, in OUTPUT_DIR/chosen): once per seed of
    compare.seeds when it lists any (OUTPUT_DIR/chosen/<run>/seed-<n>; the points were chosen on train.seed),
    `jobs` runs at a time."""
    cmp, compared = chosen_compare_config(config, report)
    logger.info("frontier: evaluating the chosen points (%s rule) on the test split: %s", config.frontier.evaluate_rule,
                ", ".join(compared))
    run_compare(cmp, overwrite=overwrite, jobs=jobs)
    return {"rule": config.frontier.evaluate_rule, "output_dir": cmp.output_dir, "runs": compared,
            "report": str(Path(cmp.output_dir) / "report.json")}


# ---------------------------------------------------------------- the plot


def _shown(point: dict) -> bool:
    """Drawn on the frontier's plot: finite, and it learned something (target gain > 0)."""
    return _finite(point) and point["target_gain"] > 0


def plot(report: dict, path: Path) -> None:
    """Two panels, target gain (y) against the general-text NLL change and against the drift KL (x): each
    method's points joined weakest first and labelled with their strength, the Pareto set ringed, SFT starred,
    the bound dashed; a point with no target gain is named in the legend, not drawn; when every drawn point
    gained at least half the best gain, the target axis zooms on them (said on the plot). Drawn on a Figure of
    its own (no pyplot state; the CLI picks the Agg backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5))
    axes = fig.subplots(1, 2)
    rules = report["rules"]
    bounds = {"general_nll_change": None if rules["max_general_drop"] is None else math.log1p(rules["max_general_drop"]),
              "drift_kl": rules["max_drift_kl"]}
    said = {"general_nll_change": f"bound: ppl +{100 * (rules['max_general_drop'] or 0):g}%",
            "drift_kl": f"bound: drift {rules['max_drift_kl'] or 0:g}"}
    panels = [("general_nll_change", "pareto_general_drop", "general-text NLL change vs base (nats/token)  → forgot more"),
              ("drift_kl", "pareto_drift_kl", "drift KL(base‖model) on general text (nats/token)  → drifted more")]
    for ax, (x, ring, label) in zip(axes, panels):
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.scatter([0], [0], color="black", marker="s", s=30, zorder=3)
        ax.annotate("base", (0, 0), textcoords="offset points", xytext=(4, -10), fontsize=7)
        for i, (method, m) in enumerate(report["methods"].items()):
            pts = [p for p in m["points"] if _shown(p)]
            off = [p for p in m["points"] if _finite(p) and not _shown(p)]
            if off:  # no target gain: said in the legend, not drawn (it would squash the points that learned)
                worst = min(off, key=lambda p: p["target_gain"])
                ax.plot([], [], "x", color=f"C{i}", label=f"{method}: {len(off)} off the plot (target gain "
                                                        f"{worst['target_gain']:+.2f}, {x.replace('_', ' ')} {worst[x]:+.3f})")
            if not pts:
                continue
            ax.plot([p[x] for p in pts], [p["target_gain"] for p in pts], "-o", ms=4, color=f"C{i}", label=method)
            for p in pts:
                if p["value"] is not None:
                    ax.annotate(f"{p['value']:g}", (p[x], p["target_gain"]), textcoords="offset points",
                                xytext=(4, 3), fontsize=7, color=f"C{i}")
        ringed = [p for m in report["methods"].values() for p in m["points"] if p.get(ring) and _shown(p)]
        ax.scatter([p[x] for p in ringed], [p["target_gain"] for p in ringed], s=140, facecolors="none",
                   edgecolors="black", lw=1.2, label="Pareto set", zorder=4)
        sft = report["sft"]
        if _finite(sft):
            ax.scatter([sft[x]], [sft["target_gain"]], marker="*", s=220, color="gold", edgecolors="black",
                       label="SFT", zorder=5)
        shown_x = [p[x] for m in report["methods"].values() for p in m["points"] if _shown(p)]
        if bounds[x] is not None and bounds[x] <= 1.5 * max(shown_x + [0]):
            ax.axvline(bounds[x], color="red", ls="--", lw=1, label=said[x])
        elif bounds[x] is not None:  # far beyond every point: said, not drawn (it would squash them)
            ax.plot([], [], color="red", ls="--", lw=1, label=f"{said[x]} (off the plot)")
        gains = [p["target_gain"] for m in report["methods"].values() for p in m["points"] if _shown(p)]
        if gains and min(gains) > 0.5 * max(gains):  # every point learned most of what SFT did: zoom on them
            low, high = min(gains), max(gains)
            pad = max(0.15 * (high - low), 0.005 * high)
            ax.set_ylim(low - pad, high + pad)
        zoomed = "\n(zoomed: the base, gain 0, is below)" if ax.get_ylim()[0] > 0 else ""
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel(f"target gain: base NLL - NLL (nats/token)  ↑ learned more{zoomed}", fontsize=8)
    for ax in axes:
        ax.legend(fontsize=7)
    v = report["validation"]
    fig.suptitle(f"Forgetting frontier on the validation split ({v['examples']} held-out training examples, "
                 f"{v['blocks']} held-out general-text blocks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

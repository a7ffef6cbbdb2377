"""Re-render a stored `forgetless compare` report with the current statistics (forgetless.stats), from the
per-item values it stores: no model is loaded, nothing is trained or evaluated.

    .venv/bin/python scripts/rerender_report.py DIR [OUT_DIR] [--add OTHER_DIR ...] [--add-seeds RUNS_DIR ...]

DIR holds report.json (its `per_seed` evaluations with their items, and the base's in `results.base`).
Every figure, interval, paired difference and Holm mark (one family over every starred cell) is recomputed;
report.json, report.md and the PNG plots are written to OUT_DIR (default: DIR itself, in place) by compare's
own functions.

`--add OTHER_DIR` joins the runs of another comparison to DIR's, as if one `compare` had run them all: e.g. new
methods compared later, without retraining the reference runs. It is refused unless the two measured the same
thing: the same seeds, the base's evaluation item for item (the same suite on the same items and blocks; the
runs' items then pair by position), the same model files, training and evaluation data (by content), dtype
and device kind, and the same shared model, data, train and evaluation options (those compare stores in
report.json from forgetless 0.2.0 on), save these, which may differ: how many runs trained side by side, the
logging and saving options, the seed (the seeds are checked), model.name_or_path (its files are), data.eval
(a compared run does not read it); an option one report predates counts at its default. Another forgetless
version is a note, not a refusal. For a report written before compare stored those, only the base model's
path, steps, epochs, batch size, fine-tuning and training data's names can be checked, and a note says so.
Run names must differ. The references (`paired_with`) are both reports' (the first's first): runs of the
first are paired with a reference only the second names too, which adds comparisons to the Holm family.

`--add-seeds RUNS_DIR` adds seeds to DIR's runs from the run folders of another `compare` of the same methods
(RUNS_DIR/NAME/seed-S with their compare_eval.json and config.yaml, RUNS_DIR/base_eval.json): e.g. seeds trained
later on another machine, read from what each run stored even when that compare stopped before its report. Every
method of DIR must get every added seed (from one RUNS_DIR or several), each run's regularizers, replay and
training settings must be DIR's for that method, each run's evaluation must be of its RUNS_DIR's suite and of
the training in its folder, the RUNS_DIRs must share one suite and dtype (and DIR's, where DIR stores them), and
each RUNS_DIR's base evaluation must be DIR's: the same
instruction answers, 0/1 items equal, every other item within 1e-4 (another device's arithmetic; item for item,
so that the suite, items and blocks are the same). The device and the model files' hash may differ (a GPU
converts the same GGUF with other library versions); the report says which runs ran where, and that its step
times and peak memory are DIR's seeds' alone. DIR's base evaluation stays the base's.
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import json
import math
import re
import sys
from pathlib import Path

from forgetless.cache import write_json_atomic, write_text_atomic
from forgetless.compare import (mark_comparisons, paired_differences, plot, render_markdown, report_settings,
                                shared_training, summarise_results)
from forgetless.config import ForgetlessConfig, ReplayConfig, load_config
from forgetless.registry import METHODS
from forgetless.run_folder import flat

# settings that may differ between two comparisons joined (how many trained side by side)
_SETTINGS_FREE = ("runs_at_a_time", "seed")  # seed: the seeds, checked apart


def rerender(report: dict) -> dict:
    """The report with its results, paired differences and Holm marks recomputed from its stored items."""
    base = report["results"]["base"]
    if "items" not in base:
        raise SystemExit("report.json: the base's results hold no per-item values ('items'); nothing to recompute")
    methods = report["methods"]
    results = {"base": base, **{name: report["per_seed"][name] for name in methods}}
    report["results"] = {"base": summarise_results({"base": base}),
                         **{name: summarise_results(results[name]) for name in methods}}
    report["paired"] = paired_differences(results, methods, report.get("paired_with", ["sft"]))
    report.pop("comparisons", None)
    return mark_comparisons(report)


def _same_values(a, b) -> bool:
    """Equal, floats to 1e-6 relative (the same evaluation rerun on the same machine is bit-identical here)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and (
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b)))
    return a == b


def method_at_defaults(settings: dict) -> dict:
    """A report's stored `regularizers` and `replay` of one run with every option the report predates at its
    default, as this forgetless reads the run's config.yaml (a method it no longer knows: as stored)."""
    regularizers = []
    for entry in settings["regularizers"]:
        regularizers.append({name: {**dataclasses.asdict(METHODS[name].config()), **(options or {})}
                             if name in METHODS else options for name, options in entry.items()})
    replay = settings["replay"]
    if isinstance(replay, dict):
        replay = {**dataclasses.asdict(ReplayConfig()), **replay}
    return {"regularizers": regularizers, "replay": replay}


def _defaults() -> dict[str, dict]:
    """The shared config's flattened options at their defaults (what a report written before an option
    existed ran with)."""
    config = ForgetlessConfig()
    return {"training": flat(shared_training(config)), "evaluation": flat(config.to_dict()["evaluation"])}


def joined(report: dict, other: dict, where: str = "the added report") -> dict:
    """`report` with `other`'s runs added (a new dict; neither is changed); its results, paired differences
    and Holm marks are still the first report's until `rerender` recomputes them. SystemExit naming what
    differs when the two did not measure the same thing."""
    def refuse(what: str) -> None:
        raise SystemExit(f"{where}: {what}; its runs cannot be joined to the first report's (they would not pair)")

    def note(what: str) -> None:
        print(f"note: {what}", file=sys.stderr)

    clash = sorted(set(report["methods"]) & set(other["methods"]))
    if clash:
        refuse(f"run names already in the first report: {', '.join(clash)} (rename them in one report.json)")
    if [str(s) for s in other["seeds"]] != [str(s) for s in report["seeds"]]:
        refuse(f"other seeds ({other['seeds']} vs {report['seeds']})")
    for key in set(report["settings"]) | set(other["settings"]):
        if key not in _SETTINGS_FREE and report["settings"].get(key) != other["settings"].get(key):
            refuse(f"settings.{key} differs ({other['settings'].get(key)!r} vs {report['settings'].get(key)!r})")
    base, other_base = report["results"]["base"], other["results"]["base"]
    if "items" not in base or "items" not in other_base:
        refuse("a base evaluation without per-item values ('items')")
    for key in sorted(set(base["items"]) | set(other_base["items"])):
        if not _same_values(base["items"].get(key), other_base["items"].get(key)):
            refuse(f"the base's evaluation differs in results.base.items.{key} (another suite, items or blocks)")
    if not _same_values(base.get("instr_base_answers"), other_base.get("instr_base_answers")):
        refuse("the base's instruction answers differ (results.base.instr_base_answers)")

    older = [name for name, r in (("the first report", report), (where, other))
             if not all(part in r for part in ("training", "evaluation", "inputs"))]
    if older:  # written before compare stored its shared config and inputs
        if other["base_model"] != report["base_model"]:
            refuse(f"another base model ({other['base_model']} vs {report['base_model']})")
        note(f"{' and '.join(older)} predate(s) the stored shared config: the learning rate, LoRA, dtype, "
             f"max_length, data content and the rest go unchecked; only the settings, seeds and the base's "
             f"items were checked")
        return _joined(report, other)
    mine, theirs = report["inputs"], other["inputs"]
    for key, what in (("model_files", "the model's files"), ("dtype", "the resolved dtype"),
                      ("device", "the device kind"), ("train_data", "the training data's content"),
                      ("evaluation_data", "the evaluation data's content"),
                      ("mc_contexts", "how multiple choice was scored (each context once, or pair by pair before)")):
        if mine.get(key) != theirs.get(key):
            refuse(f"inputs.{key} differs: {what} ({theirs.get(key)!r} vs {mine.get(key)!r})")
    if mine.get("forgetless") != theirs.get("forgetless"):
        note(f"written by forgetless {theirs.get('forgetless')}, the first by {mine.get('forgetless')}: "
             f"a change of the training code between them goes unchecked")
    for part in ("training", "evaluation"):
        differs = _option_differing(part, report[part], other[part])
        if differs:
            refuse(differs)
    return _joined(report, other)


def _option_differing(part: str, first: dict, other: dict, ignore: tuple[str, ...] = ()) -> str | None:
    """The first option of a shared section (`part`: training or evaluation, as compare stores them) that differs
    between two of its forms, said as `part.key differs (other's vs first's)`, or None; an option one of them
    predates is at its default in that one."""
    defaults = _defaults()[part]
    a, b = flat(first), flat(other)
    for key in sorted((set(a) | set(b)) - set(ignore)):
        a_value, b_value = a.get(key, defaults.get(key)), b.get(key, defaults.get(key))
        if a_value != b_value:
            return f"{part}.{key} differs ({b_value!r} vs {a_value!r})"
    return None


def _joined(report: dict, other: dict) -> dict:
    """The two reports' runs in one (checked by `joined`)."""
    out = copy.deepcopy(report)
    out["methods"] = report["methods"] + other["methods"]
    for part in ("run_settings", "runs", "per_seed", "curves"):
        out.setdefault(part, {}).update(copy.deepcopy(other.get(part, {})))
    # each report's references, the first's first: the added runs are paired with the first report's
    # references too (a reference missing from the joined runs pairs nothing)
    out["paired_with"] = list(dict.fromkeys([*report.get("paired_with", ["sft"]), *other.get("paired_with", ["sft"])]))
    out["settings"]["runs_at_a_time"] = max(report["settings"].get("runs_at_a_time", 1),
                                            other["settings"].get("runs_at_a_time", 1))
    return out


BASE_ITEM_TOLERANCE = 1e-4  # nats per item: float32 on another device differs by ~1e-5 (measured: CPU vs H200)


def _flat_values(x) -> list:
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _flat_values(x[k])]
    if isinstance(x, list):
        return [v for item in x for v in _flat_values(item)]
    return [x]


def _base_difference(base: dict, other: dict, where: str) -> float:
    """The largest per-item difference between two base evaluations of one suite; SystemExit where they are not
    the same suite, items and blocks (another item count, a 0/1 item or an instruction answer that differs)."""
    def refuse(what: str) -> None:
        raise SystemExit(f"{where}: {what}; its seeds cannot be joined to the first report's (they would not pair)")

    if not _same_values(base.get("instr_base_answers"), other.get("instr_base_answers")):
        refuse("the base's instruction answers differ (instr_base_answers)")
    largest = 0.0
    for key in sorted(set(base["items"]) | set(other["items"])):
        if key not in base["items"] or key not in other["items"]:
            refuse(f"the base's items.{key} is missing on one side (another suite)")
        a, b = _flat_values(base["items"][key]), _flat_values(other["items"][key])
        if len(a) != len(b):
            refuse(f"the base's items.{key} has {len(b)} values against {len(a)} (another suite, items or blocks)")
        for x, y in zip(a, b):
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
            if not numbers or (float(x).is_integer() and float(y).is_integer() and x in (0, 1) and y in (0, 1)):
                if x != y:
                    refuse(f"the base's items.{key} differ ({y!r} vs {x!r}: another suite, items or blocks, or a "
                           f"near-tie decided otherwise by another machine's rounding)")
                continue
            if math.isnan(x) and math.isnan(y):
                continue  # nothing to score on either side
            if not (math.isfinite(x) and math.isfinite(y)) or abs(x - y) > BASE_ITEM_TOLERANCE:
                refuse(f"the base's items.{key} differ by {abs(x - y):.3g} > {BASE_ITEM_TOLERANCE:g} (another suite, "
                       f"items, blocks or model)")
            largest = max(largest, abs(x - y))
    return largest


def _suite(key: dict) -> dict:
    """What of a stored evaluation's key names the suite and its data (not the machine that ran it)."""
    inputs = key.get("inputs", {})
    return {"evaluation": key.get("evaluation"), "data": key.get("data"),
            "evaluation_data": inputs.get("data"), "dtype": inputs.get("dtype"),
            "mc_contexts": key.get("mc_contexts")}  # multiple choice scored pair by pair (None) or contexts shared


def joined_seeds(report: dict, folders: list[Path]) -> dict:
    """`report` with more seeds of its methods, read from the run folders of other comparisons (a new dict;
    see the module's docstring for what is checked). SystemExit naming what differs or is missing."""
    out = copy.deepcopy(report)
    known = {str(s) for s in report["seeds"]}
    found: dict[str, dict[str, tuple[Path, dict]]] = {name: {} for name in report["methods"]}
    devices: dict[str, list[str]] = {}
    suites: dict[str, dict] = {}
    largest = 0.0
    for folder in folders:
        base_path = folder / "base_eval.json"
        base_stored = _read_json(base_path)
        largest = max(largest, _base_difference(report["results"]["base"], base_stored["results"], str(base_path)))
        suites[str(base_path)] = _suite(base_stored["key"])
        for name in report["methods"]:
            for run in sorted((folder / name).glob("seed-*")):
                number = re.fullmatch(r"seed-(\d+)", run.name)  # not a run set aside (seed-S.replaced-N)
                if number is None or not (run / "compare_eval.json").is_file():
                    continue  # ... nor one that did not finish its evaluation
                seed, where = str(int(number[1])), str(run)
                if seed in known:
                    raise SystemExit(f"{where}: seed {seed} is already in the first report")
                if seed in found[name]:
                    raise SystemExit(f"{where}: {name} seed {seed} is also in {found[name][seed][0]}")
                stored = _read_json(run / "compare_eval.json")
                key = stored["key"]
                if {k: v for k, v in key.items() if k not in ("run", "adapters")} != base_stored["key"]:
                    raise SystemExit(f"{where}/compare_eval.json: evaluated with another suite, model or machine than "
                                     f"{base_path} (an older evaluation kept from an earlier comparison?)")
                summary_path = run / "train_summary.json"
                if not summary_path.is_file() or _read_json(summary_path) != key.get("run"):
                    raise SystemExit(f"{where}/compare_eval.json: the evaluation of another training than the run "
                                     f"there ({summary_path.name} missing or different)")
                config = load_config(run / "config.yaml")
                mine = {k: config.to_dict()[k] for k in ("regularizers", "replay")}
                theirs = method_at_defaults(report["run_settings"][name])
                if json.loads(json.dumps(mine)) != json.loads(json.dumps(theirs)):
                    raise SystemExit(f"{where}/config.yaml: {name}'s regularizers or replay differ from the first "
                                     f"report's ({mine} vs {theirs})")
                for option, value in report_settings(config).items():
                    if report["settings"].get(option) != value:
                        raise SystemExit(f"{where}/config.yaml: settings.{option} differs ({value!r} vs "
                                         f"{report['settings'].get(option)!r})")
                # the configured dtype may differ (auto on a CPU is float32): the resolved one is checked below
                differs = "training" in report and _option_differing("training", report["training"],
                                                                     shared_training(config), ignore=("model.dtype",))
                if differs:
                    raise SystemExit(f"{where}/config.yaml: {differs}")
                found[name][seed] = (run, stored["results"])
                devices.setdefault(f"{key['inputs'].get('device')} ({key['inputs'].get('dtype')})",
                                   []).append(f"{name}@{seed}")
    first = next(iter(suites.values()))
    for where, suite in suites.items():
        if suite != first:
            raise SystemExit(f"{where}: another suite, evaluation data, dtype or multiple-choice scoring than {next(iter(suites))}'s")
    # (generation_batch_size: how many answers a call, the same answers)
    differs = "evaluation" in report and _option_differing(
        "evaluation", report["evaluation"], first["evaluation"] or {}, ignore=("generation_batch_size",))
    if differs:
        raise SystemExit(f"the added runs' {differs}")
    if "inputs" in report and first["dtype"] != report["inputs"].get("dtype"):
        raise SystemExit(f"the added runs ran in {first['dtype']}, the first report in {report['inputs'].get('dtype')}")
    if "inputs" in report and first["mc_contexts"] != report["inputs"].get("mc_contexts"):
        scoring = {None: "pair by pair", "shared": "each context once"}
        raise SystemExit(f"the added runs scored multiple choice {scoring.get(first['mc_contexts'])}, the first report "
                         f"{scoring.get(report['inputs'].get('mc_contexts'))}: evaluate them again with one forgetless")
    seeds = sorted({seed for by_seed in found.values() for seed in by_seed}, key=int)
    if not seeds:
        raise SystemExit(f"{', '.join(map(str, folders))}: no finished run of the first report's methods")
    missing = [f"{name}@{seed}" for name in report["methods"] for seed in seeds if seed not in found[name]]
    if missing:
        raise SystemExit(f"runs missing for the added seeds: {', '.join(missing)} (every method needs every seed)")
    for name in report["methods"]:
        for seed in seeds:
            out["per_seed"][name][seed] = found[name][seed][1]
    out["seeds"] = [*report["seeds"], *(int(s) for s in seeds)]
    where_run = "; ".join(f"{', '.join(runs) if len(devices) > 1 and len(runs) < 4 else f'{len(runs)} runs'} on "
                          f"{device}" for device, runs in devices.items())
    mixed = (" A seed's runs on two devices are paired as any seed's: the devices' rounding adds to that seed's "
             "variation, which its interval carries." if len(devices) > 1 else "")
    unchecked = ("" if "training" in report else " The first report predates the stored shared config: beyond "
                 "the base's items, the runs' regularizers, replay and heading settings, the added runs' learning "
                 "rate, LoRA and the rest were not checked against it.")
    out.setdefault("notes", []).append(
        f"Seeds {', '.join(seeds)} joined to seeds {', '.join(map(str, report['seeds']))} from their stored run "
        f"evaluations ({where_run}); their base evaluation agreed with this report's item for item (largest "
        f"difference {largest:.1g} nats, the same instruction answers), and this report's base figures serve every "
        f"seed. Step s and peak memory are seeds {', '.join(map(str, report['seeds']))}'s alone.{mixed}{unchecked}")
    return out


def _read(folder: Path) -> dict:
    """A comparison's report.json, or SystemExit saying what is wrong with it."""
    return _read_json(folder / "report.json")


def _read_json(path: Path) -> dict:
    """A JSON file compare wrote, or SystemExit saying what is wrong with it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file (give the output folder of a `forgetless compare`)") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not valid JSON ({exc})") from None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=__doc__.split("\n\n")[1].strip())
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--add", type=Path, action="append", default=[], metavar="OTHER_DIR")
    parser.add_argument("--add-seeds", type=Path, action="append", default=[], metavar="RUNS_DIR")
    args = parser.parse_args(argv)
    report = _read(args.source)
    for other in args.add:
        report = joined(report, _read(other), where=str(other / "report.json"))
    if args.add_seeds:
        report = joined_seeds(report, args.add_seeds)
    report = rerender(report)
    out = args.out or args.source
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report, indent=2)
    write_text_atomic(out / "report.md", render_markdown(report))
    plot(report, out)
    counts = report["comparisons"]
    stars = sum(bool(e.get("holm")) for by_measure in report["paired"].values() for entries in by_measure.values()
                for e in entries.values())
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and the plots ({counts.get('family', 0)} comparisons "
          f"in one Holm family: {counts.get('paired', 0)} paired, {counts.get('by_domain', 0)} by domain; "
          f"{stars} starred)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

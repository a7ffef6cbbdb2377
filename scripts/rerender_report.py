"""Re-render a stored `forgetless compare` report with the current statistics (forgetless.stats), from the
per-item values it stores: no model is loaded, nothing is trained or evaluated.

    .venv/bin/python scripts/rerender_report.py DIR [OUT_DIR] [--add OTHER_DIR ...]

DIR holds report.json (its `per_seed` evaluations with their items, and the base's in `results.base`).
Every figure, interval, paired difference and Holm mark (one family over every starred cell) is recomputed;
report.json, report.md and the PNG plots are written to OUT_DIR (default: DIR itself, in place) by compare's
own functions.

`--add OTHER_DIR` joins the runs of another comparison to DIR's, as if one `compare` had run them all: e.g. new
methods compared later, without retraining the reference runs. It is refused unless the two measured the same
thing: the same base model and seeds, the same shared training and evaluation settings (the full model, data,
train and evaluation sections, as compare stores them since 2026-12-03; for older reports only the settings
they hold: steps, epochs, batch size, fine-tuning, training data, and a note says so), and the base's
evaluation item for item (the same suite on the same items and blocks; the runs' items then pair by position).
Run names must differ. The references (`paired_with`) are both reports', the first's first.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

from forgetless.compare import mark_comparisons, paired_differences, plot, render_markdown, summarise_results

# per-run settings that may differ between two comparisons joined (how many trained side by side)
_SETTINGS_FREE = ("runs_at_a_time",)


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


def _flat(section: dict, prefix: str = "") -> dict:
    """{"a.b": value} for a nested mapping (lists are values)."""
    out = {}
    for key, value in section.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def joined(report: dict, other: dict, where: str = "the added report") -> dict:
    """`report` with `other`'s runs added (a new dict; neither is changed); its results, paired differences
    and Holm marks are still the first report's until `rerender` recomputes them. SystemExit naming what
    differs when the two did not measure the same thing."""
    def refuse(what: str) -> None:
        raise SystemExit(f"{where}: {what}; its runs cannot be joined to the first report's (they would not pair)")

    if other["base_model"] != report["base_model"]:
        refuse(f"another base model ({other['base_model']} vs {report['base_model']})")
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
    for part in ("training", "evaluation"):  # the full shared config (reports from 2026-12-03 on)
        if part in report and part in other:
            for key in sorted(set(_flat(report[part])) | set(_flat(other[part]))):
                a, b = _flat(report[part]).get(key), _flat(other[part]).get(key)
                if a != b:
                    refuse(f"{part}.{key} differs ({b!r} vs {a!r})")
        else:
            print(f"note: {part} settings not recorded in {'the first report' if part not in report else where} "
                  f"(written before compare stored them): only the settings, seeds and base items were checked",
                  file=sys.stderr)
    clash = sorted(set(report["methods"]) & set(other["methods"]))
    if clash:
        refuse(f"run names already in the first report: {', '.join(clash)} (rename them in one report.json)")

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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=__doc__.split("\n\n")[1].strip())
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--add", type=Path, action="append", default=[], metavar="OTHER_DIR")
    args = parser.parse_args(argv)
    report = json.loads((args.source / "report.json").read_text())
    for other in args.add:
        report = joined(report, json.loads((other / "report.json").read_text()), where=str(other / "report.json"))
    report = rerender(report)
    out = args.out or args.source
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
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

"""Re-render a stored `forgetless compare` report with the current statistics (forgetless.stats), from the
per-item values it stores: no model is loaded, nothing is trained or evaluated.

    .venv/bin/python scripts/rerender_report.py DIR [OUT_DIR]

DIR holds report.json (its `per_seed` evaluations with their items, and the base's in `results.base`).
Every figure, interval, paired difference and Holm mark (one family over every starred cell) is recomputed;
report.json, report.md and the PNG plots are written to OUT_DIR (default: DIR itself, in place) by compare's
own functions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from forgetless.compare import mark_comparisons, paired_differences, plot, render_markdown, summarise_results


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


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    source = Path(argv[0])
    out = Path(argv[1]) if len(argv) == 2 else source
    report = rerender(json.loads((source / "report.json").read_text()))
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

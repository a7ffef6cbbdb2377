"""LfU's two knobs, lam x alpha, on the embedded default's validation split (issue #29, item 3).

    .venv/bin/python bench/lfu_knobs.py          # trains what is missing (about 14 runs, ~4 min each on 2 cores), then summarises
    .venv/bin/python bench/lfu_knobs.py --summary   # only the summary of what is trained
    .venv/bin/python bench/lfu_knobs.py --alphas 0.03,0.1,0.3   # a part of the grid
    .venv/bin/python bench/lfu_knobs.py --jobs 2   # two points train at a time (as the default frontier did)

It is a `forgetless frontier` run (forgetless.frontier.run_frontier) on the packaged default, in the same
output folder as the default frontier (runs/frontier-default), so sft and the lfu-fast points at the
paper's alpha = 0.1 that the default frontier trained are reused: one row per alpha (the `lfu-fast` preset
for 0.1, a `compare.runs` entry `lfu-fast-a<alpha>` for each other alpha), each over lam. Every point uses
lfu-fast's cost settings (the perturbed pass on half the rows of every 4th micro-batch, whose estimate of the
exact term is unbiased; issue #18): 16 exact-LfU runs would take twice as long on this CPU.

Besides the validation figures of each point (target NLL and gain, general-text perplexity change, drift
KL), it reads from each run's metrics.jsonl what the term did: the mean l_cons per application, the mean
lfu_rel_shift (||h' - h|| / ||h||, the perturbation's relative effect on the representations; runs trained
before that metric existed have none), and lam * l_cons against l_sft in the first logged row (the run's first step) (how much
larger than the SFT loss the LfU term starts). Writes bench/lfu_knobs.json and docs/lfu-knobs.png (the
frontier plot of these points, one line per alpha, labelled by lam).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from forgetless.cli import resolve_config_path
from forgetless.config import load_config
from forgetless.frontier import plot, run_frontier

HERE = Path(__file__).resolve().parent
OUT = Path("runs/frontier-default")
LAMS = [0.5, 2.0, 5.0, 20.0]
ALPHAS = [0.01, 0.03, 0.1, 0.3]
RUN_ORDER = [0.1, 0.03, 0.3, 0.01]  # the paper's alpha first, then outwards (an interrupted study keeps the nearest)
CHEAP = {"rows": 0.5, "every": 4}  # the lfu-fast preset's settings


def method_of(alpha: float) -> str:
    return "lfu-fast" if alpha == 0.1 else f"lfu-fast-a{alpha:g}"


def study_config():
    runs = {method_of(a): {"regularizers": [{"lfu": {**CHEAP, "alpha": a}}]} for a in ALPHAS if a != 0.1}
    methods = [method_of(a) for a in RUN_ORDER if a in ALPHAS]
    overrides = [f"output_dir={OUT}", f"frontier.methods={json.dumps(methods)}",
                 f"compare.runs={json.dumps(runs)}", "frontier.evaluate_chosen=false",
                 f"frontier.grids={json.dumps({m: LAMS for m in methods})}"]
    return load_config(resolve_config_path("default"), overrides)


def term_figures(run_dir: str) -> dict:
    """What the LfU term did in one run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl") if '"l_cons"' in line]
    if not rows:
        return {}
    shifts = [r["lfu_rel_shift"] for r in rows if "lfu_rel_shift" in r]
    first = rows[0]
    return {"l_cons_mean": sum(r["l_cons"] for r in rows) / len(rows), "logged_rows": len(rows),
            "rel_shift_mean": sum(shifts) / len(shifts) if shifts else None,
            "first_l_cons": first["l_cons"], "first_l_sft": first.get("l_sft")}


def summarise(report: dict) -> dict:
    sft = report["sft"]
    points = []
    for alpha in ALPHAS:
        for p in report["methods"][method_of(alpha)]["points"]:
            term = term_figures(p["run"])
            if term.get("first_l_sft"):
                term["first_term_over_sft"] = p["value"] * term["first_l_cons"] / term["first_l_sft"]
            points.append({"alpha": alpha, "lam": p["value"], **{k: p[k] for k in (
                "target_nll", "target_gain", "general_drop", "general_nll_change", "drift_kl")}, **term})
    return {"source": "bench/lfu_knobs.py on the embedded default (one seed, train.seed 42), validation split",
            "settings": {"lam": LAMS, "alpha": ALPHAS, **CHEAP},
            "sft": {k: sft[k] for k in ("target_nll", "target_gain", "general_drop", "drift_kl")},
            "base": report["validation"], "points": points}


def main(argv: list[str]) -> int:
    global ALPHAS
    if "--alphas" in argv:  # a part of the study, e.g. --alphas 0.03,0.1,0.3
        ALPHAS = [float(a) for a in argv[argv.index("--alphas") + 1].split(",")]
    jobs = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else 1
    cfg = study_config()
    if "--summary" in argv:
        report = json.loads((OUT / "frontier.json").read_text())
    else:
        report = run_frontier(cfg, jobs=jobs)
    summary = summarise(report)
    (HERE / "lfu_knobs.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(report, OUT / "frontier.png")
    shutil.copyfile(OUT / "frontier.png", HERE.parent / "docs" / "lfu-knobs.png")
    print(f"{'alpha':>6} {'lam':>5} {'target NLL':>10} {'ppl':>8} {'drift':>7} {'l_cons':>7} {'shift':>7} {'term/sft':>8}")
    s = summary["sft"]
    print(f"{'sft':>6} {'':>5} {s['target_nll']:10.4f} {100 * s['general_drop']:+7.2f}% {s['drift_kl']:7.4f}")
    for p in summary["points"]:
        shift = f"{p['rel_shift_mean']:7.4f}" if p.get("rel_shift_mean") is not None else f"{'-':>7}"
        ratio = f"{p['first_term_over_sft']:8.2f}" if p.get("first_term_over_sft") is not None else f"{'-':>8}"
        print(f"{p['alpha']:6g} {p['lam']:5g} {p['target_nll']:10.4f} {100 * p['general_drop']:+7.2f}% "
              f"{p['drift_kl']:7.4f} {p.get('l_cons_mean', float('nan')):7.4f} {shift} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

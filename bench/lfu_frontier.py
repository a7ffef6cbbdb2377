"""LfU's cost / retention frontier (issue #18): exact LfU against its cheap settings, with several seeds.

    .venv/bin/python bench/lfu_frontier.py            # trains and evaluates (~50 min on 2 cores), then plots
    .venv/bin/python bench/lfu_frontier.py --plot     # redraw from runs/lfu-frontier/report.json

Retention: `forgetless compare default` with plain SFT, exact LfU and the cheap settings as
`compare.runs`, seeds 1-3, paired differences against exact LfU (`compare.paired_with`), in a regime
where plain SFT clearly forgets (learning rate 2e-3; the packaged default's 5e-4 barely moves the
model). Cost: the step-time ratios of one interleaved bench run (bench/results_lfu_cheap.json,
`bench/bench.py --steps 12 --warmup 2 --methods sft lfu_lora ... --out bench/results_lfu_cheap.json`).
A setting keeps LfU's retention when the 95% paired intervals of its drift KL and robustness std
against exact LfU contain zero (or lie below it: retaining more). Writes bench/lfu_frontier.json and
docs/lfu-frontier.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = Path("runs/lfu-frontier")

sys.path.insert(0, str(HERE))
from bench import METHODS  # noqa: E402  (the bench's LfU options are the ones compared here)

# compare run name -> (bench method, its LfU options besides the variant)
SETTINGS = {name: (method, {k: v for k, v in METHODS[method][0]["lfu"].items() if k != "variant"})
            for name, method in [("lfu", "lfu_lora"), ("lfu-r50-e2", "lfu_r50_e2"), ("lfu-r25-e2", "lfu_r25_e2")]}
OVERRIDES = ["train.learning_rate=2e-3", "evaluation.every_steps=0", "compare.seeds=[1, 2, 3]",
             "compare.methods=[sft, lfu]", "compare.paired_with=[sft, lfu]"]
RETENTION = ("general_drift_kl", "robust_acc_std")  # the criterion: inside exact LfU's intervals


def run() -> dict:
    from forgetless.cli import resolve_config_path
    from forgetless.compare import run_compare
    from forgetless.config import load_config

    runs = {name: {"regularizers": [{"lfu": {"variant": "lora", **opts}}]}
            for name, (_, opts) in SETTINGS.items() if name != "lfu"}
    config = load_config(resolve_config_path("default"),
                         [f"output_dir={ROOT}", *OVERRIDES, f"compare.runs={json.dumps(runs)}"])
    return run_compare(config)


def summarise(report: dict) -> dict:
    cost = json.loads((HERE / "results_lfu_cheap.json").read_text())
    rows = {"sft": {"step_time_ratio": 1.0}}
    for name, (bench_name, opts) in SETTINGS.items():
        paired = report["paired"][name]
        row = {"options": opts, "step_time_ratio": cost[bench_name]["step_time_ratio"]}
        if name != "lfu":
            row["vs_lfu"] = {m: paired[m]["vs_lfu"] for m in ("target_nll", "general_ppl", *RETENTION)}
            row["keeps_retention"] = all(row["vs_lfu"][m]["ci95"][0] <= 0 for m in RETENTION)
        rows[name] = row
    for name, row in rows.items():
        res = report["results"][name]
        row.update({m: {"value": res[m]["value"], "seed_std": res[m].get("seed_std")}
                    for m in ("target_nll", "target_acc", "general_ppl", "general_drift_kl", "robust_acc_std")})
        if name != "sft":
            row["vs_sft"] = {m: report["paired"][name][m]["vs_sft"] for m in ("general_ppl", *RETENTION)}
    return {"regime": OVERRIDES, "seeds": report["seeds"], "base": {m: report["results"]["base"][m]["value"]
                                                                    for m in ("target_nll", "general_ppl")},
            "cost_source": "bench/results_lfu_cheap.json", "machine": cost["sft"]["machine"], "rows": rows}


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, [("general_drift_kl", "drift KL from the base (nats/token) ↓"),
                                       ("robust_acc_std", "accuracy std over 5 prompt templates ↓")]):
        for i, (name, row) in enumerate(summary["rows"].items()):
            x, y, err = row["step_time_ratio"], row[key]["value"], row[key]["seed_std"] or 0
            ax.errorbar([x], [y], yerr=[err], fmt="o", color=f"C{i}", capsize=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel("step time × plain SFT (CPU bench)")
        ax.set_ylabel(label)
    fig.suptitle(f"LfU cost vs retention (mean ± std over seeds {summary['seeds']}; {summary['regime'][0]})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    report = json.loads((ROOT / "report.json").read_text()) if "--plot" in sys.argv else run()
    summary = summarise(report)
    (HERE / "lfu_frontier.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, HERE.parent / "docs" / "lfu-frontier.png")
    for name, row in summary["rows"].items():
        print(name, row["step_time_ratio"], {m: round(row[m]["value"], 4) for m in RETENTION},
              row.get("keeps_retention", ""))


if __name__ == "__main__":
    main()

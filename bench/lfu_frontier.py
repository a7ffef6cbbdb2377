"""LfU's cost / retention frontier (issue #18): exact LfU against its cheap settings, several seeds.

    bash scripts/evidence.sh                      # trains and evaluates (see there), then:
    .venv/bin/python bench/lfu_frontier.py [REPORT]   # summary + plot from runs/evidence/report.json (or REPORT)

Retention: the multi-seed evidence on the embedded default (its regime: learning rate 1e-3, 160 steps,
the four-domain general yardstick), plain SFT, exact LfU and each cheap setting as `compare.runs`,
paired differences against exact LfU (`compare.paired_with: [sft, lfu]`). Cost: the step-time ratios
of one interleaved bench run per machine (bench/results_lfu_cheap.json on the 2-core CPU,
bench/results_gpu_lfu_cheap.json on one H100). A setting keeps LfU's retention when the 95% paired
intervals of its drift KL and robustness std against exact LfU contain zero or lie below it (retaining
more). The preset `lfu-fast` is the cheapest such setting. Writes bench/lfu_frontier.json and
docs/lfu-frontier.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORT = Path("runs/evidence/report.json")

sys.path.insert(0, str(HERE))
from bench import METHODS  # noqa: E402  (the bench's LfU options are the ones compared here)

# evidence run name -> the bench method measuring its cost
SETTINGS = {"lfu": "lfu_lora", "lfu-r50-e2": "lfu_r50_e2", "lfu-every4": "lfu_every4",
            "lfu-r50-e4": "lfu_r50_e4", "lfu-early": "lfu_lora_early"}
RETENTION = ("general_drift_kl", "robust_acc_std")  # the criterion: inside exact LfU's intervals
SHOWN = ("target_nll", "target_acc", "general_ppl", "general_drift_kl", "robust_acc_std", "instr_nll")


def summarise(report: dict) -> dict:
    cpu = json.loads((HERE / "results_lfu_cheap.json").read_text())
    gpu = json.loads((HERE / "results_gpu_lfu_cheap.json").read_text())
    rows = {"sft": {"options": {}, "cost_cpu": 1.0, "cost_gpu": 1.0}}
    for name, bench_name in SETTINGS.items():
        opts = {k: v for k, v in METHODS[bench_name]["regularizers"][0]["lfu"].items() if k != "variant"}
        rows[name] = {"options": opts, "cost_cpu": cpu[bench_name]["step_time_ratio"],
                      "cost_gpu": gpu[bench_name]["step_time_ratio"]}
    for name, row in rows.items():
        res, paired = report["results"][name], report["paired"][name]
        row.update({m: {"value": res[m]["value"], "ci95": res[m].get("ci95")} for m in SHOWN})
        for ref in ("sft", "lfu"):
            if name != ref:
                row[f"vs_{ref}"] = {m: paired[m][f"vs_{ref}"] for m in ("target_nll", "target_acc", "general_ppl",
                                                                         *RETENTION)}
        if name not in ("sft", "lfu"):
            row["keeps_retention"] = all(row["vs_lfu"][m]["ci95"][0] <= 0 for m in RETENTION)
    keeping = [n for n, r in rows.items() if r.get("keeps_retention")]
    return {"source": str(REPORT), "seeds": report["seeds"], "settings": report["settings"],
            "cost_sources": {"cpu": f"bench/results_lfu_cheap.json ({cpu['sft']['machine']})",
                             "gpu": f"bench/results_gpu_lfu_cheap.json ({gpu['sft']['machine']})"},
            "cheapest_keeping_retention": {
                "cpu": min(keeping, key=lambda n: rows[n]["cost_cpu"], default=None),
                "gpu": min(keeping, key=lambda n: rows[n]["cost_gpu"], default=None)},
            "rows": rows}


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [("general_drift_kl", "drift KL from the base (nats/token) ↓"),
              ("robust_acc_std", "accuracy std over 5 prompt templates ↓"),
              ("target_nll", "target NLL (the task) ↓")]
    for ax, (key, label) in zip(axes, panels):
        for i, (name, row) in enumerate(summary["rows"].items()):
            y = row[key]["value"]
            lo, hi = row[key]["ci95"] or (y, y)
            ax.errorbar([row["cost_cpu"]], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=f"C{i}", capsize=3)
            ax.plot([row["cost_gpu"]], [y], marker="s", mfc="none", color=f"C{i}")
            ax.plot([row["cost_cpu"], row["cost_gpu"]], [y, y], color=f"C{i}", lw=0.6, alpha=0.5)
            ax.annotate(name, (row["cost_cpu"], y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.axvline(1.3, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("step time × plain SFT (● CPU, □ H100; dashed: the 1.3× target)")
        ax.set_ylabel(label)
    fig.suptitle(f"LfU cost vs retention (mean over seeds {summary['seeds']} with its 95% interval, embedded default)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    global REPORT
    REPORT = Path(sys.argv[1]) if len(sys.argv) > 1 else REPORT
    summary = summarise(json.loads(REPORT.read_text()))
    (HERE / "lfu_frontier.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, HERE.parent / "docs" / "lfu-frontier.png")
    for name, row in summary["rows"].items():
        print(f"{name:12s} cpu {row['cost_cpu']:.2f} gpu {row['cost_gpu']:.2f}",
              {m: round(row[m]["value"], 4) for m in RETENTION}, row.get("keeps_retention", ""))
    print("cheapest keeping exact LfU's retention:", summary["cheapest_keeping_retention"])


if __name__ == "__main__":
    main()

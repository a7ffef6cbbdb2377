"""Cost of the forgetting-budget search against one plain training run, measured in one run.

    .venv/bin/python bench/budget_cost.py                          # embedded default, bound 1%
    .venv/bin/python bench/budget_cost.py budget.max_general_drop=0.02 budget.knob=kl

Runs, one after the other on the same machine: (1) plain `forgetless train default` as a
reference, (2) the same with the budget set (the README example), and writes
bench/budget.json with both wall times, their ratio, and what the search chose and achieved.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from forgetless.budget import train_with_budget
from forgetless.cli import resolve_config_path
from forgetless.config import load_config
from forgetless.train import train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import machine  # noqa: E402


def main() -> None:
    overrides = sys.argv[1:] or ["budget.max_general_drop=0.01"]
    root = Path("runs/bench-budget")
    plain = load_config(resolve_config_path("default"), [f"output_dir={root / 'plain'}"])
    started = time.perf_counter()
    train(plain, overwrite=True)
    plain_s = time.perf_counter() - started

    cfg = load_config(resolve_config_path("default"), [f"output_dir={root / 'budget'}", *overrides])
    started = time.perf_counter()
    report = train_with_budget(cfg, overwrite=True)
    budget_s = time.perf_counter() - started
    result = {
        "machine": machine(), "overrides": overrides,
        "plain_train_seconds": round(plain_s, 1), "budget_seconds": round(budget_s, 1),
        "budget_over_plain": round(budget_s / plain_s, 2),
        "candidates": len(report["trials"]), "chosen": report["chosen"], "held_out": report["held_out"],
        "target_gain_kept": report.get("target_gain_kept"), "base": report["base"],
    }
    (HERE / "budget.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

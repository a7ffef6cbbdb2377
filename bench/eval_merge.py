"""What merging a float32 LoRA run's adapters into its base costs and saves in compare's evaluation suite.

compare evaluates a float32, unquantised LoRA run with its adapters folded into the base weights
(forgetless.evaluate.merges_for_evaluation). This times the embedded default's whole suite on one trained
run both ways, interleaved (unmerged, merged, merged, unmerged, ... : each way first as often), in one
process with the base's instruction answers generated once beforehand (both ways reuse them, as compare
does), and reports the seconds of each evaluation and the largest difference of any per-item figure.

    .venv/bin/python bench/eval_merge.py RUN_DIR [--reps 2] [--out bench/eval_merge.json]

RUN_DIR: a finished LoRA run of the embedded default (e.g. the main job's runs/compare/sft).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from forgetless.config import load_config
from forgetless.evaluate import evaluate, load_base, merges_for_evaluation
from forgetless.model import load_trained


def evaluate_once(config, base, tokenizer, run_dir: str, merge: bool) -> tuple[float, dict]:
    start = time.perf_counter()
    model, _ = load_trained(run_dir, dtype=base.dtype)
    if merge:
        model = model.merge_and_unload()
    items = evaluate(model.eval(), tokenizer, config.evaluation, config.data, base=base,
                     name="merged" if merge else "unmerged")["items"]
    return time.perf_counter() - start, items


def largest_difference(a: dict, b: dict) -> dict[str, float]:
    out = {}
    for key in a:
        if key.endswith("_ids"):
            assert a[key] == b[key], key
            continue
        flat_a = [x for row in a[key] for x in (row if isinstance(row, list) else [row])]
        flat_b = [x for row in b[key] for x in (row if isinstance(row, list) else [row])]
        out[key] = max((abs(x - y) for x, y in zip(flat_a, flat_b)), default=0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default="bench/eval_merge.json")
    args = parser.parse_args()
    config = load_config(Path(args.run_dir) / "config.yaml")
    base, tokenizer = load_base(config)
    assert merges_for_evaluation(args.run_dir, base.dtype), "a float32, unquantised LoRA run is needed"
    start = time.perf_counter()
    evaluate(base, tokenizer, config.evaluation, config.data, name="base")  # generates the base's answers once
    base_seconds = time.perf_counter() - start
    seconds: dict[str, list[float]] = {"unmerged": [], "merged": []}
    items: dict[str, dict] = {}
    for rep in range(args.reps):
        for merge in ((False, True) if rep % 2 == 0 else (True, False)):
            name = "merged" if merge else "unmerged"
            took, items[name] = evaluate_once(config, base, tokenizer, args.run_dir, merge)
            seconds[name].append(round(took, 1))
            print(f"rep {rep + 1}: {name} {took:.1f} s", flush=True)
    diff = largest_difference(items["unmerged"], items["merged"])
    ratio = statistics.median(seconds["merged"]) / statistics.median(seconds["unmerged"])
    result = {"run_dir": args.run_dir, "reps": args.reps, "base_evaluation_s": round(base_seconds, 1),
              "seconds": seconds, "merged_over_unmerged": round(ratio, 3),
              "largest_item_difference": {k: v for k, v in diff.items() if not math.isnan(v)},
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

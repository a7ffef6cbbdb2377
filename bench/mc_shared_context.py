"""What running each multiple-choice context once saves in compare's evaluation suite.

The suite scores a question's choices by log-likelihood. forgetless.evaluate.choice_logprobs runs each context
once and continues it for every choice from its key/value cache; before, each (context, choice) pair ran whole
(evaluate.token_logprobs). This times both on the embedded default's MMLU sample (120 questions, 4 choices)
for the base and, given RUN_DIR, a trained run as compare evaluates it (adapters merged), interleaved (pairs,
shared, shared, pairs, ...: each way first as often), and reports the seconds, the largest difference of any
choice's score and how many picks (acc and acc_norm) differ.

    .venv/bin/python bench/mc_shared_context.py [RUN_DIR] [--reps 2] [--out bench/mc_shared_context.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import forgetless
from forgetless.config import load_config
from forgetless.evaluate import choice_logprobs, load_base, load_mc, merges_for_evaluation, token_logprobs
from forgetless.model import load_trained

DEFAULT = Path(forgetless.__file__).parent / "configs" / "default.yaml"


def picks(scores: list[list[float]], rows: list[dict]) -> list[tuple[int, int]]:
    """Each question's (acc pick, acc_norm pick), as evaluate scores them."""
    out = []
    for s, row in zip(scores, rows):
        norm = [v / max(len(c.encode("utf-8")) + 1, 1) for v, c in zip(s, row["choices"])]
        out.append((max(range(len(s)), key=lambda j: s[j]), max(range(len(s)), key=lambda j: norm[j])))
    return out


def compare_ways(model, tokenizer, config, reps: int, label: str) -> dict:
    rows = load_mc(config.evaluation.mc, config.evaluation.mc_limit)
    questions = [(tokenizer(f"Question: {row['question'].strip()}\nAnswer:", add_special_tokens=False)["input_ids"],
                  tokenizer([f" {c}" for c in row["choices"]], add_special_tokens=False)["input_ids"]) for row in rows]
    batch = config.evaluation.batch_size
    seconds: dict[str, list[float]] = {"pairs": [], "shared": []}
    scores: dict[str, list[list[float]]] = {}
    for rep in range(reps):
        for way in (("pairs", "shared") if rep % 2 == 0 else ("shared", "pairs")):
            start = time.perf_counter()
            if way == "shared":
                scores[way] = choice_logprobs(model, tokenizer, questions, batch, f"{label}: shared")
            else:
                flat = iter(token_logprobs(model, tokenizer, [(ctx, c) for ctx, choices in questions for c in choices],
                                           batch, f"{label}: pairs"))
                scores[way] = [[next(flat) for _ in choices] for _, choices in questions]
            seconds[way].append(round(time.perf_counter() - start, 1))
            print(f"{label} rep {rep + 1}: {way} {seconds[way][-1]} s", flush=True)
    diff = max(abs(a - b) for p, s in zip(scores["pairs"], scores["shared"]) for a, b in zip(p, s))
    pick_pairs, pick_shared = picks(scores["pairs"], rows), picks(scores["shared"], rows)
    context_tokens = sum(len(ctx) for ctx, _ in questions)
    choice_tokens = sum(len(c) for _, choices in questions for c in choices)
    return {"seconds": seconds,
            "shared_over_pairs": round(statistics.median(seconds["shared"]) / statistics.median(seconds["pairs"]), 3),
            "largest_score_difference": diff,
            "acc_picks_differing": sum(a[0] != b[0] for a, b in zip(pick_pairs, pick_shared)),
            "acc_norm_picks_differing": sum(a[1] != b[1] for a, b in zip(pick_pairs, pick_shared)),
            "questions": len(rows), "tokens_pairs": sum(len(ctx) * len(ch) for ctx, ch in questions) + choice_tokens,
            "tokens_shared": context_tokens + choice_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default="bench/mc_shared_context.json")
    args = parser.parse_args()
    config = load_config(DEFAULT)
    base, tokenizer = load_base(config)
    result = {"base": compare_ways(base, tokenizer, config, args.reps, "base")}
    if args.run_dir:
        model, _ = load_trained(args.run_dir, dtype=base.dtype)
        if merges_for_evaluation(args.run_dir, base.dtype):
            model = model.merge_and_unload()
        result["run"] = {"run_dir": args.run_dir, **compare_ways(model.eval(), tokenizer, config, args.reps, "run")}
    result.update({"batch_size": config.evaluation.batch_size, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")})
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

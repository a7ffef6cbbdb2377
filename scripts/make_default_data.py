"""Regenerate the shipped default task (src/forgetless/assets/arithmetic/) with reasoning-gym.

The files are committed, so users never need this script or reasoning-gym; it documents exactly
how the data was made. Run: .venv/bin/pip install reasoning-gym==0.1.25 && .venv/bin/python scripts/make_default_data.py
"""

import json
from pathlib import Path

import reasoning_gym

OUT = Path(__file__).resolve().parent.parent / "src" / "forgetless" / "assets" / "arithmetic"
# Small integers, two or three terms, + and -: a skill a 135M model can pick up in ~100 LoRA steps.
SETTINGS = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, operators=["+", "-"],
                allow_parentheses=False, allow_negation=False)


def generate(seed: int, size: int) -> list[dict]:
    dataset = reasoning_gym.create_dataset("basic_arithmetic", seed=seed, size=size, **SETTINGS)
    return [{"prompt": item["question"], "response": str(item["answer"])} for item in dataset]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # reasoning-gym seeds item i with seed + i, so one draw is split rather than two seeds used.
    unique, seen = [], set()
    for row in generate(seed=1, size=3000):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            unique.append(row)
    # Disjoint by construction: a question appears once, in one split.
    train, test = unique[:2000], unique[2000:2500]
    for name, rows in [("train", train), ("test", test)]:
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()

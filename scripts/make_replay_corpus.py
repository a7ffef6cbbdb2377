"""Regenerate the shipped default replay corpus (src/forgetless/assets/replay/kjv.txt.gz).

Source: the King James Bible (public domain) from Debian's `bible-kjv` package:
    apt-get install -y bible-kjv && bible -f "Genesis 1:1-Revelation 22:21" > /tmp/kjv.txt
    .venv/bin/python scripts/make_replay_corpus.py /tmp/kjv.txt
Verse references are dropped and each chapter becomes one document of one paragraph (documents are
separated by lines holding only a form feed: forgetless.data.load_texts). Only the first ~1.2 MB
(Genesis onwards) is kept: ample for replay at the default ratio, small enough to ship.
"""

import gzip
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "forgetless" / "assets" / "replay" / "kjv.txt.gz"
LIMIT = 1_200_000
VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def main(path: str) -> None:
    chapters, current, key = [], [], None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = VERSE.match(line.strip())
        if not m:
            if current and line.strip():
                current[-1] += " " + line.strip()  # a verse continued on the next line
            continue
        if (m.group(1), m.group(2)) != key and current:
            chapters.append(" ".join(current))
            current = []
        key = (m.group(1), m.group(2))
        current.append(m.group(4))
    chapters.append(" ".join(current))
    text, size = [], 0
    for chapter in chapters:
        if size + len(chapter) > LIMIT:
            break
        text.append(chapter)
        size += len(chapter) + 2
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT, "wt", encoding="utf-8") as f:
        f.write("\n\f\n".join(text) + "\n")
    print(f"{len(text)} chapters, {size} characters -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])

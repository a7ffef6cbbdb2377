"""Regenerate the general-yardstick texts of src/forgetless/assets/general/ beside verne_2889.txt (fiction).

Three more domains, each from a Debian package (free licences; none shares a domain with the replay
corpus, the King James Bible), cut to whole paragraphs up to ~32 KB (as long as the Verne text):
  - python_docs.txt    technical documentation: <p> paragraphs of the Python 3.11 tutorial and HOWTOs
                       (Debian `python3.11-doc` 3.11.2-6+deb12u8; PSF License Version 2)
  - debian_handbook.txt expository prose: <p> paragraphs of "The Debian Administrator's Handbook"
                       (Debian `debian-handbook` 11.20220922, en-US; GPL-2.0+ or CC-BY-SA-3.0)
  - fortunes.txt       short quotations and dialogue: the `fortunes` file of Debian `fortunes-min`
                       1:1.99.1-7.3 (BSD licence, see that package's copyright file)
Run (any Debian machine, no root needed):
    mkdir -p /tmp/deb && cd /tmp/deb && apt-get download python3.11-doc debian-handbook fortunes-min \
      && for f in *.deb; do dpkg -x $f x; done && cd - && python scripts/make_general_texts.py /tmp/deb/x
"""

from __future__ import annotations

import html
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "src" / "forgetless" / "assets" / "general"
LIMIT = 32_000  # characters per domain
VOID = {"br", "img", "hr", "input", "meta", "link", "wbr"}  # elements without an end tag


class Paragraphs(HTMLParser):
    """The text of every paragraph: <p> (Sphinx) or <div class="para"> (Publican, the handbook's), inline
    markup flattened. Paragraphs do not nest in either, so one open paragraph at a time."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self.depth = 0  # open elements since the paragraph began (0: outside a paragraph)
        self.current: list[str] = []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += tag not in VOID
        elif tag == "p" or (tag == "div" and ("class", "para") in attrs):
            self.depth, self.current = 1, []

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1
            if not self.depth:
                self.found.append("".join(self.current))

    def handle_data(self, data):
        if self.depth:
            self.current.append(data)


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(text)).replace("¶", "").strip()


def prose(files: list[Path], limit: int = LIMIT) -> list[str]:
    """Paragraphs of whole sentences (>= 120 characters, ending in . ? or !) from the files, in order."""
    out, size = [], 0
    for path in files:
        parser = Paragraphs()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        for p in map(clean, parser.found):
            if len(p) >= 120 and p[-1] in ".?!" and size + len(p) <= limit:
                out.append(p)
                size += len(p) + 2
        if size >= limit - 200:
            break
    return out


def fortunes(path: Path, limit: int = LIMIT) -> list[str]:
    out, size = [], 0
    for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
        text = "\n".join(line.rstrip() for line in entry.strip().splitlines() if line.strip())
        if 40 <= len(text) <= 600 and size + len(text) <= limit:
            out.append(text)  # single newlines kept: dialogue lines and the attribution line
            size += len(text) + 2
    return out


def write(name: str, paragraphs: list[str], separator: str = "\n\n") -> None:
    """One document of paragraphs (blank lines between them), or with separator "\\n\\f\\n" one document per
    entry (forgetless.data.load_texts: a form-feed line ends a document)."""
    (ASSETS / name).write_text(separator.join(paragraphs) + "\n", encoding="utf-8")
    print(f"{name}: {len(paragraphs)} paragraphs, {sum(map(len, paragraphs))} characters")


def main() -> None:
    root = Path(sys.argv[1])
    docs = root / "usr/share/doc/python3.11/html"
    write("python_docs.txt", prose(sorted((docs / "tutorial").glob("*.html")) + sorted((docs / "howto").glob("*.html"))))
    handbook = root / "usr/share/doc/debian-handbook/html/en-US"
    # the chapters that explain (what Debian is, how it is made, its packaging system), not reference lists
    chapters = ["foreword", "sect.what-is-debian", "sect.foundation-documents", "sect.debian-internals",
                "sect.role-of-distributions", "sect.lifecycle-of-release", "sect.binary-package-structure",
                "sect.package-meta-information", "sect.source-package-structure", "sect.manipulating-packages-with-dpkg",
                "sect.coexistence-other-packaging-systems", "apt", "solving-problems", "sect.support-sources"]
    files = [handbook / f"{c}.html" for c in chapters if (handbook / f"{c}.html").exists()]
    write("debian_handbook.txt", prose(files + sorted(set(handbook.glob("*.html")) - set(files))))
    write("fortunes.txt", fortunes(root / "usr/share/games/fortunes/fortunes"), "\n\f\n")  # each quotation a document


if __name__ == "__main__":
    main()

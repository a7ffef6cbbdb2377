"""Data that ships with forgetless; `builtin:NAME` in a config points here."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def resolve_builtin(spec: str) -> Path:
    """`builtin:arithmetic/train.jsonl` -> the packaged file; other strings are plain paths."""
    if spec.startswith("builtin:"):
        return ASSETS / spec[len("builtin:"):]
    return Path(spec).expanduser()

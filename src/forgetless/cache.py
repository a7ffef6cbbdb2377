"""What a run computes once and keeps with its checkpoints (KL reference cache, EWC Fisher, forgetting-curve
reference, self-replay text): written atomically, so a killed run never leaves half a file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file at `path`, written to a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """`text` at `path`, written to a temporary name and renamed into place (never half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: workers may write side by side
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    """`data` as JSON at `path`, written to a temporary name and renamed into place."""
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def load_matching(path: Path, metadata: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The tensors at `path` when the file was written with exactly `metadata`; None when it is absent,
    built for other inputs, or unreadable (a corrupt or truncated file is rebuilt, never an error)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            found = f.metadata() or {}
        return load_file(str(path)) if found == metadata else None  # a stale file is never loaded
    except Exception as exc:  # safetensors raises its own error types, OSError or ValueError on a damaged file
        logger.warning("%s is unreadable (%s: %s); it is rebuilt", path, type(exc).__name__, exc)
        return None


def build_once(path: Path, metadata: dict[str, str], build: Callable[[], dict[str, torch.Tensor]], accelerator: Any,
               what: str, fits: Callable[[dict[str, torch.Tensor]], bool] = lambda tensors: True
               ) -> dict[str, torch.Tensor]:
    """The tensors kept at `path` when they were built with the same `metadata` (and `fits` them), else
    `build()` on the main process, saved atomically; every other process then reads the main one's file
    (the main process goes first). So a resumed run, or a rerun in the same folder, never builds twice."""
    with accelerator.main_process_first():
        if path.exists():
            tensors = load_matching(path, metadata)
            if tensors is not None and fits(tensors):
                logger.info("%s: reusing %s", what, path)
                return tensors
            if accelerator.is_main_process:
                logger.warning("%s: %s was built for other settings, data or inputs; rebuilding it", what, path)
        if not accelerator.is_main_process:
            return load_file(str(path))  # written just now by the main process
        tensors = build()
        save_atomic(tensors, path, metadata=metadata)
        return tensors

"""What a run computes once and keeps with its checkpoints (KL reference cache, EWC Fisher, forgetting-curve
reference, self-replay text): written atomically, so a killed run never leaves half a file."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file at `path`, written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)

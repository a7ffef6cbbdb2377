"""Keeping the process's environment as the user set it.

The library changes nothing process-wide on import or in train(); a third-party import that does is wrapped in
`environment_kept()`. Known today: torch writes TORCHINDUCTOR_CACHE_DIR into os.environ whenever it looks for
its compile cache folder, which happens on importing torch._dynamo (transformers' model and trainer code does,
at import or while a model loads) and on importing bitsandbytes (transformers pulls it in when it is installed;
it runs torch.compile on a few kernels). Taking the variable back is harmless: torch computes the same default
whenever it needs it. Not wrapped, on purpose: what accelerate sets for an engine a config asks for
(ACCELERATE_USE_DEEPSPEED / _FSDP, torch_compile's settings), which it reads again later in the run."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def environment_kept() -> Iterator[None]:
    """os.environ as it was on entry, restored on exit (variables added removed, changed ones set back)."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value

"""Third-party lines the command line quiets: printed on every run, by libraries forgetless loads, and nothing a
user of forgetless can act on. Each is matched by its logger or warning text, so anything else they say still
shows. The CLI calls `quiet_third_party_noise` (and hands it to compare's and frontier's worker processes); the
library never does, since it changes process-wide warning and logging state.

Standard library only: a spawned worker calls it before it imports anything else."""

from __future__ import annotations

import logging
import warnings

# peft asks every model it wraps for the attribute transformers renamed (transformers' FutureWarning, once a run)
PEFT_RENAMED_ATTRIBUTE = r"`is_gradient_checkpointing` is deprecated"
# bitsandbytes, on import, on a CPU with avx512_bf16 and no `kernels` package: only QLoRA on a CPU runs the 4-bit
# kernel it names, so it is kept for a config that quantizes
BITSANDBYTES_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_KERNEL = "Failed to load CPU gemm_4bit_forward"
# DeepSpeed, imported by transformers' Trainer when it is installed, on any machine without a GPU
DEEPSPEED_LOGGER = "DeepSpeed"
DEEPSPEED_NO_GPU = "Setting accelerator to CPU."


_quieted: bool | None = None  # how this process quieted them (`quantized`), None: it did not


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_third_party_noise(quantized: bool = False) -> None:
    """Drop the lines above (`quantized`: the config loads its model in 4 or 8 bits; bitsandbytes' kernel note
    then stays). A filter on each named logger, added once: the loggers keep their levels and handlers."""
    global _quieted
    _quieted = quantized
    warnings.filterwarnings("ignore", message=PEFT_RENAMED_ATTRIBUTE, category=FutureWarning)
    quieted = [(DEEPSPEED_LOGGER, DEEPSPEED_NO_GPU)] + ([] if quantized else [(BITSANDBYTES_LOGGER, BITSANDBYTES_KERNEL)])
    for name, prefix in quieted:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))


def quieted() -> bool | None:
    """How this process quieted the lines (the `quantized` it was given), None when it did not: what a spawned
    worker needs to do as its parent did (forgetless.workers)."""
    return _quieted

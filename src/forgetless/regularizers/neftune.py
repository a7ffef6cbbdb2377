"""NEFTune: uniform noise on the input embeddings while training (Jain et al., "NEFTune: Noisy
Embeddings Improve Instruction Finetuning", ICLR 2024, arXiv 2310.05914).

Not re-implemented: transformers' Trainer already attaches the noise hook when
`neftune_noise_alpha` is set (noise ~ U(-a, a), a = alpha / sqrt(sequence length * hidden size),
training mode only, removed when training ends). This regularizer only sets it, so NEFTune is a
`regularizers:` entry like every other method and composes with them. No loss term.
"""

from __future__ import annotations

from dataclasses import dataclass

from forgetless.errors import ConfigError
from forgetless.regularizers import Regularizer, register


@dataclass
class NEFTuneConfig:
    alpha: float = 5.0  # the paper's most used setting


class NEFTune(Regularizer):
    name = "neftune"

    def __init__(self, cfg: NEFTuneConfig) -> None:
        if cfg.alpha <= 0:
            raise ConfigError("regularizers.neftune.alpha: must be > 0")
        self.cfg = cfg

    def setup(self, trainer) -> None:
        trainer.neftune_noise_alpha = self.cfg.alpha  # read by Trainer.train(), which attaches the hook


register("neftune", NEFTuneConfig, NEFTune)

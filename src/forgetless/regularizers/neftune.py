"""NEFTune: uniform noise on the input embeddings while training (Jain et al., "NEFTune: Noisy
Embeddings Improve Instruction Finetuning", ICLR 2024, arXiv 2310.05914).

Not re-implemented: transformers' own NEFTune hook (transformers.integrations.neftune: noise ~ U(-a, a),
a = alpha / sqrt(sequence length * hidden size), training mode only) is attached to the input embeddings
when the run is set up and removed when training ends, as Trainer does with `neftune_noise_alpha`. So
NEFTune is a `regularizers:` entry like every other method and composes with them. No loss term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetless.regularizers.base import Regularizer, RunInfo
from forgetless.registry import Strength, register
from forgetless.schema import out_of_range


@dataclass
class NEFTuneConfig:
    alpha: float = 5.0  # the paper's most used setting

    def problems(self) -> dict[str, str]:  # checked when the config is parsed
        return out_of_range(self, {"alpha": "> 0"})  # the noise's scale; 0 would be no NEFTune at all


class NEFTune(Regularizer):
    name = "neftune"

    def __init__(self, cfg: NEFTuneConfig) -> None:
        self.cfg = cfg

    def setup(self, run: RunInfo) -> None:
        from transformers.integrations.neftune import activate_neftune

        self.model, self.accelerator = run.model, run.accelerator
        self.hook = activate_neftune(run.model, self.cfg.alpha, run.accelerator)

    def finalize(self, model: torch.nn.Module) -> dict[str, float]:
        from transformers.integrations.neftune import deactivate_neftune

        deactivate_neftune(self.model, self.hook, self.accelerator)  # the saved and evaluated model is noise-free
        return {}


# the noise's scale: a knob to tune (the paper's 5, 10, 15 and a weaker 1), not a hold on the initial model
register("neftune", NEFTuneConfig, NEFTune, strength=Strength("alpha", (1.0, 5.0, 15.0), range="> 0", holds=None),
         presets={"neftune": {"regularizers": [{"neftune": {}}]}})

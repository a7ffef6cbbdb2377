"""WiSE-FT: weight-space ensembling of the initial and the fine-tuned model (Wortsman et al., "Robust
fine-tuning of zero-shot models", CVPR 2022, arXiv 2109.01903).

After training, W = W_0 + alpha * (W_ft - W_0): alpha = 1 is the fine-tuned model, 0 the initial one.
Nothing changes during training; the mix is applied once, before the weights are saved.

- LoRA: W_ft - W_0 = scaling * B @ A, so the mix is B <- alpha * B (exact; the saved adapter loads
  as usual, no snapshot needed).
- Full fine-tuning: the initial trainable weights are snapshotted on the CPU before training
  (+1x the trainable weights in CPU memory).

`forgetless train ... budget.knob=wise_ft` searches alpha instead of taking it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetless.errors import ConfigError
from forgetless.model import is_lora, lora_factors, trainable_snapshot
from forgetless.regularizers.base import Regularizer, RunInfo
from forgetless.registry import Strength, register
from forgetless.schema import out_of_range


@dataclass
class WiseFTConfig:
    alpha: float = 0.5  # the paper's default mixing weight

    def problems(self) -> dict[str, str]:  # checked when the config is parsed
        return out_of_range(self, {"alpha": "[0, 1]"})  # 0 = the initial model, 1 = the fine-tuned one


class WeightMixer:
    """Sets `model`'s weights to W_0 + alpha * (W_tuned - W_0) for any alpha, W_tuned being the weights
    it holds when the mixer is made. `initial` (name -> tensor of the trainable weights before
    training) is needed for full fine-tuning only."""

    def __init__(self, model: torch.nn.Module, initial: dict[str, torch.Tensor] | None = None) -> None:
        self.factors = lora_factors(model) if is_lora(model) else []
        if self.factors:
            self.tuned = [b.detach().clone() for _, b, _ in self.factors]
            return
        if initial is None:
            raise ConfigError("WiSE-FT with full fine-tuning needs the initial weights")
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, _ in self.params if n not in initial]
        if missing:
            raise ConfigError(f"WiSE-FT: no initial weight for {missing[0]}")
        self.initial = initial
        self.tuned = [p.detach().to("cpu", copy=True) for _, p in self.params]

    @torch.no_grad()
    def set(self, alpha: float) -> None:
        if self.factors:
            for (_, b, _), b_tuned in zip(self.factors, self.tuned):
                b.copy_(alpha * b_tuned)
            return
        for (name, p), tuned in zip(self.params, self.tuned):
            w0 = self.initial[name].to(torch.float32)
            p.copy_((w0 + alpha * (tuned.to(torch.float32) - w0)).to(p.dtype))


class WiseFT(Regularizer):
    name = "wise_ft"
    reads_weights = True

    def __init__(self, cfg: WiseFTConfig) -> None:
        self.cfg = cfg
        self.initial: dict[str, torch.Tensor] | None = None

    def setup(self, run: RunInfo) -> None:
        model = run.model
        if not is_lora(model):
            self.initial = trainable_snapshot(model, "cpu")

    def finalize(self, model: torch.nn.Module) -> dict[str, float]:
        WeightMixer(model, self.initial).set(self.cfg.alpha)
        return {"wise_ft_alpha": self.cfg.alpha}


# the mixing weight is budget's default knob: one training run, then each alpha is a mix of its weights
register("wise_ft", WiseFTConfig, WiseFT, strength=Strength("alpha", (1.0, 0.75, 0.5, 0.25), range="[0, 1]", retrains=False),
         presets={"wise-ft": {"regularizers": [{"wise_ft": {}}]}})

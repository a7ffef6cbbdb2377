"""L2-SP: an L2 pull towards the initial weights (Li, Grandvalet & Davoine, "Explicit Inductive Bias
for Transfer Learning with Convolutional Networks", ICML 2018, arXiv 1802.01483).

term = coef / 2 * ||W - W_0||^2, summed over the weights fine-tuning moves, once per optimizer step.

- Full fine-tuning: W_0 is a frozen snapshot of the trainable weights taken before the first
  update (+1x the trainable weights in memory).
- LoRA: W - W_0 of each adapted layer is exactly scaling * B @ A, so the penalty is that update's
  squared Frobenius norm, computed as scaling^2 * <B^T B, A A^T> (two r x r matrices; no d x d
  product, no snapshot). A pull of A and B towards their own random init would constrain the
  adapter's parametrisation, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetless.model import is_lora, lora_factors, trainable_snapshot
from forgetless.regularizers.base import Regularizer, RunInfo, StepContext
from forgetless.registry import Strength, register
from forgetless.schema import out_of_range


@dataclass
class L2SPConfig:
    # Calibrated on the embedded default: after its 80 plain-SFT steps ||dW||^2 ~ 57, and at coef 0.1
    # the penalty's gradient is about as large as the SFT loss's (norms 1.08 vs 1.14).
    coef: float = 0.1

    def problems(self) -> dict[str, str]:  # checked when the config is parsed
        return out_of_range(self, {"coef": ">= 0"})


def lora_delta_sq(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """sum over layers of ||scaling * B @ A||_F^2, via trace((B^T B)(A A^T))."""
    total = None
    for a, b, scaling in factors:
        part = scaling ** 2 * ((b.t() @ b) * (a @ a.t())).sum()
        total = part if total is None else total + part
    return total


class L2SP(Regularizer):
    name = "l2sp"
    reads_weights = True

    def __init__(self, cfg: L2SPConfig) -> None:
        self.cfg = cfg

    def setup(self, run: RunInfo) -> None:
        model = run.model
        self.factors = lora_factors(model) if is_lora(model) else []
        self.initial = []
        if not self.factors:
            snapshot = trainable_snapshot(model)
            self.initial = [(p, snapshot[n]) for n, p in model.named_parameters() if n in snapshot]

    def distance_sq(self) -> torch.Tensor:
        if self.factors:
            return lora_delta_sq(self.factors)
        return sum((p - p0).pow(2).sum() for p, p0 in self.initial)

    def loss(self, ctx: StepContext):
        share = ctx.step_share()
        if not share:  # a forward without SFT tokens (replay's own pass): the step's penalty is elsewhere
            return None, {}
        dist = self.distance_sq()
        return 0.5 * self.cfg.coef * dist * share, {"l2sp_dist_sq": dist.item()}


register("l2sp", L2SPConfig, L2SP, strength=Strength("coef", (0.1, 1.0, 10.0)), presets={"l2sp": {"regularizers": [{"l2sp": {}}]}})

"""DFT: Dynamic Fine-Tuning (Wu et al., "On the Generalization of SFT: A Reinforcement Learning
Perspective with Reward Rectification", arXiv 2508.05629), and its anchored form ASFT (Zhu et al.,
"Anchored Supervised Fine-Tuning", arXiv 2509.23753) as a preset.

DFT scales each response token's NLL by the token's own probability under the current model, held
constant (sg = stop-gradient):

    L_DFT = sum_t sg(p_t) * nll_t * s,    p_t = exp(-nll_t),

normalised exactly like the SFT loss (s = token_scale: the sum over the step's response tokens times s
is their mean over the whole optimizer step, across gradient accumulation and processes). Its gradient
is sum_t p_t * grad(nll_t) * s: SFT's gradient with each token weighted by p_t, so tokens the model
finds unlikely pull less.

Here DFT is an additive penalty like every other `regularizers:` entry. The training step already adds
l_sft = sum_t nll_t * s; this entry adds

    term = sum_t (sg(p_t) - 1) * nll_t * s,

so l_sft + term == L_DFT, in value and in gradient. Consequences, all deliberate:
- `l_sft` stays logged as the plain NLL mean, so DFT runs compare with every other run on it; the DFT
  loss itself is logged as `l_dft` (token mean of p_t * nll_t over the micro-batch, like l_sft).
- Only the SFT rows are reweighted: replay rows (forgetless.replay) keep their plain weighted NLL, and
  in replay's own pass (no SFT rows) this entry adds no term.
- Under LfU the perturber's ascent direction is the gradient of the plain NLL l_sft alone (the step
  hands it l_sft's gradient, never a penalty's); the DFT term is one more additive penalty of the
  clean pass, as KL's is.
- One `dft` entry per run (two would count the reweighting twice); refused when the config is parsed.
- Precision: each token's gradient weight is 1 + (p_t - 1), exact but for the rounding of p_t - 1
  (< 1e-7 absolute in fp32: harmless). The total loss Trainer logs, l_sft + term, is two sums that nearly
  cancel when the p_t are small, so it carries l_sft's rounding (~1e-7 * l_sft in fp32); `l_dft` is
  computed directly and is the value to read.

Presets: `dft`, and `asft` = DFT + KL to the initial model on the SFT response tokens. ASFT's KL, as
the authors' released code computes it (train.py / train_v2.py, and the verl trainer in
github.com/zhuchichi56/ASFT), is F.kl_div(log p_theta, p_ref) = KL(p_ref || p_theta), averaged over
the response tokens: forgetless.regularizers.kl's `direction: forward`, `on: sft`. Its coefficient
there defaults to 0.1 (`kl_weight` / `asft_kl_coef`; their README's example uses 0.05), so the
preset's KL has `coef: 0.1`. No strength of its own: DFT has no knob, so `asft`'s knob (frontier,
budget `knob: kl`) is KL's coef.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetless.regularizers.base import Regularizer, StepContext
from forgetless.registry import register
from forgetless.rows import SFT


@dataclass
class DFTConfig:
    """No options: the weight is the token's own probability, the paper's one form."""

    def provides(self) -> set[str]:
        return {"dft"}

    def combination_problems(self, others: set[str]) -> dict[str, str]:
        return {"": "at most one dft entry per run (two would reweight the SFT tokens twice)"} if "dft" in others else {}


class DFT(Regularizer):
    name = "dft"

    def __init__(self, cfg: DFTConfig) -> None:
        self.cfg = cfg

    def loss(self, ctx: StepContext):
        rows = ctx.rows.get(SFT)
        if rows is None or rows.nll is None:  # replay's own pass: no SFT rows, no term
            return None, {}
        nll = rows.nll
        p = torch.exp(-nll.detach())
        term = ((p - 1.0) * nll).sum() * rows.scale
        metrics = {"l_dft": (p * nll.detach()).mean().item()} if nll.numel() else {}
        return term, metrics


register("dft", DFTConfig, DFT, presets={
    "dft": {"regularizers": [{"dft": {}}]},
    # anchored SFT (arXiv 2509.23753): DFT + KL(p_init || p_theta) on the SFT tokens, coef as in the authors' code
    "asft": {"regularizers": [{"dft": {}}, {"kl": {"coef": 0.1, "direction": "forward", "on": "sft"}}]},
})

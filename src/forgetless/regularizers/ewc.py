"""EWC: elastic weight consolidation with a diagonal Fisher (Kirkpatrick et al., "Overcoming
catastrophic forgetting in neural networks", PNAS 2017, arXiv 1612.00796).

term = coef / 2 * sum_i F_i (theta_i - theta_0,i)^2 over the trainable weights, once per optimizer step.

F is the diagonal empirical Fisher of the *initial* model on a small general-text sample (what we
want to keep), i.e. the mean over `samples` text blocks of the squared gradient of the block's
mean next-token NLL, then divided by its mean over all weights: with mean(F) = 1, `coef` means
what L2-SP's coef means, and EWC only redistributes the pull towards the weights general text
depends on. The Fisher is computed once in eval mode (no dropout), stored with the run
(CHECKPOINTS/ewc_fisher.safetensors, atomically) and reused on resume.

With LoRA the trainable weights are the adapters' A and B. B starts at 0, so the Fisher of A is 0
and EWC pulls B (hence the update scaling * B @ A) towards 0, weighted by how much general text
cares about each direction. Full fine-tuning keeps F and a snapshot theta_0 on the device: +2x
the trainable weights in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from forgetless.data import load_texts, pack_blocks
from forgetless.cache import build_once
from forgetless.errors import ConfigError
from forgetless.model import trainable_snapshot
from forgetless.regularizers.base import Regularizer, RunInfo, StepContext
from forgetless.registry import Strength, register
from forgetless.sections import DEFAULT_CORPUS
from forgetless.schema import out_of_range


FISHER_FILE = "ewc_fisher.safetensors"


@dataclass
class EWCConfig:
    coef: float = 0.1  # with mean(F) = 1, on L2-SP's scale (see l2sp.L2SPConfig)
    data: str = DEFAULT_CORPUS  # the general-text sample the Fisher is estimated on
    samples: int = 32  # text blocks
    max_length: int = 128  # tokens per block
    text_field: str = "text"

    def problems(self) -> dict[str, str]:  # checked when the config is parsed
        return out_of_range(self, {"coef": ">= 0", "samples": ">= 1", "max_length": ">= 2"})

    def data_sources(self) -> list[str]:
        return [self.data]  # the Fisher's text: part of the run's identity (forgetless.identity)


def empirical_fisher(model, params: list[tuple[str, torch.Tensor]], blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean over blocks of (d mean-NLL(block) / d theta)^2, normalised to mean 1 over all weights."""
    was_training = model.training
    model.eval()
    device = params[0][1].device
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params}
    try:
        for block in tqdm(blocks, desc="EWC Fisher", leave=False):
            ids = block[None].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            grads = torch.autograd.grad(nll, [p for _, p in params], allow_unused=True)
            for (name, _), g in zip(params, grads):
                if g is not None:
                    fisher[name] += g.float().pow(2)
    finally:
        model.train(was_training)
    total = sum(f.sum() for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = float(total) / count
    if not mean > 0 or not torch.isfinite(torch.tensor(mean)):
        raise ConfigError("regularizers.ewc: the Fisher estimate is zero or not finite on this text sample")
    return {name: f / mean for name, f in fisher.items()}


class EWC(Regularizer):
    name = "ewc"
    reads_weights = True

    def __init__(self, cfg: EWCConfig) -> None:
        self.cfg = cfg

    def setup(self, run: RunInfo) -> None:
        model = run.model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        snapshot = trainable_snapshot(model)
        self.initial = [snapshot[n] for n, _ in self.params]
        fisher = self._load_or_build(run)
        self.fisher = [fisher[n].to(p.device) for n, p in self.params]

    def _meta(self) -> dict[str, str]:
        c = self.cfg
        return {"data": c.data, "samples": str(c.samples), "max_length": str(c.max_length),
                "weights": str(len(self.params))}

    def _load_or_build(self, run: RunInfo) -> dict[str, torch.Tensor]:
        def estimate() -> dict[str, torch.Tensor]:
            blocks = pack_blocks(load_texts(self.cfg.data, self.cfg.text_field), run.tokenizer,
                                 self.cfg.max_length)
            # a fixed, seed-independent sample spread over the corpus
            pick = torch.linspace(0, len(blocks) - 1, min(self.cfg.samples, len(blocks))).round().long()
            return empirical_fisher(run.model, self.params, blocks[pick])

        names = {n for n, _ in self.params}
        meta = {**self._meta(), "inputs": run.inputs_key}
        return build_once(run.output_dir / FISHER_FILE, meta, estimate, run.accelerator,
                          "EWC Fisher", fits=lambda fisher: set(fisher) == names)

    def penalty(self) -> torch.Tensor:
        return sum((f * (p - p0).pow(2)).sum() for (_, p), p0, f in zip(self.params, self.initial, self.fisher))

    def loss(self, ctx: StepContext):
        share = ctx.step_share()
        if not share:  # a forward without SFT tokens (replay's own pass): the step's penalty is elsewhere
            return None, {}
        value = self.penalty()
        return 0.5 * self.cfg.coef * value * share, {"ewc_penalty": value.item()}


register("ewc", EWCConfig, EWC, strength=Strength("coef", (0.1, 1.0, 10.0)), presets={"ewc": {"regularizers": [{"ewc": {}}]}})

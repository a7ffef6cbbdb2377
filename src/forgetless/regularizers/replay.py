"""Approximate replay (arXiv 2512.22337), as specified in docs/methods/replay.md.

The original pre-training data is unavailable, so a similar open corpus stands in: its text is
packed into fixed-length token blocks, and micro-batch u of the run (u = step * grad_accum + its
index in the step) brings floor(r * (u + 1)) - floor(r * u) replay blocks, r = ratio * batch_size:
ratio blocks per SFT example of a full micro-batch, exactly over a run, and a function of the
step alone, so a resumed run draws what an uninterrupted one does (no count of examples seen to
guess). Block j of the run (j-th draw, across processes) is position j mod N of a permutation
reshuffled every cycle through the corpus, seeded by the run's seed. An epoch's last, shorter
step brings the blocks of the micro-batches it has, and its replay NLL is their mean.

Where the blocks run (`forward`): by default they join the SFT rows in the clean forward (padded to
one length, masked padding), which costs only the replay tokens' own compute but holds both kinds of
rows' activations at once; `forward: own` gives them their own forward + backward before the SFT
forward instead, so the two never coexist (peak memory is the larger pass, not their sum) at the
price of a second, smaller pass (1.39x instead of 1.26x a plain-SFT step at ratio 0.25 in bench/).
`auto` joins unless padding to one length would add more than 10% tokens, or an LfU regularizer
runs (its hooks capture the SFT rows of the clean forward). Either way the blocks add
`weight * mean next-token NLL over all replay tokens of the optimizer step`, normalised like l_sft
under gradient accumulation and across processes; the KL regularizer with `on: replay|both` adds
its term on the same forward (`loss_on_replay`). Replay never changes the number of optimizer
steps or the LR schedule: each step simply carries ratio x more examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate.utils import DistributedType

from forgetless.data import load_texts, pack_blocks
from forgetless.errors import ConfigError
from forgetless.regularizers import Regularizer, ReplayBlocks, RunInfo, StepContext, register
from forgetless.losses import forward_rows, next_token_targets, token_nll

DEFAULT_CORPUS = "builtin:replay/kjv.txt.gz"


SELF = "self"


@dataclass
class ReplayConfig:
    # .txt/.txt.gz, or .jsonl/.json/.csv/.parquet/datasets folder with `text_field`; or "self": text the
    # initial model writes before training (forgetless.self_replay)
    data: str = DEFAULT_CORPUS
    ratio: float = 0.25  # replay blocks per SFT example
    max_length: int = 128  # tokens per replay block
    weight: float = 1.0  # weight of the replay NLL term
    text_field: str = "text"
    # auto | with_sft (join the SFT forward: fastest) | own (own forward + backward: lowest peak memory)
    forward: Literal["auto", "with_sft", "own"] = "auto"
    # data: self only: how many blocks the initial model writes, how it samples, from what prompts
    self_blocks: int = 128
    self_temperature: float = 1.0
    self_top_p: float = 0.95
    self_prompts: str | None = None  # a text file, one prompt per line (default: from the BOS token)

    def provides(self) -> set[str]:
        return {"replay"}  # blocks other regularizers may add terms on (KL's `on: replay`)

    def combination_problems(self, others: set[str]) -> dict[str, str]:
        if self.forward == "with_sft" and "perturbs" in others:
            return {"forward": "with_sft cannot be combined with lfu (its hooks capture the SFT rows of the clean "
                               "forward); use auto or own"}
        return {}


class Replay(Regularizer):
    name = "replay"

    def __init__(self, cfg: ReplayConfig) -> None:
        if cfg.ratio < 0 or cfg.weight < 0:
            raise ConfigError("regularizers.replay: ratio and weight must be >= 0")
        if cfg.max_length < 2:
            raise ConfigError("regularizers.replay.max_length: must be >= 2")
        if cfg.self_blocks < 1 or not cfg.self_temperature > 0 or not 0 < cfg.self_top_p <= 1:
            raise ConfigError("regularizers.replay: self_blocks must be >= 1, self_temperature > 0, self_top_p in (0, 1]")
        self.cfg = cfg
        self.blocks: torch.Tensor | None = None
        self._step, self._micro = -1, 0  # the optimizer step being drawn for, and micro-batches drawn in it
        self._perm_cycle = -1
        self._perm: torch.Tensor | None = None
        self._joined: ReplayBlocks | None = None  # this micro-batch's blocks, riding in the SFT forward
        self._own: ReplayBlocks | None = None  # ... or waiting for their own pass
        self._fraction = 0.0

    def setup(self, run: RunInfo) -> None:
        # DeepSpeed's engine steps at the last micro-batch's first backward: the blocks must join the SFT one
        self.deepspeed = run.accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.cfg.forward == "own" and self.deepspeed:
            raise ConfigError("regularizers.replay.forward: own is not possible under DeepSpeed (its engine takes "
                              "one backward per micro-batch, and steps at it); use auto or with_sft")
        tokenizer = run.tokenizer
        self.generation_seconds = None
        if self.cfg.ratio > 0 and self.cfg.data == SELF:
            from forgetless.self_replay import load_or_generate  # generation is only needed here

            c = self.cfg
            settings = {"blocks": c.self_blocks, "length": c.max_length, "temperature": c.self_temperature,
                        "top_p": c.self_top_p, "prompts": c.self_prompts, "seed": run.seed}
            # before the first update the model is the initial one (on resume the cache already exists)
            self.blocks, self.generation_seconds = load_or_generate(run.model, tokenizer, run.output_dir, settings,
                                                                    run.accelerator)
        elif self.cfg.ratio > 0:
            self.blocks = pack_blocks(load_texts(self.cfg.data, self.cfg.text_field), tokenizer, self.cfg.max_length)
        self.seed = run.seed
        self.world = run.accelerator.num_processes
        self.rank = run.accelerator.process_index
        self.accum = run.grad_accum
        self.batch_size = run.batch_size
        self.perturbing = run.perturbing

    def finalize(self, model: torch.nn.Module) -> dict[str, float]:
        if self.generation_seconds is None:
            return {}
        return {"self_replay_generation_seconds": round(self.generation_seconds, 2),
                "self_replay_blocks": int(self.blocks.shape[0])}

    def block_indices(self, first: int, count: int) -> list[int]:
        """Corpus blocks for this process's draws first..first+count-1 (disjoint across processes)."""
        n = self.blocks.shape[0]
        out = []
        for j in range(first, first + count):
            slot = j * self.world + self.rank
            cycle, pos = divmod(slot, n)
            if cycle != self._perm_cycle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
                self._perm, self._perm_cycle = torch.randperm(n, generator=g), cycle
            out.append(int(self._perm[pos]))
        return out

    def _draw(self, ctx: StepContext) -> ReplayBlocks | None:
        """This micro-batch's blocks and their loss scale: a function of (optimizer step, micro-batch index)
        alone, so a resumed run draws exactly what an uninterrupted one does, whatever the epoch length."""
        step = ctx.global_step
        if step != self._step:  # the first micro-batch of an optimizer step
            self._step, self._micro = step, 0
        micro = step * self.accum + self._micro  # nominal micro-batch index of the run
        self._micro += 1
        per_micro = self.cfg.ratio * self.batch_size  # replay blocks per nominal micro-batch (fractional)
        first = math.floor(per_micro * micro)
        count = math.floor(per_micro * (micro + 1)) - first
        self._fraction = count / (count + ctx.batch["input_ids"].shape[0])
        if count == 0 or self.blocks is None:
            return None
        ids = self.blocks[self.block_indices(first, count)].to(ctx.batch["input_ids"].device)
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[:, -1] = False  # every token but the first is a target
        # the blocks of this whole optimizer step (fewer micro-batches in an epoch's last step), on every
        # process alike: the replay NLL is their mean, as l_sft is the mean over the step's response tokens
        start = step * self.accum
        in_step = ctx.micro_batches_in_step
        step_blocks = math.floor(per_micro * (start + in_step)) - math.floor(per_micro * start)
        return ReplayBlocks(ids, keep, None, 1.0 / (max(step_blocks, count) * (self.cfg.max_length - 1)))

    def _joins_sft(self, ctx: StepContext, blocks: ReplayBlocks) -> bool:
        if self.cfg.forward != "auto":
            return self.cfg.forward == "with_sft"
        if self.deepspeed:
            return True
        if self.perturbing:
            return False
        (b, t), (r, length) = ctx.batch["input_ids"].shape, blocks.input_ids.shape
        return (b + r) * max(t, length) <= 1.1 * (b * t + r * length)

    def extra_rows(self, ctx: StepContext) -> ReplayBlocks | None:
        self._joined = self._own = None
        blocks = self._draw(ctx)
        if blocks is not None and self._joins_sft(ctx, blocks):
            self._joined = blocks
        else:
            self._own = blocks
        return self._joined

    def separate_pass(self, ctx: StepContext):
        blocks, self._own = self._own, None
        if blocks is None:
            return None, ({} if self._joined is not None else {"replay_fraction": 0.0})
        ids = blocks.input_ids
        _, blocks.logits = forward_rows(ctx.model, ids, torch.ones_like(ids), blocks.keep)
        term, metrics = self._term(ctx, blocks)
        if not torch.isfinite(term.detach()):
            # skipped like a non-finite SFT loss (no backward); the SFT pass still runs
            return None, {**metrics, "replay_nonfinite_skipped": 1.0}
        ctx.backward(term)
        return term.detach(), metrics

    def loss(self, ctx: StepContext):
        blocks, self._joined = self._joined, None
        if blocks is None:
            return None, {}
        return self._term(ctx, blocks)

    def _term(self, ctx: StepContext, blocks: ReplayBlocks) -> tuple[torch.Tensor, dict[str, float]]:
        """weight * replay NLL (normalised over the step's replay tokens) + other regularizers' terms on the blocks."""
        nll = blocks.nll if blocks.nll is not None else token_nll(blocks.logits,
                                                                  next_token_targets(blocks.input_ids, blocks.keep))
        term = self.cfg.weight * nll.sum() * blocks.scale
        metrics = {"l_replay": nll.detach().mean().item(), "replay_fraction": self._fraction}
        for reg in ctx.regularizers:
            extra, extra_metrics = reg.loss_on_replay(ctx, blocks)
            if extra is not None:
                term = term + extra
            metrics.update(extra_metrics)
        return term, metrics


register("replay", ReplayConfig, Replay)

"""The regularizer interface (Regularizer, RunInfo, StepContext). A leaf of the package: the method
modules import it, it imports none of them (they register in forgetless.registry). Regularizer's
docstring lists the hooks of a penalty and of the perturbing regularizer; forgetless.regularizers tells
how the training step calls them."""


from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from forgetless.rows import Rows


def zero_stage(accelerator) -> int | None:
    """The run's DeepSpeed ZeRO stage, or None when DeepSpeed does not run it."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


@dataclass
class RunInfo:
    """What a regularizer is told of its run when it is set up (instead of the whole Trainer)."""
    model: torch.nn.Module  # as the trainer holds it (possibly wrapped by accelerate)
    accelerator: Any  # processes (num_processes, process_index, is_main_process), device, distributed_type
    tokenizer: Any
    train_dataset: Any  # the SFT rows (a datasets.Dataset with `example_id` when forgetless built it)
    output_dir: Path  # the run's checkpoint folder: what a regularizer computes once is kept there
    seed: int
    grad_accum: int  # micro-batches per optimizer step
    batch_size: int  # SFT rows per micro-batch, per process
    eval_batch_size: int
    show_progress: bool
    # a hash of what the run is computed from (forgetless.identity.run_inputs): what a regularizer keeps
    # in output_dir is reused only under the same key
    inputs_key: str = ""

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class StepContext:
    """What a regularizer sees of one forward of the training step: a penalty's `loss(ctx)`, a perturbing
    regularizer's `perturbed_backward(ctx)`. In replay's own pass only `rows["replay"]` is there: `batch`,
    `sft_loss`, `keep` and `logits` are None, `token_scale` is 0."""
    model: torch.nn.Module  # as the trainer calls it (possibly wrapped by accelerate)
    rows: dict[str, Rows]  # this forward's rows by source (forgetless.rows.SFT / REPLAY), with their logits
    batch: dict[str, torch.Tensor] | None  # the SFT rows: input_ids, attention_mask, labels (-100 = not trained on)
    outputs: Any  # the forward's CausalLMOutput (its rows may include joined replay rows)
    sft_loss: torch.Tensor | None  # the normalised SFT term of this micro-batch (None in a replay-only pass)
    token_scale: float  # sum over this micro-batch's response tokens * token_scale == mean over the step's
    global_step: int  # optimizer steps done before this one
    micro_batches_in_step: int  # micro-batches in this optimizer step (the last step of an epoch may have fewer)
    # this micro-batch's index in the run (step * grad_accum + its place in the step: a resumed run numbers
    # its micro-batches as an uninterrupted one does); the number clean_forward was given
    micro_step: int
    # a backward of a regularizer's own term (scaled for the engine: DeepSpeed must not divide it again)
    backward: Callable[..., None]
    # whether a tensor is finite on every process (a syncing backward is skipped by all or by none)
    all_finite: Callable[[torch.Tensor], bool]
    keep: torch.Tensor | None = None  # [B, T] bool: positions whose next token is trained (losses.prediction_mask)
    logits: torch.Tensor | None = None  # [N, V] logits at the `keep` positions only, row-major
    # Set for the perturbing regularizer only: d(l_sft of this micro-batch)/d(ascent_tensors()), in order.
    # Read them before running any backward of your own (autograd may accumulate into them in place).
    sft_grads: list[torch.Tensor] | None = None

    def step_share(self) -> float:
        """This micro-batch's share of its optimizer step (its response tokens * token_scale): a
        per-step penalty weighted by it is counted exactly once per step, under gradient
        accumulation and across processes (where DDP averages)."""
        if self.batch is None:
            return 0.0
        n = int(self.keep.sum()) if self.keep is not None else int((self.batch["labels"][:, 1:] != -100).sum())
        return n * self.token_scale


class Regularizer:
    """A `regularizers:` entry at training time (built from its options by its registered factory).

    A penalty (`perturbs = False`) adds a term to the clean loss; the step runs one backward of the sum
    (forgetless.trainer, the additive step). Its whole interface, every hook optional:
      setup(run)                         once before training: snapshots, caches (RunInfo, never the Trainer)
      clean_forward(model, batch, micro_step)  context manager around the clean forward of the SFT rows
      loss(ctx) -> (term | None, metrics)      its weighted term on ctx's rows (every forward, replay's own too)
      finalize(model) -> metrics         after the last step, before the weights are saved; may change them
    and three class flags: `name`, `reads_weights`, `reads_logits`.

    A perturbing regularizer (`perturbs = True`: LfU; one per run, checked when the config is parsed)
    makes the run's step the perturbing one, and has a contract of its own instead of `loss` (never
    called on it):
      perturbs_at(micro_step) -> bool    pure: whether that micro-batch gets the perturbed pass; the
                                         others take the additive step, without this regularizer at all
      clean_forward(model, batch, micro_step)  entered around the clean forward of a perturbed micro-batch
      ascent_tensors() -> [tensor]       whose gradient of this micro-batch's l_sft alone it needs; the step
                                         hands it over as ctx.sft_grads
      perturbed_backward(ctx) -> (term, metrics)  its own forward + backward, after the clean graph is freed
    besides setup and finalize.
    """

    name: str = "regularizer"
    perturbs: bool = False
    # reads or writes the trainable weights' values (a penalty on them, a mix): impossible where an engine
    # keeps only a shard of each weight on every process (DeepSpeed ZeRO-3)
    reads_weights: bool = False
    # its term reads the current model's logits (ctx.logits / rows.logits): a run with it keeps the plain LM
    # head + cross-entropy (train.loss_chunk, which never makes the whole logits, is refused beside it)
    reads_logits: bool = False

    def setup(self, run: RunInfo) -> None:
        """Called once before training (e.g. to snapshot initial weights)."""

    def clean_forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], micro_step: int) -> ContextManager:
        """Context around the clean forward of the SFT rows `batch` (install hooks); `micro_step` is this
        micro-batch's index in the run (StepContext.micro_step). Not entered in replay's own pass."""
        return contextlib.nullcontext()

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        """A penalty's term added to the clean loss (already weighted), and metrics. Default: no term."""
        return None, {}

    def finalize(self, model: torch.nn.Module) -> dict[str, float]:
        """After the last step, before the weights are saved; may change them (WiSE-FT)."""
        return {}

    # --- the perturbing regularizer's contract (perturbs = True)
    def perturbs_at(self, micro_step: int) -> bool:
        """Whether micro-batch `micro_step` of the run gets the perturbed pass. Pure (no side effect): a
        micro-batch it does not perturb takes the additive step, where this regularizer takes no part."""
        return True

    def ascent_tensors(self) -> list[torch.Tensor]:
        """The tensors whose gradient of this micro-batch's l_sft alone the step hands over as ctx.sft_grads."""
        raise NotImplementedError

    def perturbed_backward(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Run the extra forward + backward (`ctx.backward`; skip a term not finite on every process,
        `ctx.all_finite`); return the (detached) weighted term and metrics."""
        raise NotImplementedError

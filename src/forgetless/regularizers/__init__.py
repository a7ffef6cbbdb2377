"""Regularizers: the small interface every anti-forgetting term implements, and their registry.

The training step (forgetless.trainer.ForgetlessTrainer.training_step) runs the clean forward,
computes the SFT loss, then asks each regularizer for a term to add:

    total = l_sft + sum(reg.loss(ctx)[0] for reg in regularizers)

A regularizer is set up once with a `RunInfo` (model, accelerator, tokenizer, data, output folder,
seed, batch and accumulation sizes), never the Trainer. At each micro-batch it sees a `StepContext`:
the model, the batch, the clean forward's outputs, and the factor that normalises a *sum over
response tokens* exactly like the SFT loss (correct under gradient accumulation and across
processes). It returns a scalar tensor (already weighted by its coefficient) and a dict of floats to
log. One module per regularizer; register it in REGISTRY.

The rows of a micro-batch come from data sources (forgetless.rows): the SFT mixture and, with
replay, the replay source (forgetless.replay: data, not a regularizer). A term that covers rows reads
`ctx.rows[source]` (their batch, logits at the trained positions and normalising scale); the SFT rows
are also `ctx.batch / ctx.keep / ctx.logits`. When the training step gives replay rows a forward of
their own, `loss` is called once for that pass too, with only `ctx.rows["replay"]` (and `ctx.batch`
None): a term on the SFT rows, or a per-step penalty weighted by `ctx.step_share()` (0 there), adds
nothing in it.

A regularizer that simulates an update (LfU) sets `perturbs = True` and implements two more hooks:
`ascent_tensors()` (whose gradient of l_sft *alone, for this micro-batch* it needs; the step
isolates it from the accumulated .grad and hands it over as `ctx.sft_grads`) and
`perturbed_backward(ctx)` (its own forward + backward after the clean one, whose graph is freed
by then), and may skip micro-batches through `perturbs_at(micro_step)`. `clean_forward(model, batch)` is
a context manager around the clean forward, for regularizers that hook into it (capture hidden states,
add steering vectors).

Rules between the regularizers of one run are checked when the config is parsed, never at run time by
name: a config dataclass may say what it brings to the run (`provides() -> set[str]`, e.g. "replay",
"perturbs") and what it cannot do beside the others (`combination_problems(others: set[str]) ->
{option: problem}`, `others` being what the run's other entries provide); its single-entry checks go
in `problems() -> {option: problem}` (forgetless.schema).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from forgetless.errors import ConfigError
from forgetless.replay import ReplayConfig
from forgetless.rows import Rows
from forgetless.schema import from_dict


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
    perturbing: bool  # a perturbing regularizer (LfU) runs its own forward + backward after the clean one

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class StepContext:
    model: torch.nn.Module  # as the trainer calls it (possibly wrapped by accelerate)
    rows: dict[str, Rows]  # this forward's rows by source (forgetless.rows.SFT / REPLAY), with their logits
    batch: dict[str, torch.Tensor] | None  # the SFT rows: input_ids, attention_mask, labels (-100 = not trained on)
    outputs: Any  # the forward's CausalLMOutput (its rows may include joined replay rows)
    sft_loss: torch.Tensor | None  # the normalised SFT term of this micro-batch (None in a replay-only pass)
    token_scale: float  # sum over this micro-batch's response tokens * token_scale == mean over the step's
    global_step: int  # optimizer steps done before this one
    micro_batches_in_step: int  # micro-batches in this optimizer step (the last step of an epoch may have fewer)
    # a backward of a regularizer's own term (scaled for the engine: DeepSpeed must not divide it again)
    backward: Callable[..., None]
    # whether a tensor is finite on every process (a syncing backward is skipped by all or by none)
    all_finite: Callable[[torch.Tensor], bool]
    keep: torch.Tensor | None = None  # [B, T] bool: positions whose next token is trained (losses.prediction_mask)
    logits: torch.Tensor | None = None  # [N, V] logits at the `keep` positions only, row-major
    # Set for perturbing regularizers only: d(l_sft of this micro-batch)/d(ascent_tensors()), in order.
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
    """Base class. Subclasses set `name` and implement `loss` (and the optional hooks below)."""

    name: str = "regularizer"
    perturbs: bool = False
    # reads or writes the trainable weights' values (a penalty on them, a mix): impossible where an engine
    # keeps only a shard of each weight on every process (DeepSpeed ZeRO-3)
    reads_weights: bool = False

    def setup(self, run: RunInfo) -> None:
        """Called once before training (e.g. to snapshot initial weights). Optional."""

    def clean_forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ContextManager:
        """Context around the clean forward (install hooks). Optional."""
        return contextlib.nullcontext()

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        """A term added to the clean loss, and metrics. Default: no term."""
        return None, {}

    def finalize(self, model: torch.nn.Module) -> dict[str, float]:
        """After the last step, before the weights are saved; may change them (WiSE-FT). Optional."""
        return {}

    # --- perturbing regularizers only (perturbs = True)
    def perturbs_at(self, micro_step: int) -> bool:
        """Whether micro-batch `micro_step` of the run gets the perturbed pass; when it does not, the step
        is plain SFT for this regularizer (its clean_forward is not entered either)."""
        return True

    def ascent_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def perturbed_backward(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Run the extra forward + backward; return the (detached) weighted term and metrics."""
        raise NotImplementedError


# name -> (config dataclass, factory(config) -> Regularizer). Filled by the regularizer modules; a data
# source written among them (replay) has no factory: forgetless.replay.build_replay builds it.
REGISTRY: dict[str, tuple[type, Callable[[Any], Regularizer] | None]] = {"replay": (ReplayConfig, None)}


def register(name: str, config_cls: type, factory: Callable[[Any], Regularizer]) -> None:
    REGISTRY[name] = (config_cls, factory)


def parse_regularizers(entries: list[dict[str, Any]], where: str = "") -> list[tuple[str, Any]]:
    """Validate `regularizers:` entries ({name: {options}}) into (name, config) pairs."""
    parsed = []
    for i, entry in enumerate(entries):
        key = f"regularizers[{i}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{where}{key}: expected a single-key mapping like {{name: {{options}}}}, got {entry!r}")
        (name, options), = entry.items()
        if name not in REGISTRY:
            known = ", ".join(sorted(REGISTRY)) or "none yet"
            raise ConfigError(f"{where}{key}: unknown regularizer '{name}' (known: {known})")
        config_cls, _ = REGISTRY[name]
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{where}{key}.{name}: expected a mapping of options, got {options!r}")
        parsed.append((name, from_dict(config_cls, options or {}, where=where, prefix=f"{key}.{name}.")))
    check_combination(parsed, where)
    return parsed


def check_combination(parsed: list[tuple[str, Any]], where: str = "") -> None:
    """The rules between one run's regularizers, from what each entry's config provides and refuses."""
    provided = [set(getattr(cfg, "provides", lambda: set())()) for _, cfg in parsed]
    for i, (name, cfg) in enumerate(parsed):
        others = set().union(*(p for j, p in enumerate(provided) if j != i))
        for option, problem in getattr(cfg, "combination_problems", lambda _: {})(others).items():
            at = f"regularizers[{i}].{name}" + (f".{option}" if option else "")
            raise ConfigError(f"{where}{at}: {problem}")


def build_regularizers(entries: list[dict[str, Any]]) -> list[Regularizer]:
    """The loss terms of `regularizers:` entries (a replay entry is a data source: build_replay)."""
    return [REGISTRY[name][1](cfg) for name, cfg in parse_regularizers(entries) if REGISTRY[name][1] is not None]


# Each regularizer module registers itself on import.
from forgetless.regularizers import ewc, kl, l2sp, lfu, neftune, wise_ft  # noqa: E402,F401

"""The regularizer interface (Regularizer, RunInfo, StepContext) and the registry of `regularizers:`
entries. A leaf of the package: the method modules import it, it imports none of them (the package's
__init__ imports them all, so that each registers itself). See forgetless.regularizers for the contract."""


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
    # a hash of what the run is computed from (forgetless.identity.run_inputs): what a regularizer keeps
    # in output_dir is reused only under the same key
    inputs_key: str = ""

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

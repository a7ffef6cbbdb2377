"""ForgetlessTrainer: transformers.Trainer whose training step composes SFT + regularizers.

A run's step is one of two plain paths, chosen once when the trainer is built:

`_additive_step` (a run without a perturbing regularizer):
  1. the micro-batch's rows: the SFT rows, plus replay rows when the run has a replay source
     (forgetless.replay; a function of the step count). They join the SFT rows' forward, or get one
     of their own (`forward: own`, or `auto` when joining would pad a lot; `_replay_forward`):
     forward + loss + backward on the replay rows first, without gradient sync, so their
     activations are freed before the SFT forward allocates its own;
  2. clean forward on the (remaining) rows, all sources in one; each source gets its rows' logits;
  3. l_sft = sum of response-token NLL * token_scale, where token_scale = world_size / (response
     tokens in the whole optimizer step, across accumulation and processes): the mean over the
     step's tokens, exactly as transformers normalises with `num_items_in_batch`; replay rows (joined
     or in their own pass) add weight * their NLL sum * the same token_scale: they weigh as if mixed
     into the batch, by their share of the step's tokens (forgetless.replay);
  4. + each penalty's term;  5. one backward.

`_perturbing_step` (a run with a perturbing regularizer, LfU; the config allows one). A micro-batch it
does not perturb (`perturbs_at`: LfU's `every`) takes the additive step; the others:
  1. replay rows, if any, in their own pass first (the perturber reads the SFT rows of the clean forward);
  2. clean forward on the SFT rows inside every regularizer's clean_forward; l_sft + each penalty's term;
  3. backward without gradient sync: the penalties' terms, then l_sft alone, whose gradient w.r.t. the
     perturber's ascent_tensors() is handed to it (ctx.sft_grads); the clean graph is freed;
  4. the perturber's own forward + backward (the micro-batch's last backward, so the one that syncs).

A micro-batch whose loss is NaN/inf on any process is skipped (no backward) by every process. When it
is the step's last (syncing) micro-batch, the step's accumulated gradient is discarded on every process
(never all-reduced, it differs per process): the optimizer steps with a zero gradient.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import DistributedType

from forgetless.environment import environment_kept
from forgetless.errors import ConfigError, TrainingError
from forgetless.losses import (IGNORE_INDEX, chunked_head_nll, forward_rows, next_token_targets, prediction_mask,
                               token_nll)
from forgetless.regularizers import Regularizer, RunInfo, StepContext
from forgetless.regularizers.base import zero_stage
from forgetless.replay import ReplaySource
from forgetless.rows import SFT, Rows, joined_inputs, split_outputs

with environment_kept():  # forgetless.environment: importing transformers writes TORCHINDUCTOR_CACHE_DIR
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState


logger = logging.getLogger(__name__)


def chunked_head_problem(model) -> str | None:
    """Why the chunked loss (losses.chunked_head_nll) cannot stand for this model's LM head, or None: it needs
    the logits to be exactly hidden @ W^T."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain linear layer (an adapter on the head?)"
    if head.bias is not None:
        return "the LM head has a bias"
    config = getattr(model, "config", None)
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    scaled = sorted({key for c in configs for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")
                     if getattr(c, key, None) not in (None, 1, 1.0)})
    if scaled:
        return f"the model transforms its logits ({', '.join(scaled)}), which the chunked loss does not"
    return None


@contextlib.contextmanager
def head_skipped(model):
    """Within: the LM head returns its input, so the model's `logits` are the head's input (the final hidden
    states at the kept positions). Yields the head (its weight is the chunked loss's)."""
    head = model.get_output_embeddings()
    own = head.__dict__.get("forward")
    head.forward = _identity
    try:
        yield head
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def unsaved_model_problem(state, lora: bool) -> str | None:
    """Why the end of this run would save no model `forgetless eval` can load (None: it will save one).
    Sharded engines keep only their own partitioned checkpoint unless told to gather the weights (ZeRO-3
    gathers LoRA adapters either way; FSDP saves nothing at all from a sharded state dict)."""
    deepspeed = getattr(state, "deepspeed_plugin", None)
    if deepspeed is not None and deepspeed.zero_stage == 3 and not lora:  # (PEFT adapters are gathered anyway)
        zero = deepspeed.deepspeed_config.get("zero_optimization") or {}
        if True not in (zero.get("stage3_gather_16bit_weights_on_model_save"),
                        zero.get("stage3_gather_fp16_weights_on_model_save")):  # (the older name)
            return ("full fine-tuning under DeepSpeed ZeRO-3 saves no loadable model unless the weights are gathered "
                    "at the end: set `zero3_save_16bit_model: true` under deepspeed_config in the accelerate config "
                    "(stage3_gather_16bit_weights_on_model_save in a DeepSpeed JSON)")
    fsdp = getattr(state, "fsdp_plugin", None)
    if fsdp is not None and "FULL_STATE_DICT" not in str(fsdp.state_dict_type):  # LoRA adapters too
        return (f"training under FSDP with state dict type {fsdp.state_dict_type} saves no loadable model: "
                "set `fsdp_state_dict_type: FULL_STATE_DICT` under fsdp_config in the accelerate config")
    return None


class ForgetlessTrainer(Trainer):
    # training_step normalises by the step's token count itself; Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, regularizers: list[Regularizer] | None = None, replay: ReplaySource | None = None,
                 max_nonfinite_steps: int = 5, inputs_key: str = "", loss_chunk: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A micro-batch whose loss is NaN/inf is skipped (no backward); this many in a row abort the run.
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_in_a_row = 0
        self.regularizers = list(regularizers or [])
        # penalties add a term to the clean loss; a perturbing regularizer (LfU: one at most, checked when the
        # config is parsed) runs a pass of its own after the clean one, and makes the run's step the perturbing one
        self.penalties = [reg for reg in self.regularizers if not reg.perturbs]
        perturbers = [reg for reg in self.regularizers if reg.perturbs]
        if len(perturbers) > 1:  # a config never builds two; a trainer assembled in code (bench, tests) might
            raise ValueError("ForgetlessTrainer: at most one perturbing regularizer (lfu) per run")
        self.perturber = perturbers[0] if perturbers else None
        self.loss_chunk = loss_chunk
        if loss_chunk:
            readers = [reg.name for reg in self.regularizers if reg.reads_logits]
            problem = (f"{', '.join(readers)} reads the model's logits, which the chunked loss never makes whole; "
                       "set train.loss_chunk: 0 with it") if readers else chunked_head_problem(self.model)
            if not problem and (zero_stage(self.accelerator) == 3
                                or self.accelerator.distributed_type == DistributedType.FSDP):
                problem = "the LM head's weight is sharded under ZeRO-3 / FSDP; use it with DDP or one process"
            if not problem and self._head_marked_unused():
                problem = ("with several processes, DDP's find_unused_parameters would count the trained LM head "
                           "twice; set train.extra: {ddp_find_unused_parameters: false}")
            if problem:
                raise ConfigError(f"train.loss_chunk: {problem}")
        self._step = self._additive_step if self.perturber is None else self._perturbing_step
        # the run's seconds and loss, carried through a resume (its summary's)
        self.tally = RunTally(lambda value: self.accelerator.reduce(
            torch.tensor(value, device=self.args.device), "mean").item())
        self.add_callback(self.tally)
        self._micro_of_step = (-1, 0)  # (optimizer step, micro-batches run in it): see micro_step()
        # Makes Trainer count the response tokens of each optimizer step (over accumulation and
        # processes) and pass the count to training_step as `num_items_in_batch`.
        self.model_accepts_loss_kwargs = True
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._tokens_seen = 0
        self._last_log_time = time.perf_counter()
        sharded = [reg.name for reg in self.regularizers if reg.reads_weights]
        if zero_stage(self.accelerator) == 3 and sharded:
            raise ConfigError(f"regularizers: {', '.join(sharded)} read the weights' values, which DeepSpeed ZeRO-3 "
                              "partitions across processes; use ZeRO-2 (or DDP) with them")
        problem = unsaved_model_problem(self.accelerator.state, lora=bool(getattr(self.model, "peft_config", None)))
        if problem:  # found before training: else the run would end as "done" with no model to load
            raise ConfigError(problem)
        # what a regularizer is told of the run (never the Trainer itself)
        self.run_info = RunInfo(
            model=self.model, accelerator=self.accelerator, tokenizer=self.processing_class,
            train_dataset=self.train_dataset, output_dir=Path(self.args.output_dir), seed=int(self.args.seed),
            grad_accum=self.args.gradient_accumulation_steps, batch_size=self.args.per_device_train_batch_size,
            eval_batch_size=self.args.per_device_eval_batch_size, show_progress=not self.args.disable_tqdm,
            inputs_key=inputs_key)
        self.replay = replay
        # DeepSpeed's engine steps at the last micro-batch's first backward: replay rows must join the SFT one
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if replay is not None:
            if replay.cfg.forward == "own" and self.deepspeed:
                raise ConfigError("replay.forward: own is not possible under DeepSpeed (its engine takes "
                                  "one backward per micro-batch, and steps at it); use auto or with_sft")
            self.replay_forward = self._replay_forward()
            replay.setup(self.run_info)
        for reg in self.regularizers:
            reg.setup(self.run_info)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        if num_items_in_batch is None:  # called outside Trainer's loop: this batch is the whole step
            num_items_in_batch = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()) * self.accelerator.num_processes
        sft = Rows(SFT, inputs, self.accelerator.num_processes / max(float(num_items_in_batch), 1.0))
        loss = self._step(model, sft, self.micro_step())
        self.tally.add(loss)
        return loss

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        # Trainer takes a step before it checks max_steps: a run resumed from its last checkpoint part-way
        # through an epoch would train one step past its end (tests/test_nothing_lost.py pins this)
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def _additive_step(self, model, sft: Rows, micro: int) -> torch.Tensor:
        """SFT rows (+ replay rows: joined, or in their own pass first) + each penalty's term; one backward."""
        joined, replay_term = self._replay_rows(model, sft, micro)
        parts = [sft] if joined is None else [sft, joined]
        with self.compute_loss_context_manager():
            with contextlib.ExitStack() as hooks:
                for reg in self.penalties:
                    hooks.enter_context(reg.clean_forward(model, sft.batch, micro))
                # logits only where a token is trained: the LM head skips prompt and padding
                outputs, logits, nll = self._forward_nll(model, *joined_inputs(parts),
                                                         torch.cat([p.targets() for p in parts]))
            # one cross-entropy over every row, then each source's share
            split_outputs(parts, nll, logits)
            sft_loss = sft.nll.sum() * sft.scale
            ctx = self._context(model, parts, outputs, sft_loss, micro)
            extra = self._add_penalties(ctx, None if joined is None else self._replay_loss(joined, sft.scale))
        total = sft_loss if extra is None else sft_loss + extra
        if not self.all_finite(total):
            # a finite replay pass has already added its gradient: kept, unless this micro-batch was
            # the step's syncing one (then _skip_nonfinite discards the whole step's gradient)
            return self._skip_nonfinite(model, total)
        self._nonfinite_in_a_row = 0
        self.backward(total)
        return self._finish(sft, sft.nll, total, replay_term)

    def _perturbing_step(self, model, sft: Rows, micro: int) -> torch.Tensor:
        """LfU's step: the clean pass's backward holds the gradient sync back and hands the perturber this
        micro-batch's gradient of l_sft alone; then the perturber's own forward + backward (the one that syncs)."""
        perturber = self.perturber
        if not perturber.perturbs_at(micro):  # LfU's `every`: a plain micro-batch
            return self._additive_step(model, sft, micro)
        _, replay_term = self._replay_rows(model, sft, micro)  # never joined here (_replay_forward)
        # Only the micro-step's last backward (the perturbed one) may sync gradients
        with self.accelerator.no_sync(model):
            with self.compute_loss_context_manager():
                with contextlib.ExitStack() as hooks:
                    for reg in self.regularizers:  # the perturber's too: it captures what it perturbs
                        hooks.enter_context(reg.clean_forward(model, sft.batch, micro))
                    outputs, logits, sft.nll = self._forward_nll(model, sft.batch["input_ids"],
                                                                 sft.batch["attention_mask"], sft.keep, sft.targets())
                sft.logits = logits
                sft_loss = sft.nll.sum() * sft.scale
                ctx = self._context(model, [sft], outputs, sft_loss, micro)
                extra = self._add_penalties(ctx, None)
            total = sft_loss if extra is None else sft_loss + extra
            if not self.all_finite(total):
                return self._skip_nonfinite(model, total)
            self._nonfinite_in_a_row = 0
            if extra is not None:
                self.backward(extra, retain_graph=True)
            ctx.sft_grads = self._isolated_backward(sft_loss, perturber.ascent_tensors())
        # Free the whole clean graph before the perturbed forward: `extra`'s backward kept its saved tensors
        # (retain_graph), and anything holding a grad_fn would keep them (and the logits) alive.
        total, nll = total.detach(), sft.nll.detach()
        ctx.outputs = ctx.logits = ctx.sft_loss = ctx.rows = sft.logits = sft.nll = None
        outputs = logits = sft_loss = extra = None
        with self.compute_loss_context_manager():
            term, metrics = perturber.perturbed_backward(ctx)
        self._record(metrics)
        return self._finish(sft, nll, total + term, replay_term)

    # ------------------------------------------------------------------ the pieces both steps share

    def _head_marked_unused(self) -> bool:
        """Whether DDP would find the trained, untied LM head unused in the forward the chunked loss skips it in
        (and then see its gradient arrive after all: an error)."""
        if self.accelerator.num_processes < 2:
            return False
        model = self.accelerator.unwrap_model(self.model)
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if not head.weight.requires_grad or head.weight is embeddings.weight:
            return False
        find = self.args.ddp_find_unused_parameters
        return bool(find) or (find is None and not self.args.gradient_checkpointing)  # transformers' default

    def _forward_nll(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor,
                     targets: torch.Tensor) -> tuple[Any, torch.Tensor | None, torch.Tensor]:
        """The training forward of these rows: (outputs, logits at `keep` or None, per-token NLL). With
        train.loss_chunk the model stops before its head and the NLL comes from the head `loss_chunk` rows at a
        time (no logits then; no regularizer of the run reads them, checked at start)."""
        if not self.loss_chunk:
            outputs, logits = forward_rows(model, input_ids, attention_mask, keep)
            return outputs, logits, token_nll(logits, targets)
        with head_skipped(self.accelerator.unwrap_model(model)) as head:
            outputs, hidden = forward_rows(model, input_ids, attention_mask, keep)
        outputs["logits"] = None  # they were the hidden states (the key, so to_tuple() drops them too)
        return outputs, None, chunked_head_nll(hidden, head.weight, targets, self.loss_chunk)

    def _replay_forward(self) -> str:
        """How the run's replay rows meet the SFT rows, decided once: "with_sft" (joined), "own" (a pass of
        their own, first) or "auto" (joined unless that pads a lot: `_replay_joins`)."""
        if self.perturber is not None:  # the perturbing step's clean forward holds the SFT rows alone
            return "own"
        if self.replay.cfg.forward == "auto" and self.deepspeed:  # its engine steps at the first backward
            return "with_sft"
        return self.replay.cfg.forward

    def _replay_rows(self, model, sft: Rows, micro: int) -> tuple[Rows | None, torch.Tensor | None]:
        """This micro-batch's replay rows: (rows to join the SFT forward, None), or (None, the detached term
        of their own pass, run here); (None, None) without replay rows or when their pass was skipped."""
        if self.replay is None:
            return None, None
        labels, in_step = sft.batch["labels"], self._micro_batches_in_step()
        # replay tokens per SFT token of this optimizer step, R / S (sft.scale = world / S), on every micro-batch
        self._record({"replay_fraction": self.replay.fraction(micro, labels.shape[0]),
                      "replay_token_ratio": self.replay.step_tokens(micro, in_step) * sft.scale
                      / self.accelerator.num_processes})
        rows = self.replay.draw(micro, in_step, labels.device)
        if rows is None or self._replay_joins(sft, rows):
            return rows, None
        # Only the micro-step's last backward may sync gradients (DDP decides at *forward* time)
        with self.accelerator.no_sync(model), self.compute_loss_context_manager():
            return None, self._replay_pass(model, rows, sft.scale, micro)

    def _replay_joins(self, sft: Rows, replay: Rows) -> bool:
        """The step option: replay rows join the SFT forward, or get their own pass (lower peak memory)."""
        if self.replay_forward != "auto":
            return self.replay_forward == "with_sft"
        (b, t), (r, length) = sft.batch["input_ids"].shape, replay.batch["input_ids"].shape
        # joining pads both to one length: worth it unless that adds more than 10% tokens
        return (b + r) * max(t, length) <= 1.1 * (b * t + r * length)

    def _replay_loss(self, rows: Rows, sft_scale: float) -> torch.Tensor:
        """weight * the replay rows' NLL sum, normalised by the step's SFT tokens (`sft_scale`, l_sft's own
        scale): replay rows weigh as rows mixed into the batch would, so the term grows with the replay
        tokens' share of the step (R / S) and `ratio` sets its strength. Dividing by S rather than S + R keeps
        l_sft, and what the learning rate means, the same at every ratio."""
        self._record({"l_replay": rows.nll.detach().mean().item()})
        return self.replay.weight * rows.nll.sum() * sft_scale

    def _replay_pass(self, model, rows: Rows, sft_scale: float, micro: int) -> torch.Tensor | None:
        """Replay rows' own forward + loss (with the penalties' terms on them) + backward; the detached
        term, or None when it was not finite (skipped like a non-finite SFT loss; the SFT pass still runs)."""
        _, rows.logits = forward_rows(model, rows.batch["input_ids"], rows.batch["attention_mask"], rows.keep)
        rows.nll = token_nll(rows.logits, rows.targets())
        term = self._replay_loss(rows, sft_scale)
        term = self._add_penalties(self._context(model, [rows], None, None, micro), term)
        if not self.all_finite(term):
            self._record({"replay_nonfinite_skipped": 1.0})
            return None
        self.backward(term)
        return term.detach()

    def _add_penalties(self, ctx: StepContext, total: torch.Tensor | None) -> torch.Tensor | None:
        """`total` + each penalty's term on the rows of `ctx` (None: no term at all); their metrics logged."""
        for reg in self.penalties:
            term, metrics = reg.loss(ctx)
            if term is not None:
                total = term if total is None else total + term
            self._record(metrics)
        return total

    def _finish(self, sft: Rows, nll: torch.Tensor, total: torch.Tensor, replay_term: torch.Tensor | None):
        """The micro-batch's loss as Trainer logs it (every term, detached); l_sft and the tokens seen logged."""
        if replay_term is not None:
            total = total + replay_term
        if nll.numel():
            self._record({"l_sft": nll.detach().mean().item()})
        self._tokens_seen += int(sft.batch["attention_mask"].sum())
        return total.detach()

    def _micro_batches_in_step(self) -> int:
        # Trainer's loop sets current_gradient_accumulation_steps (fewer at an epoch's short last step)
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def _context(self, model, parts: list[Rows], outputs, sft_loss, micro: int) -> StepContext:
        """What the regularizers see of one forward (`parts`: its rows by source; no SFT rows in replay's pass)."""
        rows = {p.source: p for p in parts}
        sft = rows.get(SFT)
        return StepContext(model, rows, sft.batch if sft else None, outputs, sft_loss, sft.scale if sft else 0.0,
                           global_step=self.state.global_step, micro_batches_in_step=self._micro_batches_in_step(),
                           micro_step=micro, backward=self.backward, all_finite=self.all_finite,
                           keep=sft.keep if sft else None, logits=sft.logits if sft else None)

    def micro_step(self) -> int:
        """This micro-batch's index in the run: optimizer step * accumulation steps + its place in the
        step. A function of the step count alone, so a resumed run numbers its micro-batches as an
        uninterrupted one does (also when training_step is called outside Trainer's loop, as bench does)."""
        step, count = self._micro_of_step
        if step != self.state.global_step:
            step, count = self.state.global_step, 0
        self._micro_of_step = (step, count + 1)
        return step * self.args.gradient_accumulation_steps + count

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """accelerate's backward, with our losses scaled once: each is already the step's token mean, so
        DeepSpeed must not divide it by the accumulation steps again (it does unless told not to)."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False
        self.accelerator.backward(loss, **kwargs)

    def all_finite(self, value: torch.Tensor) -> bool:
        """Whether `value` is finite on every process. A micro-batch's syncing backward is skipped by all
        processes or by none: one skipping alone would pair its next all-reduce with the others' current one."""
        finite = torch.isfinite(value.detach()).all().float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.gather(finite).min()
        return bool(finite.item())

    def _skip_nonfinite(self, model, total: torch.Tensor) -> torch.Tensor:
        if self.accelerator.sync_gradients and not self.deepspeed:
            # The step's last micro-batch is the one whose backward all-reduces: skipping it leaves the
            # gradient accumulated under no_sync (earlier micro-batches, replay's own pass) different on
            # each process, and stepping with it would make the model copies drift apart. Every process
            # skips together (all_finite), so every process discards it: all step with the same zero
            # gradient (a zeroed .grad, not None: optimizers and the fp16 scaler then see the usual
            # tensors). One process does the same, so N processes still train as one does.
            # Not under DeepSpeed: its engine owns the gradients (p.grad is not them) and reduces them in
            # its own backward, so its processes cannot drift this way; a skip there is left to the engine.
            model.zero_grad(set_to_none=False)
        self._nonfinite_in_a_row += 1
        self._record({"nonfinite_skipped": 1.0})
        logger.warning("non-finite loss (%s here; all processes skip it) at step %d: micro-batch skipped (%d in a row)",
                       total.item(), self.state.global_step, self._nonfinite_in_a_row)
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise TrainingError(
                f"the loss was NaN/inf for {self._nonfinite_in_a_row} micro-batches in a row (step "
                f"{self.state.global_step}); training stopped and nothing was saved. Lower train.learning_rate, "
                "check the data, or raise train.max_nonfinite_steps"
            )
        return torch.zeros((), device=total.device)

    def _isolated_backward(self, loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backward `loss`, returning its gradient w.r.t. `tensors` alone while still accumulating it.

        The accumulated .grad of earlier micro-batches is set aside (references, no copy), so after
        the backward .grad holds exactly this loss's gradient; then the two are summed back.
        """
        saved = [t.grad for t in tensors]
        for t in tensors:
            t.grad = None
        self.backward(loss)
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
        for t, old, new in zip(tensors, saved, grads):
            t.grad = new if old is None else old.add_(new)
        return grads

    def _record(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._metrics[key].append(value)

    def pending_metrics(self) -> dict[str, list[float]]:
        """The loss parts and metrics recorded since the last training log line, by name, one value per
        record, oldest first (a copy: the next log line averages them across processes and starts afresh)."""
        return {key: list(values) for key, values in self._metrics.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Evaluation loss: mean NLL over the response tokens of the batch."""
        keep = prediction_mask(inputs["labels"])
        outputs, logits = forward_rows(model, inputs["input_ids"], inputs["attention_mask"], keep)
        loss = token_nll(logits, next_token_targets(inputs["labels"], keep)).mean()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the step's loss parts and throughput, averaged over processes, to Trainer's own logs."""
        if "loss" in logs:  # a training log (evaluation logs carry eval_*)
            for key, values in self._metrics.items():
                mean = torch.tensor(sum(values) / len(values), device=self.args.device)
                logs[key] = self.accelerator.gather(mean).mean().item()
            self._metrics.clear()
            tokens = torch.tensor(self._tokens_seen, device=self.args.device)
            total_tokens = self.accelerator.gather(tokens).sum().item()
            now = time.perf_counter()
            logs["tokens_per_s"] = total_tokens / max(now - self._last_log_time, 1e-9)
            self._tokens_seen, self._last_log_time = 0, now
        if "train_runtime" in logs:  # the end of training: Trainer's train_loss counts only this process's steps
            logs.pop("train_loss", None)  # (0 after a resume from the last checkpoint); the run's, as the summary's
            loss = self.run_train_loss()
            if loss is not None:
                logs["train_loss"] = loss
        super().log(logs, start_time)

    def run_train_loss(self) -> float | None:
        """The mean step loss over the run, a resumed run's steps before its resume included (RunTally), averaged
        over processes (a collective: every process calls it); None when the tally counted no step (a resume
        from the last checkpoint of a run written before forgetless kept one)."""
        counted = self.state.global_step - self.tally.from_step
        if not counted:
            return None
        loss = torch.tensor(self.tally.total_loss() / counted, device=self.args.device)
        return self.accelerator.reduce(loss, "mean").item()


class RunTally(TrainerCallback, ExportableState):
    """The run's training seconds and summed micro-batch losses (what training_step returns, as Trainer sums them
    for its train_loss) since step `from_step`, saved in every checkpoint (trainer_state.json's
    stateful_callbacks) and read back by `resume_from`. Trainer counts only the steps its own process trained,
    so a resumed run's summary would report the part after the resume (and 0 for a resume from the last
    checkpoint). `from_step` is 0 but for a run resumed from a checkpoint written before forgetless kept a
    tally: its figures start at that checkpoint's step, and say so in the checkpoints it writes.

    The loss sum is each process's own; at each save every process takes the mean over processes (`reduce`,
    a collective: on_step_end, where every process knows a save is due), so what the main process saves, and
    every process reads back on resume, is the mean, as the summary's figure is."""

    def __init__(self, reduce: Callable[[float], float] = lambda value: value) -> None:
        self.reduce = reduce
        self.from_step = 0
        self._before = (0.0, 0.0)  # (seconds, loss sum) of the steps before this process's training
        self.seconds, self.loss_sum = self._before
        self._pending: torch.Tensor | None = None  # summed on the device: no sync per micro-batch
        self._since: float | None = None

    def resume_from(self, attributes: dict, step: int) -> None:
        """Continue the tally a checkpoint saved after `step` steps holds (its `attributes`:
        run_folder.checkpoint_state); or, from one written before forgetless kept a tally (none), start it at `step`."""
        if attributes:
            self._before = (float(attributes["seconds"]), float(attributes["loss_sum"]))
            self.from_step = int(attributes.get("from_step", 0))
        else:
            self._before, self.from_step = (0.0, 0.0), step

    def start(self) -> None:
        """The clock starts (train(), just before Trainer's train: its setup and step 0's curve are training time)."""
        self._since = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self._pending = loss if self._pending is None else self._pending + loss

    def total_loss(self) -> float:
        if self._pending is not None:
            self.loss_sum += float(self._pending)
            self._pending = None
        return self.loss_sum

    def total_seconds(self) -> float:
        return self.seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        # afresh at each start of Trainer's loop (auto_find_batch_size starts it again after an out-of-memory)
        self.loss_sum, self._pending = self._before[1], None
        self.seconds = self._before[0]
        if self._since is None:
            self.start()
        # a checkpoint written before the tally existed has no entry, and Trainer's save expects one
        state.stateful_callbacks.setdefault(type(self).__name__, {})

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # set by then (DefaultFlowCallback comes first), alike on every process
            self.loss_sum = self.reduce(self.total_loss())

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds, self._since = self.total_seconds(), None

    def state(self) -> dict:
        return {"args": {}, "attributes": {"seconds": self.total_seconds(), "loss_sum": self.total_loss(),
                                           "from_step": self.from_step}}


class MetricsFileCallback(TrainerCallback):
    """Appends every log line (with its step) to OUTPUT_DIR/metrics.jsonl, on the main process only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

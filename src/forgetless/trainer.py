"""ForgetlessTrainer: transformers.Trainer whose training step composes SFT + regularizers.

The step, top to bottom (see `training_step`):
  0. the micro-batch's rows: the SFT rows, plus replay rows when the run has a replay source
     (forgetless.replay; a function of the step count). The step splits them by source when replay
     asks for a forward of its own (`forward: own`, or `auto` when joining would pad a lot or LfU's
     hooks read the clean forward): forward + loss + backward on the replay rows first, without
     gradient sync, so their activations are freed before the SFT forward allocates its own;
  1. clean forward on the (remaining) rows, all sources in one; each source gets its rows' logits;
  2. l_sft = sum of response-token NLL * token_scale, where token_scale = world_size / (response
     tokens in the whole optimizer step, across accumulation and processes): the mean over the
     step's tokens, exactly as transformers normalises with `num_items_in_batch`; replay rows add
     weight * their NLL sum * their own scale (forgetless.rows);
  3. + each regularizer's term;  4. backward;
  5. only with a perturbing regularizer (LfU): the clean backward runs without gradient sync,
     this micro-batch's gradient of l_sft alone is handed to it, and it runs its own
     forward + backward (the last backward of the micro-step, so the one that syncs).
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
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback

from forgetless.errors import ConfigError, TrainingError
from forgetless.losses import IGNORE_INDEX, forward_rows, next_token_targets, prediction_mask, token_nll
from forgetless.regularizers import Regularizer, RunInfo, StepContext
from forgetless.replay import ReplaySource
from forgetless.rows import SFT, Rows, joined_inputs, split_outputs


logger = logging.getLogger(__name__)


class ForgetlessTrainer(Trainer):
    # training_step normalises by the step's token count itself; Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, regularizers: list[Regularizer] | None = None, replay: ReplaySource | None = None,
                 max_nonfinite_steps: int = 5, inputs_key: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A micro-batch whose loss is NaN/inf is skipped (no backward); this many in a row abort the run.
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_in_a_row = 0
        self.regularizers = list(regularizers or [])
        perturbers = [reg for reg in self.regularizers if reg.perturbs]
        if len(perturbers) > 1:
            raise ConfigError("regularizers: at most one perturbing regularizer (lfu) per run")
        self.perturber = perturbers[0] if perturbers else None
        self._micro_of_step = (-1, 0)  # (optimizer step, micro-batches run in it): see micro_step()
        # Makes Trainer count the response tokens of each optimizer step (over accumulation and
        # processes) and pass the count to training_step as `num_items_in_batch`.
        self.model_accepts_loss_kwargs = True
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._tokens_seen = 0
        self._last_log_time = time.perf_counter()
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        sharded = [reg.name for reg in self.regularizers if reg.reads_weights]
        if plugin is not None and plugin.zero_stage == 3 and sharded:
            raise ConfigError(f"regularizers: {', '.join(sharded)} read the weights' values, which DeepSpeed ZeRO-3 "
                              "partitions across processes; use ZeRO-2 (or DDP) with them")
        # what a regularizer is told of the run (never the Trainer itself)
        self.run_info = RunInfo(
            model=self.model, accelerator=self.accelerator, tokenizer=self.processing_class,
            train_dataset=self.train_dataset, output_dir=Path(self.args.output_dir), seed=int(self.args.seed),
            grad_accum=self.args.gradient_accumulation_steps, batch_size=self.args.per_device_train_batch_size,
            eval_batch_size=self.args.per_device_eval_batch_size, show_progress=not self.args.disable_tqdm,
            perturbing=self.perturber is not None, inputs_key=inputs_key)
        self.replay = replay
        # DeepSpeed's engine steps at the last micro-batch's first backward: replay rows must join the SFT one
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if replay is not None:
            if replay.cfg.forward == "own" and self.deepspeed:
                raise ConfigError("regularizers.replay.forward: own is not possible under DeepSpeed (its engine takes "
                                  "one backward per micro-batch, and steps at it); use auto or with_sft")
            replay.setup(self.run_info)
        for reg in self.regularizers:
            reg.setup(self.run_info)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        local_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if num_items_in_batch is None:  # called outside Trainer's loop: this batch is the whole step
            num_items_in_batch = local_tokens * self.accelerator.num_processes
        token_scale = self.accelerator.num_processes / max(float(num_items_in_batch), 1.0)
        micro = self.micro_step()
        # LfU with `every: k` runs its pass on some micro-batches only; the others are plain SFT steps
        perturber = self.perturber if self.perturber is not None and self.perturber.perturbs_at(micro) else None
        parts = [Rows(SFT, inputs, token_scale)]
        replay_term = None
        if self.replay is not None:
            self._record({"replay_fraction": self.replay.fraction(micro, labels.shape[0])})
            rows = self.replay.draw(micro, self._micro_batches_in_step(), labels.device)
            if rows is not None and self._replay_joins(parts[0], rows):
                parts.append(rows)
            elif rows is not None:
                # Only the micro-step's last backward may sync gradients (DDP decides at *forward* time)
                with self.accelerator.no_sync(model), self.compute_loss_context_manager():
                    replay_term = self._replay_pass(model, rows)

        clean_pass = self.accelerator.no_sync(model) if perturber else contextlib.nullcontext()
        with clean_pass:
            with self.compute_loss_context_manager():
                with contextlib.ExitStack() as hooks:
                    for reg in self.regularizers:
                        if reg is perturber or not reg.perturbs:
                            hooks.enter_context(reg.clean_forward(model, inputs))
                    # logits only where a token is trained: the LM head skips prompt and padding
                    outputs, logits = forward_rows(model, *joined_inputs(parts))
                # one cross-entropy over every row, then each source's share
                split_outputs(parts, token_nll(logits, torch.cat([p.targets() for p in parts])), logits)
                sft = parts[0]
                nll = sft.nll
                sft_loss = nll.sum() * token_scale
                ctx = self._context(model, parts, outputs, sft_loss, token_scale)
                extra = self._replay_loss(parts[1]) if len(parts) > 1 else None
                for reg in self.regularizers:
                    term, metrics = reg.loss(ctx)
                    if term is not None:
                        extra = term if extra is None else extra + term
                    self._record(metrics)
            total = sft_loss if extra is None else sft_loss + extra
            if not self.all_finite(total):
                # a finite replay pass has already added its gradient: kept, unless this micro-batch was
                # the step's syncing one (then _skip_nonfinite discards the whole step's gradient)
                return self._skip_nonfinite(model, total)
            self._nonfinite_in_a_row = 0

            if perturber is None:
                self.backward(total)
            else:
                if extra is not None:
                    self.backward(extra, retain_graph=True)
                ctx.sft_grads = self._isolated_backward(sft_loss, perturber.ascent_tensors())

        if perturber is not None:
            # Free the whole clean graph before the perturbed forward: `extra`'s backward kept its saved
            # tensors (retain_graph), and anything holding a grad_fn would keep them (and the logits) alive.
            ctx.outputs = ctx.logits = ctx.sft_loss = ctx.rows = outputs = logits = sft_loss = extra = term = None
            for part in parts:
                part.logits = part.nll = None
            total, nll = total.detach(), nll.detach()
            with self.compute_loss_context_manager():
                term, metrics = perturber.perturbed_backward(ctx)
            total = total + term
            self._record(metrics)

        if replay_term is not None:
            total = total + replay_term
        if local_tokens:
            self._metrics["l_sft"].append(nll.detach().mean().item())
        self._tokens_seen += int(inputs["attention_mask"].sum())
        return total.detach()

    def _replay_joins(self, sft: Rows, replay: Rows) -> bool:
        """The step option: replay rows join the SFT forward, or get their own pass (lower peak memory)."""
        forward = self.replay.cfg.forward
        if forward != "auto":
            return forward == "with_sft"
        if self.deepspeed:
            return True
        if self.perturber is not None:  # LfU's hooks capture the SFT rows of the clean forward
            return False
        (b, t), (r, length) = sft.batch["input_ids"].shape, replay.batch["input_ids"].shape
        # joining pads both to one length: worth it unless that adds more than 10% tokens
        return (b + r) * max(t, length) <= 1.1 * (b * t + r * length)

    def _replay_loss(self, rows: Rows) -> torch.Tensor:
        """weight * the replay rows' NLL, normalised over the step's replay tokens."""
        self._record({"l_replay": rows.nll.detach().mean().item()})
        return self.replay.weight * rows.nll.sum() * rows.scale

    def _replay_pass(self, model, rows: Rows) -> torch.Tensor | None:
        """Replay rows' own forward + loss (with the regularizers' terms on them) + backward; the detached
        term, or None when it was not finite (skipped like a non-finite SFT loss; the SFT pass still runs)."""
        _, rows.logits = forward_rows(model, rows.batch["input_ids"], rows.batch["attention_mask"], rows.keep)
        rows.nll = token_nll(rows.logits, rows.targets())
        term = self._replay_loss(rows)
        ctx = self._context(model, [rows], None, None, 0.0)
        for reg in self.regularizers:
            extra, metrics = reg.loss(ctx)
            if extra is not None:
                term = term + extra
            self._record(metrics)
        if not self.all_finite(term):
            self._record({"replay_nonfinite_skipped": 1.0})
            return None
        self.backward(term)
        return term.detach()

    def _micro_batches_in_step(self) -> int:
        # Trainer's loop sets current_gradient_accumulation_steps (fewer at an epoch's short last step)
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def _context(self, model, parts: list[Rows], outputs, sft_loss, token_scale: float) -> StepContext:
        rows = {p.source: p for p in parts}
        sft = rows.get(SFT)
        return StepContext(model, rows, sft.batch if sft else None, outputs, sft_loss, token_scale,
                           global_step=self.state.global_step, micro_batches_in_step=self._micro_batches_in_step(),
                           backward=self.backward, all_finite=self.all_finite,
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
        super().log(logs, start_time)


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

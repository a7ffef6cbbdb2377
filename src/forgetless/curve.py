"""The forgetting curve: what training has gained and broken so far, measured every N optimizer steps.

`evaluation.every_steps: N` (0 = off): on a small fixed slice — `curve_blocks` blocks of the general
text taken *after* the blocks the final evaluation reports on (the same held-out part `budget`
validates on), and the last `curve_examples` questions of the task's test split (the final
evaluation reads the first `task_limit`) — the model's general-text NLL, its drift KL(base ‖ model)
and its target NLL are logged as `curve_general_nll`, `curve_drift_kl`, `curve_target_nll` (to
metrics.jsonl and to `train.report_to`), at step 0 and every N steps. The base side of the drift is
computed once, before the first update, and stored with the checkpoints (float16 log-probabilities
of the slice), so a resumed run measures against the same base. `curve_seconds` (logged, and in
train_summary.json) is what the curve cost.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from forgetless.cache import load_matching, save_atomic
from forgetless.environment import environment_kept
from forgetless.identity import digest
from forgetless.data import held_out_blocks, load_records, task_pairs
from forgetless.losses import forward_rows, next_token_targets, prediction_mask, token_nll, upcast

with environment_kept():  # forgetless.environment: importing transformers writes TORCHINDUCTOR_CACHE_DIR
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

REFERENCE_FILE = "curve_reference.safetensors"


class ForgettingCurve(TrainerCallback, ExportableState):
    """The curve's measurements during training. Its seconds are saved in every checkpoint (trainer_state.json's
    stateful_callbacks) and read back by `resume_from`, so a resumed run's curve_seconds covers the whole run."""

    def __init__(self, config, tokenizer, inputs_key: str = "") -> None:
        ev = config.evaluation
        self.every = ev.every_steps
        self.trainer = None  # set by attach(): the curve logs through the trainer, like its other metrics
        self.seconds = 0.0
        self._before = 0.0  # the seconds of the steps before this process's training (a resumed run's)
        self.blocks = None
        if ev.general_text:
            # held-out blocks of every domain in turn; a short text's reported blocks when that is all there is
            self.blocks = held_out_blocks(ev.general_text, tokenizer, ev.block_length, ev.general_blocks,
                                          ev.curve_blocks, fallback=True)
        self.task = None
        if ev.task:
            records = load_records(ev.task, config.data)[-ev.curve_examples:]
            pairs, answers = task_pairs(records, tokenizer, config.data)
            rows = []
            for (prompt, _), q in zip(pairs, answers):
                p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                rows.append((p + q, [-100] * len(p) + q))
            width = max(len(ids) for ids, _ in rows)
            pad = tokenizer.pad_token_id
            self.task = {
                "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
                "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
            }
        self.reference: torch.Tensor | None = None  # [blocks, L - 1, V] base log-probs, float16
        # the stored reference is reused only for the same run inputs (forgetless.identity) and slice
        self.meta = {"inputs": inputs_key, "blocks": digest(self.blocks.tolist()) if self.blocks is not None else ""}

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def resume_from(self, attributes: dict) -> None:
        """Continue the seconds a checkpoint's `attributes` hold (run_folder.checkpoint_state; one written before
        they were saved has none: from 0, this part's). on_train_begin starts from them."""
        self._before = float(attributes.get("seconds", 0.0))

    def state(self) -> dict:
        return {"args": {}, "attributes": {"seconds": self.seconds}}

    @torch.no_grad()
    def _general(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position (NLL, log-probs) of the model on the fixed general-text blocks."""
        device = next(model.parameters()).device
        ids = self.blocks.to(device)
        logp = torch.log_softmax(upcast(model(input_ids=ids, use_cache=False).logits)[:, :-1], dim=-1)
        return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1), logp

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # a checkpoint written before the curve saved its seconds has no entry, and Trainer's save expects one
        state.stateful_callbacks.setdefault(type(self).__name__, {})
        self.seconds = self._before  # afresh at each start (auto_find_batch_size starts again after out-of-memory)
        if self.blocks is None:
            return
        path = Path(args.output_dir) / REFERENCE_FILE
        stored = load_matching(path, self.meta)
        if stored is not None:
            self.reference = stored["logp"]
            return
        if state.global_step > 0:
            logger.warning("forgetting curve: no base reference for these inputs in %s on resume; drift is not "
                           "logged", path)
            return
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            self.reference = self._general(model)[1].to(torch.float16).cpu()  # before the first update: the base
        finally:
            model.train(was_training)
        if state.is_world_process_zero:
            save_atomic({"logp": self.reference}, path, metadata=self.meta)
        self.seconds += time.perf_counter() - started
        self._measure(model, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and state.global_step % self.every == 0:
            self._measure(model, state)

    @torch.no_grad()
    def _measure(self, model, state) -> None:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        metrics = {}
        try:
            if self.blocks is not None:
                nll, logp = self._general(model)
                metrics["curve_general_nll"] = nll.mean().item()
                if self.reference is not None:
                    ref = self.reference.to(logp.device, torch.float32)
                    metrics["curve_drift_kl"] = (ref.exp() * (ref - logp)).sum(-1).mean().item()
            if self.task is not None:
                device = next(model.parameters()).device
                batch = {k: v.to(device) for k, v in self.task.items()}
                keep = prediction_mask(batch["labels"])
                _, logits = forward_rows(model, batch["input_ids"], batch["attention_mask"], keep)
                metrics["curve_target_nll"] = token_nll(logits, next_token_targets(batch["labels"], keep)).mean().item()
        finally:
            model.train(was_training)
        self.seconds += time.perf_counter() - started
        metrics["curve_seconds"] = self.seconds
        if self.trainer is not None:
            self.trainer.log(metrics)

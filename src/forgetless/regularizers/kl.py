"""KL penalty towards the initial model (arXiv 2512.22337), as specified in docs/methods/replay.md.

term = coef * mean over covered tokens of KL(p_init || p_theta)   (direction "forward", default)
                                       or KL(p_theta || p_init)   (direction "reverse")

Covered tokens: the SFT loss's response tokens (`on: sft`), the replay rows' trained tokens
(`on: replay`), or both: a mask over the forward's rows by source (ctx.rows), each source normalised
exactly like its own loss (forgetless.rows.Rows.scale).

The reference is the initial model, run under no_grad in eval mode (no dropout) on the same
inputs and attention mask:
- LoRA: the same network with its adapters disabled (peft's `disable_adapter()`): no weight copy.
  Refused when the LoRA init rewrites the base weights (PiSSA, OLoRA, LoftQ, ...): then the
  adapter-disabled network is not the initial model.
- Full fine-tuning: a frozen copy made before the first update, optionally in bf16 / on the CPU
  (`reference_dtype`, `reference_device`): +1x the model's weights in memory (0.5x in bf16).
  Under DeepSpeed ZeRO-3 the copy is partitioned like the trained model (its own inference-only
  ZeRO-3 engine: each process keeps 1/N of it, gathered layer by layer in the reference forward),
  not a whole copy per process. (Made from the whole model before training starts, so the setup
  briefly holds one whole copy per process.)

`cache: topk` removes the reference forward from the training step: before training, the
reference's top-k log-probs (and the mass of the rest) at every response token of every training
example are computed once and stored with the run (CHECKPOINTS/kl_cache.safetensors, reused
across epochs and on resume); each step then computes the top-k + rest KL from the cache.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from forgetless.cache import build_once
from forgetless.data import collator
from forgetless.errors import ConfigError
from forgetless.losses import IGNORE_INDEX, forward_rows, prediction_mask, rest_logprob, token_kl, topk_kl, upcast
from forgetless.model import is_lora
from forgetless.regularizers.base import Regularizer, RunInfo, StepContext, zero_stage
from forgetless.registry import Strength, register
from forgetless.rows import REPLAY, SFT
from forgetless.schema import out_of_range


logger = logging.getLogger(__name__)

# LoRA initialisations that leave the base weights untouched and start as a no-op.
NO_OP_LORA_INITS = (True, "gaussian")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class KLConfig:
    coef: float = 0.01  # β
    direction: Literal["forward", "reverse"] = "forward"
    on: Literal["sft", "replay", "both"] = "sft"
    # 0 = exact over the full vocabulary; k > 0 = reference top-k + one "rest" bucket (approximate)
    topk: int = 0
    # full fine-tuning only: where and in what precision the frozen reference copy lives
    reference_dtype: Literal["same", "bfloat16", "float16", "float32"] = "same"
    reference_device: Literal["same", "cpu"] = "same"
    # "topk": precompute the reference's top-k (k = topk, 64 when topk is 0) once per example (SFT tokens)
    cache: Literal["none", "topk"] = "none"

    def problems(self) -> dict[str, str]:  # checked when the config is parsed
        return out_of_range(self, {"coef": ">= 0", "topk": ">= 0"})

    def combination_problems(self, others: set[str]) -> dict[str, str]:
        if self.on in ("replay", "both") and "replay" not in others:
            return {"on": f"'{self.on}' needs replay rows: add a `replay:` section to the run"}
        return {}


def zero3_partitioned(reference: torch.nn.Module, accelerator) -> torch.nn.Module:
    """The frozen reference wrapped in an inference-only DeepSpeed ZeRO-3 engine: its weights partitioned
    across the processes as the trained model's are (calling it gathers each layer's for its forward)."""
    import deepspeed  # an optional dependency, only under a DeepSpeed launch

    run_config = accelerator.state.deepspeed_plugin.deepspeed_config
    hidden = getattr(getattr(reference, "config", None), "hidden_size", None) or 1024
    zero = {"stage": 3, "offload_param": {"device": "none"},
            # small tensors (norms, biases) stay whole on every process, as ZeRO-3 does for the trained model
            "stage3_param_persistence_threshold": 10 * hidden}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
              # the reference computes in the trained model's precision
              **{key: {"enabled": True} for key in ("bf16", "fp16")
                 if (run_config.get(key) or {}).get("enabled") in (True, "auto")
                 and next(reference.parameters()).dtype == DTYPES[{"bf16": "bfloat16", "fp16": "float16"}[key]]}}
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    engine.eval()  # (DeepSpeedEngine.eval returns None)
    return engine


def reference_bytes(reference: torch.nn.Module) -> int:
    """The bytes of the reference's weights this process holds (its partitions under ZeRO-3)."""
    total = 0
    for param in reference.parameters():
        part = getattr(param, "ds_tensor", None)  # a ZeRO-3 partition: the parameter itself is empty between uses
        if part is None:
            total += param.numel() * param.element_size()
        else:  # a small "persistent" one is also kept whole on every process
            total += (part.numel() + (param.ds_numel if getattr(param, "ds_persist", False) else 0)) * part.element_size()
    return total


class KL(Regularizer):
    name = "kl"
    reads_logits = True

    def __init__(self, cfg: KLConfig) -> None:
        self.cfg = cfg
        self.reference: torch.nn.Module | None = None  # full fine-tuning only
        self.cache: dict[str, torch.Tensor] | None = None

    def setup(self, run: RunInfo) -> None:
        model = run.model
        self.accelerator = run.accelerator
        if self.cfg.cache == "topk" and self.cfg.on != "sft" and not is_lora(model):
            raise ConfigError("regularizers.kl: cache: topk with full fine-tuning supports on: sft only")
        peft_config = getattr(model, "peft_config", None)
        if peft_config:
            for name, pc in peft_config.items():
                init = getattr(pc, "init_lora_weights", True)
                if init not in NO_OP_LORA_INITS:
                    raise ConfigError(
                        f"regularizers.kl: adapter '{name}' uses init_lora_weights={init!r}, which rewrites the "
                        "base weights, so the adapter-disabled model is not the initial model; use the default init"
                    )
            self.uses_adapter = True
        elif self.cfg.cache == "topk":
            # Before the first update the model *is* the initial model: the cache is built from it,
            # and no frozen copy is ever made (full fine-tuning with the cache supports on: sft only).
            self.uses_adapter = False
            self.reference = model
        else:
            self.uses_adapter = False
            ref = copy.deepcopy(model).eval().requires_grad_(False)
            if self.cfg.reference_dtype != "same":
                ref = ref.to(DTYPES[self.cfg.reference_dtype])
            zero3 = zero_stage(run.accelerator) == 3
            if self.cfg.reference_device == "cpu":
                ref = ref.to("cpu")
            elif not zero3:
                # on the run's device: under DeepSpeed or FSDP the model is still on the CPU here (the engine
                # moves it later), and a reference left there would run every forward on the CPU
                ref = ref.to(run.accelerator.device)
            if zero3:
                if self.cfg.reference_device == "cpu":
                    raise ConfigError("regularizers.kl: reference_device: cpu is not possible under DeepSpeed ZeRO-3 "
                                      "(the reference is partitioned across the processes' devices); leave it 'same'")
                ref = zero3_partitioned(ref, run.accelerator)
            self.reference = ref
            held = reference_bytes(ref)
            logger.info("kl: frozen reference: %.1f MiB (%d bytes) of weights held by this process (%s)",
                        held / 2**20, held,
                        "partitioned by ZeRO-3" if zero3 else "a whole copy")
        if self.cfg.cache == "topk":
            was_training = model.training
            model.eval()  # no dropout in the reference
            try:
                self.cache = self._load_or_build_cache(run)
            finally:
                model.train(was_training)
            self.reference = None

    # ------------------------------------------------------------------ reference cache

    @property
    def cache_k(self) -> int:
        return self.cfg.topk or 64

    def _load_or_build_cache(self, run: RunInfo) -> dict[str, torch.Tensor]:
        dataset = run.train_dataset
        if dataset is None or "example_id" not in dataset.column_names:
            raise ConfigError("regularizers.kl.cache: needs a training dataset built by forgetless (with example ids)")
        return build_once(run.output_dir / "kl_cache.safetensors",
                          {"examples": str(len(dataset)), "k": str(self.cache_k), "inputs": run.inputs_key},
                          lambda: self._build_cache(run, dataset), run.accelerator, "KL reference cache")

    @torch.no_grad()
    def _build_cache(self, run: RunInfo, dataset) -> dict[str, torch.Tensor]:
        model, k = run.model, self.cache_k
        collate = collator(run.tokenizer)
        batch_size = run.eval_batch_size
        counts = torch.zeros(len(dataset), dtype=torch.long)
        rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        device = run.device
        for start in tqdm(range(0, len(dataset), batch_size), desc="KL reference cache", disable=not run.show_progress):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            ids, mask, labels = (batch[key].to(device) for key in ("input_ids", "attention_mask", "labels"))
            keep = prediction_mask(labels)
            logr = torch.log_softmax(upcast(self.reference_logits(model, ids, mask, keep)), dim=-1)  # [N, V]
            top, idx = logr.topk(k, dim=-1)
            rest = rest_logprob(top)
            per_row = keep.sum(1).tolist()
            for (i_top, i_idx, i_rest), example_id, n in zip(
                zip(top.split(per_row), idx.split(per_row), rest.split(per_row)), batch["example_id"].tolist(), per_row
            ):
                rows[example_id] = (i_idx.int().cpu(), i_top.float().cpu(), i_rest.float().cpu())
                counts[example_id] = n
        order = range(len(dataset))
        return {
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
            "topk_ids": torch.cat([rows[i][0] for i in order]),
            "topk_logp": torch.cat([rows[i][1] for i in order]),
            "rest_logp": torch.cat([rows[i][2] for i in order]),
        }

    def _cached_kl_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """KL over (top-k of the reference + rest), the reference's side read from the cache; `logits`
        are the current model's rows at the batch's prediction positions."""
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        offsets = self.cache["offsets"]
        rows = [torch.arange(offsets[i], offsets[i + 1]) for i in batch["example_id"].tolist()]
        sel = torch.cat(rows)
        if sel.numel() != int(keep.sum()):
            raise ConfigError("regularizers.kl.cache: the cached reference does not match this data; delete "
                              "CHECKPOINTS/kl_cache.safetensors or start with --overwrite")
        device = logits.device
        kl = topk_kl(torch.log_softmax(upcast(logits), dim=-1), self.cache["topk_ids"][sel].to(device).long(),
                     self.cache["topk_logp"][sel].to(device), self.cache["rest_logp"][sel].to(device),
                     self.cfg.direction)
        return kl.sum(), kl.numel()

    @torch.no_grad()
    def reference_logits(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         keep: torch.Tensor | None = None) -> torch.Tensor:
        """The initial model's logits: [B, T, V], or with `keep` ([B, T] bool, losses.prediction_mask)
        the rows [N, V] at those positions, computed exactly as the training forward computes its own."""
        with self._reference(model) as ref:
            device = next(ref.parameters()).device
            ids, mask = input_ids.to(device), attention_mask.to(device)
            if keep is None:
                return ref(input_ids=ids, attention_mask=mask, use_cache=False).logits.to(input_ids.device)
            return forward_rows(ref, ids, mask, keep.to(device))[1].to(input_ids.device)

    @contextlib.contextmanager
    def _reference(self, model):
        """The reference as a plain causal LM: the adapter-disabled network, or the frozen copy."""
        if not self.uses_adapter:
            yield self.reference
            return
        peft_model = self.accelerator.unwrap_model(model)
        was_training = peft_model.training
        peft_model.eval()
        try:
            with peft_model.disable_adapter():
                yield peft_model.get_base_model()
        finally:
            peft_model.train(was_training)

    def _kl_sum(self, model, input_ids, attention_mask, keep, logits) -> tuple[torch.Tensor, int]:
        """Sum of token KLs at the `keep` positions; `logits` are the current model's rows there."""
        ref = self.reference_logits(model, input_ids, attention_mask, keep)
        kl = token_kl(logits, ref, self.cfg.direction, self.cfg.topk)
        return kl.sum(), kl.numel()

    def loss(self, ctx: StepContext):
        """coef * KL on the covered sources' rows of this forward, each normalised by its own scale."""
        covered = {"sft": (SFT,), "replay": (REPLAY,), "both": (SFT, REPLAY)}[self.cfg.on]
        term, metrics = None, {}
        for source in covered:
            rows = ctx.rows.get(source)
            if rows is None:
                continue
            b = rows.batch
            if self.cache is not None and source == SFT:
                kl_sum, n = self._cached_kl_sum(rows.logits, b)
            else:
                kl_sum, n = self._kl_sum(ctx.model, b["input_ids"], b["attention_mask"], rows.keep, rows.logits)
            part = self.cfg.coef * kl_sum * rows.scale
            term = part if term is None else term + part
            if n:
                metrics["kl" if source == SFT else "kl_replay"] = kl_sum.item() / n
        return term, metrics


KL_AND_DISTILLATION_REPLAY = {"regularizers": [{"kl": {}}, {"kl": {"coef": 1.0, "on": "replay"}}],
                              "replay": {"weight": 0.0, "ratio": 0.25}}  # one preset under two names (below)

register("kl", KLConfig, KL, strength=Strength("coef", (0.01, 0.1, 1.0, 10.0)), presets={
    "kl": {"regularizers": [{"kl": {}}]},
    # regularized approximate replay as the paper writes it (arXiv 2512.22337): KL to the initial model on
    # the SFT rows, replay rows as next-token targets
    "arr": {"regularizers": [{"kl": {}}], "replay": {}},
    # distillation replay: the replay rows are inputs only, on which the model keeps the initial model's
    # next-token distribution (KL on them, no NLL: the corpus's own style is not trained on)
    # (ratio 0.25: with no NLL on them the rows only set how many inputs the KL sees, a mean over their tokens)
    "replay-kl": {"regularizers": [{"kl": {"coef": 1.0, "on": "replay"}}], "replay": {"weight": 0.0, "ratio": 0.25}},
    # the seed's recipe as packaged: the KL anchor on the SFT rows and distillation replay, each with its own
    # coef. Over three seeds it kept the general text where `arr` (KJV as targets) shifted the model towards
    # the corpus, drift 2.3x SFT's (README, "The chosen points over three seeds"); `kl+replay-kl` is its
    # earlier name. Before 0.3.0 `kl+replay` named `arr`: a report of then says so in its runs' configs.
    "kl+replay": KL_AND_DISTILLATION_REPLAY,
    "kl+replay-kl": KL_AND_DISTILLATION_REPLAY,
})

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

from forgetless.regularizers.base import (REGISTRY, Regularizer, RunInfo, StepContext, build_regularizers,  # noqa: F401
                                          check_combination, parse_regularizers, register)

# Each regularizer module registers itself on import.
from forgetless.regularizers import ewc, kl, l2sp, lfu, neftune, wise_ft  # noqa: E402,F401

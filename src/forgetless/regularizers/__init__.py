"""Regularizers: the small interface every anti-forgetting term implements (forgetless.regularizers.base).

The training step (forgetless.trainer.ForgetlessTrainer) is one of two plain paths, chosen once per
run. The additive step runs the clean forward, computes the SFT loss, asks each penalty for a term to
add, and runs one backward:

    total = l_sft + sum(reg.loss(ctx)[0] for reg in penalties)

A regularizer is set up once with a `RunInfo` (model, accelerator, tokenizer, data, output folder,
seed, batch and accumulation sizes), never the Trainer. At each micro-batch it sees a `StepContext`:
the model, the batch, the clean forward's outputs, and the factor that normalises a *sum over
response tokens* exactly like the SFT loss (correct under gradient accumulation and across
processes). It returns a scalar tensor (already weighted by its coefficient) and a dict of floats to
log. One module per regularizer, ending in its `forgetless.registry.register(...)` call (name, options,
class, presets, strength), plus its import line in forgetless/methods.py.

The rows of a micro-batch come from data sources (forgetless.rows): the SFT mixture and, with
replay, the replay source (forgetless.replay: data, not a regularizer). A term that covers rows reads
`ctx.rows[source]` (their batch, logits at the trained positions and normalising scale); the SFT rows
are also `ctx.batch / ctx.keep / ctx.logits`. When the training step gives replay rows a forward of
their own, `loss` is called once for that pass too, with only `ctx.rows["replay"]` (and `ctx.batch`
None): a term on the SFT rows, or a per-step penalty weighted by `ctx.step_share()` (0 there), adds
nothing in it.

A penalty's whole interface is four optional hooks and two class flags (Regularizer's docstring):
`setup(run)`, `clean_forward(model, batch, micro_step)` (a context manager around the clean forward of
the SFT rows, for a term that hooks into it: capture hidden states, add steering vectors; `micro_step`
is the micro-batch's index in the run), `loss(ctx)` and `finalize(model)`; `name`, `reads_weights` and `reads_logits`.

A regularizer that simulates an update (LfU) sets `perturbs = True` (one per run) and makes the run's
step the perturbing one, with a contract of its own in place of `loss` (never called on it):
`perturbs_at(micro_step)` (pure: which micro-batches get its pass; the others take the additive step,
without it), `clean_forward(...)` around the clean forward of those micro-batches, `ascent_tensors()`
(whose gradient of l_sft *alone, for this micro-batch* it needs; the step runs the clean backward
without gradient sync, isolates that gradient from the accumulated .grad and hands it over as
`ctx.sft_grads`) and `perturbed_backward(ctx)` (its own forward + backward after the clean one, whose
graph is freed by then: the micro-batch's last backward, the one that syncs); besides setup and finalize.

Rules between the regularizers of one run are checked when the config is parsed, never at run time by
name: a config dataclass may say what it brings to the run (`provides() -> set[str]`, e.g. "replay",
"perturbs") and what it cannot do beside the others (`combination_problems(others: set[str]) ->
{option: problem}`, `others` being what the run's other entries provide); its single-entry checks go
in `problems() -> {option: problem}` (forgetless.schema).
"""

from forgetless.regularizers.base import Regularizer, RunInfo, StepContext  # noqa: F401
